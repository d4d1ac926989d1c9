"""Generate tab: prompt, sampling settings, the base model, the composer and its settings, adapters with one weight
slider and one concept word (CLoRA) each; the result with CLoRA's region preview, a side-by-side comparison of
composers, history. A video base model (AnimateDiff, e.g. ``builtin:tiny-video``, or the base of a chosen motion
adapter) makes a clip, played in the result's video player."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from app.formatting import compare_caption, generation_status_md
from app.widgets import error, field_input
from core.builtin import VIDEO_FRAMES
from core.types import AdapterWeight, GenerationRequest
from services.container import Services
from services.generation import MAX_VIDEO_FRAMES, MIN_VIDEO_FRAMES, video_file

ADAPTER_SLOTS = 4
POLL_SECONDS = 0.25
DEFAULT_COMPOSER = "merge"
DEFAULT_COMPARE = ("merge", "switch", "composite")
AUTO_BASE = ("automatic: the adapters' base, else the default", "")
MAX_FRAMES_SHOWN = 32  # the built-in video model's motion modules take at most 32 frames


@dataclass(frozen=True)
class GenerateTab:
    adapter_pickers: list[gr.Dropdown]
    refresh: gr.Button
    result: gr.Image
    adapter_choices: object
    history: gr.Gallery
    history_items: object
    regions: gr.Image
    compare_gallery: gr.Gallery
    video: gr.Video
    base: gr.Dropdown


def _request(text, neg, seed_value, n_steps, cfg, composer_name, slots, settings: dict | None) -> GenerationRequest:
    """The request the form describes; ``slots`` = adapter pickers, then weights, then concept words."""
    names = slots[:ADAPTER_SLOTS]
    weights = slots[ADAPTER_SLOTS:2 * ADAPTER_SLOTS]
    words = slots[2 * ADAPTER_SLOTS:3 * ADAPTER_SLOTS]
    picks = tuple(AdapterWeight(a, float(w if w is not None else 1.0), (p or "").strip())
                  for a, w, p in zip(names, weights, words) if a)
    config = {k: v for k, v in (settings or {}).items() if v is not None}
    return GenerationRequest(prompt=text or "", negative_prompt=neg or "", seed=int(seed_value or 0),
                             steps=int(n_steps), guidance_scale=float(cfg), adapters=picks,
                             composer=composer_name or DEFAULT_COMPOSER, composer_config=config)


def render(services: Services) -> GenerateTab:
    composers = services.generation.list_composers()
    default = DEFAULT_COMPOSER if DEFAULT_COMPOSER in composers else composers[0]
    localises = services.generation.describe_composer(default).adapter_prompts
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen-negative")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="gen-seed")
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="gen-steps")
                    guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="gen-guidance")
                with gr.Row():
                    base = gr.Dropdown([AUTO_BASE, *services.generation.base_choices()], value="",
                                       allow_custom_value=True, label="Base model", scale=3,
                                       info="a video model (AnimateDiff) makes a clip", elem_id="gen-base")
                    frames = gr.Slider(MIN_VIDEO_FRAMES, min(MAX_VIDEO_FRAMES, MAX_FRAMES_SHOWN), value=VIDEO_FRAMES,
                                       step=1, label="Frames (video models)", scale=2, elem_id="gen-frames")
                composer = gr.Dropdown(composers, value=default, label="Composer",
                                       info="how several adapters are combined (a clip mixes them by weight)",
                                       elem_id="gen-composer")
                settings = gr.State({})
                with gr.Accordion("Composer settings", open=False, elem_id="gen-composer-settings"):

                    @gr.render(inputs=[composer])
                    def composer_form(name: str) -> None:
                        description = services.generation.describe_composer(name or default)
                        gr.Markdown(f"_{description.summary}_", elem_id="gen-composer-summary")
                        for field in description.fields:
                            widget = field_input(field)
                            widget.elem_id = f"gen-setting-{field['name']}"
                            widget.change(lambda value, current, key=field["name"]: {**current, key: value},
                                          [widget, settings], settings, api_visibility="undocumented")

                pickers, sliders, concepts = [], [], []
                with gr.Group():
                    gr.Markdown("Adapters")
                    for i in range(ADAPTER_SLOTS):
                        with gr.Row():
                            pickers.append(gr.Dropdown(choices=[], value=None, allow_custom_value=True,
                                                       label=f"Adapter {i + 1}", scale=3,
                                                       elem_id=f"gen-adapter-{i}"))
                            sliders.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2,
                                                     elem_id=f"gen-weight-{i}"))
                            concepts.append(gr.Textbox(value="", label="Concept word (CLoRA)", scale=2,
                                                       placeholder="word(s) of the prompt, e.g. dog",
                                                       visible=localises, elem_id=f"gen-concept-{i}"))
                with gr.Row():
                    refresh = gr.Button("Reload adapter list", size="sm")
                    go = gr.Button("Generate", variant="primary", elem_id="gen-submit")
                with gr.Accordion("Compare composers", open=False, elem_id="gen-compare-box"):
                    compare_pick = gr.CheckboxGroup(
                        composers, value=[c for c in DEFAULT_COMPARE if c in composers], label="Composers",
                        info="the same prompt, seed and adapters through each; the composer chosen above keeps "
                             "its settings, the others run with their defaults", elem_id="gen-compare-composers")
                    compare_go = gr.Button("Compare composers", elem_id="gen-compare-submit")
            with gr.Column(scale=2):
                result = gr.Image(label="Result", type="filepath", interactive=False, elem_id="gen-result")
                video = gr.Video(label="Result (clip)", interactive=False, autoplay=True, loop=True, visible=False,
                                 elem_id="gen-video")
                regions = gr.Image(label="Regions (CLoRA)", type="filepath", interactive=False, visible=localises,
                                   elem_id="gen-regions")
                status = gr.Markdown(elem_id="gen-status")
        compare_gallery = gr.Gallery(label="Composer comparison", columns=5, height="auto", fit_columns=False,
                                     elem_id="gen-compare")
        history = gr.Gallery(label="History", columns=8, height="auto", fit_columns=False, elem_id="gen-history")
        last_image = gr.State(None)

    def path_of(rel: str) -> str:
        return services.catalog.artifact_path(rel).as_posix()

    def adapter_choices():
        choices = [(f"{a.name} ({a.method})", a.id) for a in services.catalog.list_adapters()]
        return [gr.update(choices=choices) for _ in pickers]

    def history_items():
        return [(path_of(img.path), f"{img.prompt[:40]} · seed {img.seed}")
                for img in services.generation.history(limit=32)]

    def on_composer(name: str):
        shown = services.generation.describe_composer(name).adapter_prompts
        return ({}, gr.update(visible=shown), *[gr.update(visible=shown) for _ in concepts])

    def on_generate(text, neg, seed_value, n_steps, cfg, composer_name, *rest):
        """``rest``: the adapter slots, the composer settings, then the base model and frame count (both optional,
        so callers of the API from before video generation keep working)."""
        slots, chosen = rest[:3 * ADAPTER_SLOTS], rest[3 * ADAPTER_SLOTS]
        base_ref, n_frames = (*rest[3 * ADAPTER_SLOTS + 1:], "", VIDEO_FRAMES)[:2]
        try:
            request = _request(text, neg, seed_value, n_steps, cfg, composer_name, slots, chosen)
            job = services.generation.submit(request, base_model=(base_ref or "").strip() or None,
                                             frames=int(n_frames or VIDEO_FRAMES))
        except (ValueError, KeyError) as exc:
            raise error(exc) from None
        services.worker.wake()
        for warning in job.payload.get("warnings", ()):
            gr.Warning(warning)
        yield None, f"queued job `{job.id[:8]}`…", gr.update(), None
        while not (final := services.jobs.get(job.id)).finished:
            p = final.progress
            message = f" · {p.message}" if p.message and final.status == "running" else ""
            yield gr.update(), f"{final.status}: step {p.step}/{p.total_steps or '?'}{message}", gr.update(), None
            time.sleep(POLL_SECONDS)
        if final.status != "succeeded":
            raise gr.Error(f"generation {final.status}: {final.error or ''}")
        image = services.generation.get_image(final.result_ref)
        yield path_of(image.path), generation_status_md(image), history_items(), image.id

    def show_regions(image_id: str | None, composer_name: str):
        shown = services.generation.describe_composer(composer_name).adapter_prompts
        if not image_id:
            return gr.update(visible=shown)
        rel = services.generation.get_image(image_id).regions_path
        return gr.update(value=path_of(rel) if rel else None, visible=shown or rel is not None)

    def show_video(image_id: str | None):
        """The clip's MP4 in the video player (the still result hidden), or the still result alone."""
        rel = video_file(services.generation.get_image(image_id)) if image_id else None
        if rel is None or not rel.endswith(".mp4"):  # a GIF (no MP4 encoder here) plays in the image result
            return gr.update(value=None, visible=False), gr.update(visible=True)
        return gr.update(value=path_of(rel), visible=True), gr.update(visible=False)

    def on_compare(text, neg, seed_value, n_steps, cfg, composer_name, *rest):
        """``rest``: the adapter slots, the composers to compare, the composer settings, then the base model
        (optional)."""
        slots, picked, chosen = rest[:3 * ADAPTER_SLOTS], rest[3 * ADAPTER_SLOTS], rest[3 * ADAPTER_SLOTS + 1]
        base_ref = (rest[3 * ADAPTER_SLOTS + 2] if len(rest) > 3 * ADAPTER_SLOTS + 2 else "") or ""
        if base_ref.strip() and services.generation.is_video_base(base_ref.strip()):
            raise gr.Error("comparing composers is for image models; pick an image base model")
        try:
            request = _request(text, neg, seed_value, n_steps, cfg, composer_name, slots, chosen)
            queued = services.generation.compare(request, list(picked or []))
        except (ValueError, KeyError) as exc:
            raise error(exc) from None
        services.worker.wake()
        for warning in queued[0].payload.get("warnings", ()) if queued else ():
            gr.Warning(warning)
        yield [], f"queued {len(queued)} job(s) to compare…"
        finals = [services.jobs.get(j.id) for j in queued]
        while not all(f.finished for f in finals):
            yield gr.update(), f"comparing: {sum(f.finished for f in finals)}/{len(queued)} done"
            time.sleep(POLL_SECONDS)
            finals = [services.jobs.get(j.id) for j in queued]
        items, failures = [], []
        for final in finals:
            if final.status == "succeeded":
                image = services.generation.get_image(final.result_ref)
                items.append((path_of(image.path), compare_caption(image)))
            else:
                failures.append(f"{final.payload['request']['composer']} {final.status}: {final.error or ''}")
        lines = [f"compared {len(items)} composer(s) · seed {request.seed}"] + [f"⚠️ {f}" for f in failures]
        yield items, "\n\n".join(lines)

    def base_choices():
        return gr.update(choices=[AUTO_BASE, *services.generation.base_choices()])

    form = [prompt, negative, seed, steps, guidance, composer, *pickers, *sliders, *concepts]
    refresh.click(adapter_choices, None, pickers, api_name="adapter_choices")
    refresh.click(base_choices, None, base, api_visibility="undocumented")
    tab.select(adapter_choices, None, pickers, api_visibility="undocumented")  # adapters trained since load
    composer.change(on_composer, composer, [settings, regions, *concepts], api_visibility="undocumented")
    generated = go.click(on_generate, [*form, settings, base, frames], [result, status, history, last_image],
                         concurrency_limit=8, api_name="generate")
    generated.then(show_regions, [last_image, composer], regions, api_visibility="undocumented")
    generated.then(show_video, last_image, [video, result], api_visibility="undocumented")
    compare_go.click(on_compare, [*form, compare_pick, settings, base], [compare_gallery, status], concurrency_limit=8,
                     api_name="compare")
    return GenerateTab(pickers, refresh, result, adapter_choices, history, history_items, regions, compare_gallery,
                       video, base)
