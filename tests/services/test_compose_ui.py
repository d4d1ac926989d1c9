"""Composition from the user's side: composer settings forms, every adapter kind through every composer (with the
fallback notes), CLoRA's concept words and region preview, compare mode in the service, the Generate tab's
handlers and the CLI. Adapters are trained for real (2 steps each) on the built-in model."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from app.formatting import compare_caption, generation_status_md
from composition.base import COMPOSERS
from core.types import AdapterWeight, GenerationRequest
from services.container import build_services
from services.settings import Settings
from tests.conftest import write_images

FAST = {"max_steps": 2, "batch_size": 1, "preview_every": 0, "checkpoint_every": 0}
KINDS = {"lora": "sks", "tlora": "zqx", "orthogonal": "pqr", "scedit": "wkq"}  # method -> trigger word
PROMPT = "a sks zqx pqr wkq scene"
STEPS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    """Services on a fresh data dir with one trained adapter per registered method (named ``k-<method>``)."""
    root = tmp_path_factory.mktemp("compose")
    settings = Settings(data_dir=root / "data", models_path=models_dir, poll_seconds=0.05)
    services = build_services(settings)
    images = write_images(root / "images", 2)
    ids = {}
    for method, trigger in KINDS.items():
        _, job = services.train_from_upload(images, name=f"k-{method}", method=method, kind="subject",
                                            trigger_word=trigger, config=FAST)
        assert services.worker.run_once(job.id)
        done = services.jobs.get(job.id)
        assert done.status == "succeeded", done.error
        ids[method] = done.result_ref
    yield services, ids
    services.close()


def _run(services, job):
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    return services.generation.get_image(done.result_ref)


def _request(ids: dict, methods, composer: str, **extra) -> GenerationRequest:
    adapters = tuple(AdapterWeight(ids[m], 0.8) for m in methods)
    return GenerationRequest(prompt=PROMPT, seed=4, steps=STEPS, adapters=adapters, composer=composer, **extra)


def test_every_composer_is_described_with_its_defaults(world) -> None:
    services, _ = world
    for name in services.generation.list_composers():
        described = services.generation.describe_composer(name)
        config = COMPOSERS.get(name).config_cls()
        assert [f["name"] for f in described.fields] == [f.name for f in dataclasses.fields(config)]
        assert all(f["help"] for f in described.fields), name
        assert {f["name"]: f["default"] for f in described.fields} == config.to_dict()
        assert described.summary and described.adapter_prompts == (name == "clora")
    with pytest.raises(KeyError, match="unknown composer 'nope'"):
        services.generation.describe_composer("nope")


@pytest.mark.parametrize("composer", ["merge", "switch", "composite", "cmlora", "clora"])
def test_every_adapter_kind_composes_and_fallbacks_are_explained(world, composer: str) -> None:
    services, ids = world
    settings = {"interval": 1} if composer == "switch" else {}
    image = _run(services, services.generation.submit(_request(ids, KINDS, composer, composer_config=settings)))
    assert image.composer == composer and image.params["sample_seconds"] > 0
    assert len(image.notes) == 1
    note = image.notes[0]
    assert note.startswith(f"{composer}: batched per-sample routing is unavailable")
    assert "'k-tlora' has a timestep-dependent rank mask (T-LoRA)" in note and ids["tlora"] not in note
    if composer == "switch":
        assert "the steps of 'k-tlora' ran with peft's unfused LoRA forward" in note
    assert note in generation_status_md(image)
    routable = _run(services, services.generation.submit(_request(ids, ["lora", "orthogonal", "scedit"], composer)))
    assert routable.notes == ()
    if composer == "cmlora":
        assert image.params["composer_report"]["shallow_passes"] > 0  # T-LoRA under the deep-feature cache


def test_clora_concept_words_are_resolved_and_checked_at_submit(world) -> None:
    services, ids = world
    submit = services.generation.submit
    job = submit(_request(ids, ["lora", "scedit"], "clora"))  # default: each adapter's trigger word
    assert [a["prompt"] for a in job.payload["request"]["adapters"]] == ["sks", "wkq"]
    own = GenerationRequest(prompt="a red disc and a sks tree", steps=STEPS, composer="clora",
                            composer_config={"concepts": "k-scedit=tree"},
                            adapters=(AdapterWeight(ids["lora"], 1.0, "red, disc"), AdapterWeight(ids["scedit"])))
    job = submit(own)
    assert [a["prompt"] for a in job.payload["request"]["adapters"]] == ["red, disc", "tree"]
    with pytest.raises(ValueError, match="'cat' of adapter 'k-lora' are not in the prompt"):
        submit(dataclasses.replace(own, adapters=(AdapterWeight(ids["lora"], 1.0, "cat"),), composer_config={}))
    with pytest.raises(ValueError, match="'k-tlora', which is not among the chosen adapters"):
        submit(dataclasses.replace(own, composer_config={"concepts": "k-tlora=tree"}))
    merged = submit(dataclasses.replace(own, composer="merge", composer_config={}))
    assert [a["prompt"] for a in merged.payload["request"]["adapters"]] == ["red, disc", ""]  # kept as given


def test_clora_saves_a_region_preview_next_to_the_image(world) -> None:
    services, ids = world
    request = GenerationRequest(prompt="a red disc and a sks tree", seed=2, steps=STEPS, composer="clora",
                                adapters=(AdapterWeight(ids["lora"], 1.0, "red, disc"),
                                          AdapterWeight(ids["orthogonal"], 1.0, "tree")))
    image = _run(services, services.generation.submit(request))
    root = services.settings.artifacts_dir
    regions = image.regions_path
    assert regions == image.path.replace(f"/{image.id}.png", f"/regions/{image.id}.png")
    with Image.open(root / regions) as overlay, Image.open(root / image.path) as result:
        assert overlay.format == "PNG" and overlay.size == result.size
        assert overlay.convert("RGB").getdata() != result.convert("RGB").getdata()
    legend = image.params["regions"]["legend"]
    assert [(e["name"], e["colour"], e["concept"]) for e in legend] == [
        ("base model", "grey", ""), ("k-lora", "red", "red, disc"), ("k-orthogonal", "green", "tree")]
    sidecar = json.loads((root / image.path).with_suffix(".json").read_text())
    assert sidecar["params"]["regions"]["path"] == regions  # the record on disk knows it too (reindex)
    assert "red = k-lora (red, disc)" in generation_status_md(image)
    assert "regions" not in _run(services, services.generation.submit(
        dataclasses.replace(request, composer="composite"))).params


def test_compare_queues_one_job_per_composer(world) -> None:
    services, ids = world
    request = _request(ids, ["lora", "orthogonal"], "switch", composer_config={"interval": 1})
    before = len(services.jobs.list_jobs())
    for composers, message in [([], "at least one composer"), (["merge", "merge"], "once"),
                               (["merge", "nope"], "unknown composer 'nope'")]:
        with pytest.raises((ValueError, KeyError), match=message):
            services.generation.compare(request, composers)
    with pytest.raises(ValueError, match="interval must be >= 1"):
        services.generation.compare(request, ["merge", "switch"], configs={"switch": {"interval": 0}})
    assert len(services.jobs.list_jobs()) == before  # nothing queued when one request is bad

    queued = services.generation.compare(request, ["merge", "switch", "composite"])
    payloads = [job.payload["request"] for job in queued]
    assert [p["composer"] for p in payloads] == ["merge", "switch", "composite"]
    assert [p["composer_config"] for p in payloads] == [{}, {"interval": 1}, {}]
    assert {p["seed"] for p in payloads} == {4} and len({job.payload["compare"] for job in queued}) == 1
    images = [_run(services, job) for job in queued]
    for image, name in zip(images, ["merge", "switch", "composite"]):
        seconds = image.params["sample_seconds"]
        assert image.composer == name and 0 < seconds <= image.params["seconds"]
        assert compare_caption(image) == f"{name} · {seconds:.2f} s"


def test_generate_tab_handlers(world, tmp_path: Path) -> None:
    from app.main import build_ui

    services, ids = world
    demo = build_ui(services)
    handlers = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}
    by_name = {fn.fn.__name__: fn.fn for fn in demo.fns.values() if fn.fn is not None}
    hidden = [u["visible"] for u in by_name["on_composer"]("merge")[1:]]
    shown = [u["visible"] for u in by_name["on_composer"]("clora")[1:]]
    assert hidden == [False] * 5 and shown == [True] * 5  # the region preview and the four concept boxes
    assert by_name["on_composer"]("switch")[0] == {}  # another composer's form starts from its defaults

    slots = [ids["lora"], ids["scedit"], None, None, 1.0, 0.7, 1.0, 1.0, "", "tree", "", ""]
    form = ["a sks tree", "", 5, STEPS, 7.5, "clora", *slots]
    services.worker.start()
    try:
        *_, (path, status, history, image_id) = list(handlers["generate"](*form, {"mask_threshold": 0.4}))
        image = services.generation.get_image(image_id)
        assert Path(path).is_file() and image.composer == "clora" and history
        assert image.params["composer_config"] == {"mask_threshold": 0.4}
        payload = services.jobs.get(image.job_id).payload["request"]
        assert [a["prompt"] for a in payload["adapters"]] == ["sks", "tree"]
        assert "Regions: grey = base model, red = k-lora (sks), green = k-scedit (tree)" in status
        regions = by_name["show_regions"](image_id, "clora")
        assert regions["visible"] and regions["value"].endswith(f"regions/{image_id}.png")

        form[5] = "merge"
        *_, (gallery, status) = list(handlers["compare"](*form, ["merge", "composite"], {}))
        assert [caption.split(" · ")[0] for _, caption in gallery] == ["merge", "composite"]
        assert all(caption.endswith(" s") and Path(p).is_file() for p, caption in gallery)
        assert "compared 2 composer(s)" in status
    finally:
        services.worker.stop()


def test_cli_generate_compare_with_concepts(world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str], models_dir: Path) -> None:
    from app import cli

    services, _ = world
    for key in [k for k in os.environ if k.startswith("LORASTUDIO_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LORASTUDIO_MODELS", str(models_dir))
    out = tmp_path / "cmp.png"
    code = cli.main(["generate", "--prompt", "a red disc and a sks tree", "--adapter", "k-lora:0.9", "--adapter",
                     "k-scedit", "--concept", "k-lora=red,disc", "--concept", "k-scedit=tree", "--composer", "clora",
                     "--set", "mask_threshold=0.4", "--compare", "clora,merge", "--steps", "2", "--out", str(out),
                     "--data-dir", str(services.settings.data_dir)])
    printed = capsys.readouterr().out
    assert code == 0
    assert {p.name for p in tmp_path.iterdir()} == {"cmp-clora.png", "cmp-merge.png"}
    assert f"wrote {tmp_path / 'cmp-clora.png'} (clora, " in printed
    newest = services.generation.history(limit=2)
    assert {i.composer for i in newest} == {"clora", "merge"}
    clora = next(i for i in newest if i.composer == "clora")
    assert clora.params["composer_config"] == {"mask_threshold": 0.4} and clora.regions_path
    assert [e["concept"] for e in clora.params["regions"]["legend"][1:]] == ["red, disc", "tree"]
    assert cli.main(["generate", "--prompt", "x", "--adapter", "k-lora", "--concept", "k-tlora=x", "--out",
                     str(out), "--data-dir", str(services.settings.data_dir)]) == 2
    assert "--concept names k-tlora, which no --adapter picks" in capsys.readouterr().err
