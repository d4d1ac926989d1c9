"""Builds the Gradio app from its tabs and launches it with the built-in worker."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gradio as gr

from app.tabs import gallery, generate, jobs, train
from services.container import Services, build_services
from services.settings import Settings, parse_auth

log = logging.getLogger(__name__)
ASSETS = Path(__file__).parent / "assets"
CSS = """
.ls-jobs { width: 100%; border-collapse: collapse; }
.ls-jobs td, .ls-jobs th { padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary); }
.ls-jobs progress { width: 120px; }
.ls-failed td, .ls-interrupted td { color: var(--error-text-color); }
"""


def build_ui(services: Services) -> gr.Blocks:
    """Arrange the tabs; each tab module wires its own events."""
    with gr.Blocks(title="LoRA Studio") as demo:
        gr.Markdown("# LoRA Studio\nTrain adapters, keep them in a catalog, and mix them when you generate.")
        with gr.Tabs():
            train_tab = train.render(services)
            jobs.render(services)
            gallery_tab = gallery.render(services, placeholder=str(ASSETS / "no-preview.png"))
            generate_tab = generate.render(services)
        del train_tab, gallery_tab
        demo.load(generate_tab.adapter_choices, None, generate_tab.adapter_pickers)
        demo.load(generate_tab.history_items, None, generate_tab.history)
    return demo


def launch(settings: Settings, run_worker: bool = True, block: bool = True) -> int:
    """Start services (and the worker), then serve the UI until interrupted."""
    started = time.perf_counter()
    services = build_services(settings)
    services.runtime.resolve(settings.base_model)  # builds the built-in model once, before the first request
    if run_worker:
        services.worker.start()
    demo = build_ui(services)
    demo.queue(default_concurrency_limit=8)
    try:
        demo.launch(
            server_name=settings.host,
            server_port=settings.port,
            share=settings.share,
            auth=parse_auth(settings.auth),
            allowed_paths=[str(settings.artifacts_dir.resolve()), str(ASSETS)],
            prevent_thread_lock=True,
            css=CSS,
            footer_links=["api"],
        )
        print(f"LoRA Studio ready at http://{settings.host}:{settings.port} "
              f"in {time.perf_counter() - started:.1f} s (data in {settings.data_dir})", flush=True)
        if block:
            demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        if block:
            demo.close()
            services.close()
    return 0
