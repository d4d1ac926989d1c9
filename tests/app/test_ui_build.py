"""``app.main.build_ui`` assembles every tab from real services, without launching a server."""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr
import pytest

from app.main import build_ui
from services.container import Services, build_services

TAB_IDS = {"train", "jobs", "gallery", "generate"}
ELEM_IDS = {
    "train-files", "train-name", "train-trigger", "train-kind", "train-method", "train-steps", "train-rank",
    "train-submit", "train-status", "jobs-table", "jobs-selected", "jobs-cancel", "jobs-retry", "jobs-top",
    "jobs-save-now", "jobs-sample-now", "jobs-log", "jobs-detail", "jobs-loss",
    "jobs-preview", "gallery-search", "gallery-refresh", "gallery-cards", "gallery-detail", "gallery-download",
    "gallery-delete", "gallery-confirm-delete", "gallery-restore", "gen-prompt", "gen-submit", "gen-result",
    "gen-status", "gen-history",
    *(f"gen-adapter-{i}" for i in range(4)), *(f"gen-weight-{i}" for i in range(4)),
}
API_NAMES = {"train", "job_status", "job_log", "cancel_job", "retry_job", "move_job_to_top", "save_now", "sample_now",
             "list_adapters", "adapter_choices", "generate"}


@pytest.fixture()
def services(settings) -> Iterator[Services]:
    built = build_services(settings)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture()
def demo(services: Services) -> gr.Blocks:
    return build_ui(services)


def test_every_tab_is_present(demo: gr.Blocks) -> None:
    tabs = [b for b in demo.blocks.values() if isinstance(b, gr.Tab)]
    assert {t.id for t in tabs} >= TAB_IDS
    assert [t.label for t in tabs if t.id in TAB_IDS] == ["Train", "Jobs", "Gallery", "Generate"]
    assert demo.title == "LoRA Studio"


def test_targetable_elements_exist(demo: gr.Blocks) -> None:
    present = {b.elem_id for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert ELEM_IDS <= present, f"missing elem_ids: {sorted(ELEM_IDS - present)}"


def test_train_form_offers_registered_methods(demo: gr.Blocks, services: Services) -> None:
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    method = by_id["train-method"]
    assert [value for _, value in method.choices] == services.training.list_methods()
    assert method.value == "lora"
    defaults = {f["name"]: f["default"] for f in services.training.describe_method("lora").fields}
    assert by_id["train-steps"].value == defaults["max_steps"]
    assert by_id["train-rank"].value == defaults["rank"]
    assert [value for _, value in by_id["gen-composer"].choices] == services.generation.list_composers()


def test_handlers_have_stable_api_names(demo: gr.Blocks) -> None:
    names = {fn.api_name for fn in demo.fns.values() if fn.api_name}
    assert API_NAMES <= names, f"missing api names: {sorted(API_NAMES - names)}"


def test_config_serialises(demo: gr.Blocks) -> None:
    config = demo.get_config_file()
    assert config["title"] == "LoRA Studio"
    assert len(config["components"]) > 40


def test_jobs_tab_operations(demo: gr.Blocks, services: Services) -> None:
    from core.types import GenerationRequest

    handlers = {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name}
    first, second = (services.generation.submit(GenerationRequest(prompt="a disc", seed=s, steps=2)).id
                     for s in (1, 2))
    handlers["move_job_to_top"](first)
    assert services.jobs.get(first).priority > services.jobs.get(second).priority
    handlers["cancel_job"](second)
    handlers["retry_job"](second)
    assert services.jobs.get(second).status == "queued"
    log = handlers["job_log"](second)
    assert "cancelled before it started" in log and "queued again (retry)" in log
    for name in ("save_now", "sample_now", "retry_job"):
        with pytest.raises(gr.Error):
            handlers[name](first)  # queued, not running / not finished
    with pytest.raises(gr.Error, match="pick a job"):
        handlers["retry_job"](None)
