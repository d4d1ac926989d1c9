"""Generate tab: prompt, sampling settings, adapters with one weight slider each, result and history."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from app.widgets import error
from core.types import AdapterWeight, GenerationRequest
from services.container import Services

ADAPTER_SLOTS = 4
POLL_SECONDS = 0.25


@dataclass(frozen=True)
class GenerateTab:
    adapter_pickers: list[gr.Dropdown]
    refresh: gr.Button
    result: gr.Image
    adapter_choices: object
    history: gr.Gallery
    history_items: object


def render(services: Services) -> GenerateTab:
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="gen-seed")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="gen-steps")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="gen-guidance")
                composer = gr.Dropdown(services.generation.list_composers(), value="merge", label="Composer",
                                       info="how several adapters are combined", elem_id="gen-composer")
                pickers, sliders = [], []
                with gr.Group():
                    gr.Markdown("Adapters")
                    for i in range(ADAPTER_SLOTS):
                        with gr.Row():
                            pickers.append(gr.Dropdown(choices=[], value=None, allow_custom_value=True,
                                                       label=f"Adapter {i + 1}", scale=3,
                                                       elem_id=f"gen-adapter-{i}"))
                            sliders.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2,
                                                     elem_id=f"gen-weight-{i}"))
                with gr.Row():
                    refresh = gr.Button("Reload adapter list", size="sm")
                    go = gr.Button("Generate", variant="primary", elem_id="gen-submit")
            with gr.Column(scale=2):
                result = gr.Image(label="Result", type="filepath", interactive=False, elem_id="gen-result")
                status = gr.Markdown(elem_id="gen-status")
        history = gr.Gallery(label="History", columns=8, height="auto", fit_columns=False, elem_id="gen-history")

    def adapter_choices():
        choices = [(f"{a.name} ({a.method})", a.id) for a in services.catalog.list_adapters()]
        return [gr.update(choices=choices) for _ in pickers]

    def history_items():
        return [((services.settings.artifacts_dir / img.path).as_posix(),
                 f"{img.prompt[:40]} · seed {img.seed}") for img in services.generation.history(limit=32)]

    def on_generate(text, neg, seed_value, n_steps, cfg, composer_name, *slots):
        picks = tuple(AdapterWeight(a, float(w)) for a, w in zip(slots[:ADAPTER_SLOTS], slots[ADAPTER_SLOTS:])
                      if a)
        try:
            request = GenerationRequest(prompt=text or "", negative_prompt=neg or "", seed=int(seed_value or 0),
                                        steps=int(n_steps), guidance_scale=float(cfg), adapters=picks,
                                        composer=composer_name)
            job = services.submit_generation(request)
        except (ValueError, KeyError) as exc:
            raise error(exc) from None
        yield None, f"queued job `{job.id[:8]}`…", gr.update()
        while not (final := services.jobs.get(job.id)).finished:
            p = final.progress
            yield gr.update(), f"{final.status}: step {p.step}/{p.total_steps or '?'}", gr.update()
            time.sleep(POLL_SECONDS)
        if final.status != "succeeded":
            raise gr.Error(f"generation {final.status}: {final.error or ''}")
        image = services.generation.get_image(final.result_ref)
        seconds = image.params.get("seconds")
        yield ((services.settings.artifacts_dir / image.path).as_posix(),
               f"done in {seconds:.2f} s · seed {image.seed} · {len(image.adapters)} adapter(s)", history_items())

    refresh.click(adapter_choices, None, pickers, api_name="adapter_choices")
    tab.select(adapter_choices, None, pickers, api_visibility="undocumented")  # adapters trained since load
    go.click(on_generate, [prompt, negative, seed, steps, guidance, composer, *pickers, *sliders],
             [result, status, history], concurrency_limit=8, api_name="generate")
    return GenerateTab(pickers, refresh, result, adapter_choices, history, history_items)
