"""``lorastudio eval``: fixed prompts that ask what training never showed, and the ci profile end to end through
the command line into JSON and Markdown."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from app.cli import main
from core.builtin import DEFAULT_BUILTIN
from services.evaluation import (
    BASE_ROW,
    COMPOSER_NAMES,
    PROFILES,
    TRIGGERS,
    composition_prompts,
    run_evaluation,
    subject_prompts,
)
from training.world.captions import parse_caption
from training.world.concepts import SUBJECTS
from training.world.dataset import concept_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATES = ("fidelity", "alignment", "background", "position", "pixel_diversity", "layout_diversity")
COMPOSE_RATES = ("all_concepts", "subjects", "style", "background")


@pytest.mark.parametrize("subject", SUBJECTS)
def test_subject_prompts_ask_backgrounds_the_training_images_never_had(subject: str) -> None:
    trained = [concept_dataset(subject, 4, seed=3).labels(i) for i in range(4)]
    prompts = subject_prompts(subject, trained, 8, seed=3)
    assert prompts == subject_prompts(subject, trained, 8, seed=3)
    seen_colours = {t.background for t in trained}
    seen_positions = {o.position for t in trained for o in t.objects}
    scenes = [parse_caption(p) for p in prompts]
    assert all(trigger == TRIGGERS[subject] for _, trigger in scenes)
    assert all(s.objects[0].name == subject and s.background not in seen_colours for s, _ in scenes)
    positions = [s.objects[0].position for s, _ in scenes]
    assert set(positions) == {"left", "right", "center", "top", "bottom"}
    assert positions[0] not in seen_positions
    assert len(set(prompts)) == len(prompts)


def test_composition_prompts_ask_every_subject_by_its_word_and_the_style() -> None:
    asked = composition_prompts(("robot", "tree", "outline"), 6, seed=0)
    assert asked == composition_prompts(("robot", "tree", "outline"), 6, seed=0)
    for prompt, scene in asked:
        assert prompt.startswith("a big sks robot ") and " and a big ohwx tree " in prompt
        assert prompt.endswith(" plain background") and "outline" not in prompt
        assert scene.style == "outline" and [o.name for o in scene.objects] == ["robot", "tree"]
        assert {o.position for o in scene.objects} in ({"left", "right"}, {"top", "bottom"})
    single = composition_prompts(("house", "pixelated"), 3, seed=1)
    assert all(scene.style == "pixelated" and len(scene.objects) == 1 for _, scene in single)


def test_profiles_refuse_what_cannot_be_measured() -> None:
    with pytest.raises(ValueError, match="distinct trigger words"):
        replace(PROFILES["ci"], compose_sets=(("robot", "fish"),))
    with pytest.raises(ValueError, match="not a held-out subject"):
        replace(PROFILES["ci"], subjects=("circle",))
    with pytest.raises(KeyError):
        replace(PROFILES["ci"], methods=("nonsense",))
    with pytest.raises(ValueError, match="must be >= 1"):
        replace(PROFILES["ci"], train_images=())
    assert main(["eval", "--seed", "-1"]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--profile", "huge"])


def _in_unit_range(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


def test_eval_ci_through_the_command_line(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LORASTUDIO_MODELS", str(models_dir))
    out = tmp_path / "ci"
    assert main(["eval", "--profile", "ci", "--out", str(out), "--seed", "5"]) == 0
    captured = capsys.readouterr()
    assert "train lora on robot" in captured.err and "compose robot+pixelated" in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["profile"] == "ci" and results["settings"]["seed"] == 5
    assert results["base_model"]["ref"] == f"builtin:{DEFAULT_BUILTIN}" and len(results["base_model"]["hash"]) == 16
    assert results["hardware"]["cpu_count"] >= 1 and results["hardware"]["torch_threads"] == 1
    assert results["command"].startswith("lorastudio eval --profile ci ")
    timings = results["timings"]
    assert 0 < timings["training_s"] < timings["total_s"] and timings["methods_s"] > 0 and timings["composers_s"] > 0

    methods = results["methods"]
    assert [(r["method"], r["subject"], r["train_images"]) for r in methods] == [
        (BASE_ROW, "robot", 0), ("lora", "robot", 1)]
    for row in methods:
        assert all(_in_unit_range(row[key]) for key in RATES), row
        assert row["images"] == 2 and row["train_seconds"] >= 0 and row["generate_seconds"] > 0
        assert row["prompts"] == methods[0]["prompts"]
    assert methods[1]["steps"] == 4 and methods[1]["trigger"] == "sks" and methods[1]["train_seconds"] > 0

    composers = results["composers"]
    assert [r["composer"] for r in composers] == [BASE_ROW, *COMPOSER_NAMES]
    for row in composers:
        assert all(_in_unit_range(row[key]) for key in COMPOSE_RATES), row
        assert row["set"] == "subject+style" and row["concepts"] == ["robot", "pixelated"] and row["images"] == 1
        assert row["seconds_per_image"] > 0 and row["vs_base"] > 0
    assert composers[0]["vs_base"] == 1.0
    clora = next(r for r in composers if r["composer"] == "clora")
    assert clora["settings"]["concept_words"] == {"robot": "sks, robot", "pixelated": "background"}

    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Customization and composition benchmark: profile `ci`")
    assert "## Methods" in markdown and "## Composers" in markdown and results["command"] in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == 2 + len(methods) + len(composers)  # two header rows
    assert "| lora | robot | 1 | 4 |" in markdown and "| subject+style | robot + pixelated | clora |" in markdown
    assert not list(out.glob(".*.tmp"))


def test_same_profile_and_seed_give_the_same_numbers(tmp_path: Path, models_dir: Path) -> None:
    tiny = replace(PROFILES["ci"], composers=("merge",))
    first, second = (run_evaluation(tiny, out=tmp_path / name, seed=1, models_dir=models_dir).results
                     for name in ("a", "b"))
    for part, keys in (("methods", RATES + ("final_loss",)), ("composers", COMPOSE_RATES)):
        assert [{k: r[k] for k in keys} for r in first[part]] == [{k: r[k] for k in keys} for r in second[part]]
    other = run_evaluation(replace(tiny, compose_sets=()), out=tmp_path / "c", seed=2, models_dir=models_dir)
    assert other.results["methods"][0]["prompts"] != first["methods"][0]["prompts"]
    assert other.results["composers"] == []
