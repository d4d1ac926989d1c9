"""Export and import use cases: kohya files out of the catalog and foreign LoRA files into it, whole or not at all."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.io import load_safetensors
from services.adapter_records import job_adapter_id
from services.container import build_services
from services.interchange import InterchangeService
from storage import catalog
from storage.artifacts import ArtifactStore
from storage.db import writing
from training.artifact import adapter_file_metadata, load_adapter
from training.base import METHODS, Method
from training.methods.lora import LoRA, LoRAConfig

INPUTS_SEED = 123
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


@pytest.fixture()
def services(settings):
    built = build_services(settings)
    yield built
    built.close()


@pytest.fixture(scope="module")
def lora_file() -> tuple[dict, dict]:
    """A random plain LoRA (rank 4, alpha 6) for the tiny model, as tensors and header, like a trained one."""
    from core.builtin import build_pipeline

    pipe = build_pipeline()
    method = LoRA(LoRAConfig.from_dict({"rank": 4, "alpha": 6, "target_modules": TARGETS, "resolution": 64}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.inject(pipe.unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tensors, extra = method.adapter_state_dict(), method.adapter_metadata()
    metadata = adapter_file_metadata("lora", method.config, "builtin:tiny-sd", "h", ["sks"], "subject", 9,
                                     method_metadata=extra)
    return tensors, metadata


def _add(services, tensors: dict, metadata: dict, name: str, method: str = "lora") -> str:
    """Put an adapter into the store and catalog the way a finished training job does."""
    adapter_id = uuid.uuid4().hex
    config = json.loads(metadata["lorastudio.config"])
    manifest = {"id": adapter_id, "name": name, "method": method, "kind": "subject"}
    store = ArtifactStore(services.settings.artifacts_dir)
    written = store.write_adapter(adapter_id, tensors, metadata, config, manifest)
    with writing(services.sessions) as session:
        catalog.add_adapter(session, id=adapter_id, name=name, method=method, kind="subject",
                            base_model="builtin:tiny-sd", trigger_words=["sks"], rank=4, training_config=config,
                            steps=9, sha256=written.sha256, file_size=written.size, file_path=written.path)
    return adapter_id


def _unet_out(services, adapter_id: str | None = None) -> torch.Tensor:
    """The UNet output on fixed inputs in a fresh pipeline, with the catalog adapter ``adapter_id`` attached."""
    pipe = services.runtime.fresh_pipeline("builtin:tiny-sd")
    if adapter_id is not None:
        tensors, metadata = load_safetensors(services.catalog.adapter_file(adapter_id))
        load_adapter(pipe, tensors, metadata, "a")
    g = torch.Generator().manual_seed(INPUTS_SEED)
    cfg = pipe.unet.config
    latents = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    embeds = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([10, 600]), embeds, return_dict=False)[0]


def _adapter_folders(services) -> set[str]:
    folder = services.settings.artifacts_dir / "adapters"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_kohya_round_trip_through_the_catalog(services, lora_file, tmp_path: Path) -> None:
    original = _add(services, *lora_file, name="disc")
    result = services.interchange.export_adapter("disc", tmp_path, precision="fp32")
    assert result.path == tmp_path / "disc.safetensors" and result.format == "kohya" and not result.note
    assert result.layers == len(lora_file[0]) // 2
    tensors, header = load_safetensors(result.path)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert header["ss_output_name"] == "disc" and header["modelspec.trigger_phrase"] == "sks"

    back = services.interchange.import_adapter(result.path, name="disc again")
    assert (back.method, back.kind, back.trigger_words, back.rank, back.steps) == ("lora", "subject", ("sks",), 4, 9)
    assert back.training_config["imported_from"] == "disc.safetensors"
    assert back.training_config["format"] == "kohya" and back.training_config["source_method"] == "lora"
    torch.testing.assert_close(_unet_out(services, back.id), _unet_out(services, original), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_unet_out(services, back.id), _unet_out(services), atol=1e-3)


def test_fp16_export_imports_close_to_the_original(services, lora_file, tmp_path: Path) -> None:
    original = _add(services, *lora_file, name="disc")
    result = services.interchange.export_adapter(original, tmp_path / "disc16.safetensors")
    back = services.interchange.import_adapter(result.path, name="disc16", kind="style")
    assert back.kind == "style"
    effect = (_unet_out(services, original) - _unet_out(services)).abs().max()
    assert (_unet_out(services, back.id) - _unet_out(services, original)).abs().max() < 0.01 * effect


def test_native_export_copies_the_file(services, lora_file, tmp_path: Path) -> None:
    adapter_id = _add(services, *lora_file, name="disc")
    result = services.interchange.export_adapter(adapter_id, tmp_path / "n.safetensors", fmt="native")
    assert result.format == "native"
    assert result.path.read_bytes() == services.catalog.adapter_file(adapter_id).read_bytes()


class _NotLowRank(LoRA):
    """A method whose update is not a fixed low-rank ΔW (as SCEdit's is not): ``export_lora`` refuses."""

    export_lora = classmethod(Method.export_lora.__func__)


def test_methods_that_are_not_low_rank_fall_back_to_native(services, lora_file, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(METHODS._items, "not_low_rank", _NotLowRank)
    tensors, metadata = lora_file
    adapter_id = _add(services, tensors, {**metadata, "lorastudio.method": "not_low_rank"}, name="skip",
                      method="not_low_rank")
    result = services.interchange.export_adapter(adapter_id, tmp_path / "x.safetensors")
    assert result.format == "native" and "cannot be exported as LoRA" in result.note
    assert result.path.read_bytes() == services.catalog.adapter_file(adapter_id).read_bytes()
    download = services.interchange.export_for_download(adapter_id)
    assert download.format == "native" and download.path.is_file()


def test_export_for_download_and_errors(services, lora_file, tmp_path: Path) -> None:
    adapter_id = _add(services, *lora_file, name="disc")
    download = services.interchange.export_for_download("disc")
    assert download.format == "kohya" and download.path.name == "disc-kohya.safetensors"
    assert download.path.parent.name == adapter_id
    with pytest.raises(ValueError, match="must end in .safetensors"):
        services.interchange.export_adapter(adapter_id, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="format must be one of"):
        services.interchange.export_adapter(adapter_id, tmp_path / "x.safetensors", fmt="ckpt")
    with pytest.raises(KeyError, match="no adapter"):
        services.interchange.export_adapter("ghost", tmp_path / "x.safetensors")
    services.catalog.adapter_file(adapter_id).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="no longer matches its catalog sha256"):
        services.interchange.export_adapter(adapter_id, tmp_path / "x.safetensors")


def test_peft_file_import_records_its_format(services, lora_file, tmp_path: Path) -> None:
    tensors, _ = lora_file
    peft = {f"base_model.model.{k.removeprefix('unet.')}": v for k, v in tensors.items()}
    path = tmp_path / "adapter_model.safetensors"
    save_file(peft, str(path))
    adapter = services.interchange.import_adapter(path, name="from peft", alpha=6.0,
                                                  display_name="../../evil.safetensors")
    assert adapter.kind == "style" and adapter.trigger_words == () and adapter.steps == 0
    assert adapter.training_config == {"imported_from": "evil.safetensors", "format": "peft", "rank": 4,
                                       "alpha": 6.0, "layers": len(tensors) // 2}
    original = _add(services, *lora_file, name="disc")
    torch.testing.assert_close(_unet_out(services, adapter.id), _unet_out(services, original), rtol=1e-5, atol=1e-6)


def _write_pickle(path: Path) -> Path:
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, path)
    return path


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda p, t: _write_pickle(p / "lora.pt"), {}, "pickles, which can run code"),
        (lambda p, t: _write_pickle(p / "lora.safetensors"), {}, "pickle .* named .safetensors"),
        (lambda p, t: _raw(p / "empty.safetensors", b""), {}, "is empty"),
        (lambda p, t: _raw(p / "junk.safetensors", b"\x10" + b"\0" * 7 + b"{bad"), {}, "not a valid .safetensors"),
        (lambda p, t: p / "missing.safetensors", {}, "no such file"),
        (lambda p, t: _save(p / "big.safetensors", t), {"limit": 1000}, "over the import limit"),
        (lambda p, t: _save(p / "none.safetensors", {}), {}, "holds no tensors"),
        (lambda p, t: _save(p / "te.safetensors", {**t, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
                                                   ".lora_A.weight": torch.zeros(2, 64)}), {},
         "contains text-encoder LoRA layers, which are not supported yet"),
        (lambda p, t: _save(p / "odd.safetensors", {k.replace("to_q", "to_x"): v for k, v in t.items()}), {},
         "to_x: no Linear or Conv2d layer"),
        (lambda p, t: _save(p / "a.safetensors", t), {"name": "disc"}, "already exists"),
        (lambda p, t: _save(p / "a.safetensors", t), {"name": "bad/name"}, "adapter name must be"),
        (lambda p, t: _save(p / "a.safetensors", t), {"kind": "subject"}, "needs a trigger word"),
        (lambda p, t: _save(p / "a.safetensors", t), {"base_model": "nope/missing.safetensors"}, "no such file"),
    ],
    ids=["pickle", "renamed-pickle", "empty", "junk", "missing", "too-big", "no-tensors", "text-encoder",
         "unknown-layers", "name-taken", "bad-name", "subject-without-trigger", "bad-base"],
)
def test_import_refusals_leave_nothing_behind(services, lora_file, tmp_path: Path, make, kwargs, message) -> None:
    _add(services, *lora_file, name="disc")
    tensors = {k: v for k, v in lora_file[0].items()}
    path = make(tmp_path, tensors)
    limit = kwargs.pop("limit", None)
    service = services.interchange
    if limit is not None:
        store = ArtifactStore(services.settings.artifacts_dir)
        service = InterchangeService(services.sessions, store, services.runtime, services.settings.base_model,
                                     max_import_bytes=limit)
    before = _adapter_folders(services)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        service.import_adapter(path, **{"name": "new one", **kwargs})
    assert [a.name for a in services.catalog.list_adapters()] == ["disc"]
    assert _adapter_folders(services) == before


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, tensors: dict) -> Path:
    save_file(tensors, str(path))
    return path


def test_a_catalog_failure_removes_the_written_files(services, lora_file, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "a.safetensors", lora_file[0])

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(catalog, "add_adapter", broken)
    with pytest.raises(RuntimeError, match="database went away"):
        services.interchange.import_adapter(path, name="x")
    assert _adapter_folders(services) == set()


# import as a queued job ----------------------------------------------------------------------------------------


def _job_folders(services) -> set[str]:
    folder = services.settings.artifacts_dir / "jobs"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def _native_file(path: Path, lora_file: tuple[dict, dict]) -> Path:
    tensors, metadata = lora_file
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_import_job_goes_from_queued_to_succeeded(services, lora_file, tmp_path: Path) -> None:
    path = _native_file(tmp_path / "upload.safetensors", lora_file)
    job = services.interchange.submit_import(path, name="queued disc", display_name="../../my disc.safetensors")
    assert (job.kind, job.status, job.title) == ("import", "queued", "import queued disc (diffusers LoRA)")
    assert job.payload["file_name"] == "my disc.safetensors"
    assert job.payload["file"] == f"jobs/{job.id}/import.safetensors"
    stored = services.settings.artifacts_dir / "jobs" / job.id / "import.safetensors"
    assert stored.read_bytes() == path.read_bytes()
    assert (job.payload["kind"], job.payload["trigger_words"], job.payload["steps"]) == ("subject", ["sks"], 9)
    assert services.catalog.list_adapters() == []

    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    assert done.result_ref == job_adapter_id(job.id)
    adapter = services.catalog.get_adapter(done.result_ref)
    assert (adapter.name, adapter.kind, adapter.trigger_words, adapter.rank) == ("queued disc", "subject", ("sks",), 4)
    assert adapter.training_config["imported_from"] == "my disc.safetensors"
    assert adapter.training_config["format"] == "diffusers"
    with services.sessions() as session:
        assert catalog.get_adapter(session, adapter.id).job_id == job.id
    assert not stored.exists()  # the adapter holds the tensors now
    original = _add(services, *lora_file, name="disc")
    torch.testing.assert_close(_unet_out(services, adapter.id), _unet_out(services, original), rtol=1e-5, atol=1e-6)


def test_a_mismatched_file_fails_the_job_with_the_reason(services, lora_file, tmp_path: Path) -> None:
    tensors = {k.replace("to_q", "to_x"): v for k, v in lora_file[0].items()}
    path = _save(tmp_path / "odd.safetensors", tensors)
    job = services.interchange.submit_import(path, name="odd")
    assert services.worker.run_once(job.id)
    failed = services.jobs.get(job.id)
    assert failed.status == "failed" and failed.result_ref is None
    assert failed.error.startswith("odd.safetensors: ") and "to_x: no Linear or Conv2d layer" in failed.error
    assert services.catalog.list_adapters() == [] and _adapter_folders(services) == set()
    assert (services.settings.artifacts_dir / "jobs" / job.id / "import.safetensors").is_file()  # kept for a retry


def test_a_changed_upload_copy_fails_the_job(services, lora_file, tmp_path: Path) -> None:
    job = services.interchange.submit_import(_native_file(tmp_path / "a.safetensors", lora_file), name="a")
    _native_file(services.settings.artifacts_dir / "jobs" / job.id / "import.safetensors",
                 ({k: v + 1 for k, v in lora_file[0].items()}, lora_file[1]))
    services.worker.run_once(job.id)
    failed = services.jobs.get(job.id)
    assert failed.status == "failed" and "changed since it was queued" in failed.error
    assert _adapter_folders(services) == set()


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda p, t: _write_pickle(p / "lora.safetensors"), {}, "pickle .* named .safetensors"),
        (lambda p, t: _raw(p / "junk.safetensors", b"\x10" + b"\0" * 7 + b"{bad"), {}, "not a valid .safetensors"),
        (lambda p, t: _save(p / "w.safetensors", {"weird.weight": torch.zeros(2)}), {}, "not a LoRA file"),
        (lambda p, t: _save(p / "none.safetensors", {}), {}, "holds no tensors"),
        (lambda p, t: _save(p / "a.safetensors", t), {"name": "disc"}, "already exists"),
        (lambda p, t: _save(p / "a.safetensors", t), {"name": "bad/name"}, "adapter name must be"),
        (lambda p, t: _save(p / "a.safetensors", t), {"kind": "subject"}, "needs a trigger word"),
        (lambda p, t: _save(p / "a.safetensors", t), {"base": "nope/missing.safetensors"}, "no such file"),
        (lambda p, t: _save(p / "a.safetensors", t), {"alpha": -1.0}, "alpha must be a positive number"),
    ],
    ids=["renamed-pickle", "junk", "not-lora", "no-tensors", "name-taken", "bad-name", "subject-without-trigger",
         "bad-base", "bad-alpha"],
)
def test_submit_refusals_queue_nothing(services, lora_file, tmp_path: Path, make, kwargs, message) -> None:
    _add(services, *lora_file, name="disc")
    path = make(tmp_path, dict(lora_file[0]))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        services.interchange.submit_import(path, **{"name": "new one", **kwargs})
    assert services.jobs.list_jobs() == [] and _job_folders(services) == set()


def test_a_failed_enqueue_leaves_no_upload_copy(services, lora_file, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from storage import jobs

    def broken(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(jobs, "enqueue", broken)
    with pytest.raises(RuntimeError, match="database went away"):
        services.interchange.submit_import(_native_file(tmp_path / "a.safetensors", lora_file), name="a")
    assert _job_folders(services) == set()


def test_a_rerun_replaces_a_crashed_attempts_files(services, lora_file, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    job = services.interchange.submit_import(_native_file(tmp_path / "a.safetensors", lora_file), name="a")
    real_add = catalog.add_adapter

    def crash(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(catalog, "add_adapter", crash)
    services.worker.run_once(job.id)
    assert services.jobs.get(job.id).status == "failed" and _adapter_folders(services) == set()
    adapter_id = job_adapter_id(job.id)
    stale = services.settings.artifacts_dir / "adapters" / adapter_id
    stale.mkdir(parents=True)  # as if the process died between writing the files and the catalog row
    (stale / "adapter.safetensors").write_bytes(b"half written")
    monkeypatch.setattr(catalog, "add_adapter", real_add)
    services.jobs.retry(job.id)
    _add(services, *lora_file, name="a")  # the name was taken meanwhile: the import keeps both
    assert services.worker.run_once(job.id)
    done = services.jobs.get(job.id)
    assert done.status == "succeeded" and done.result_ref == adapter_id
    adapter = services.catalog.get_adapter(adapter_id)
    assert adapter.name == f"a-{adapter_id[:6]}"
    assert load_safetensors(services.catalog.adapter_file(adapter_id))[0].keys() == lora_file[0].keys()
