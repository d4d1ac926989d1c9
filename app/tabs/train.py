"""Train tab: upload images (or clips, for a motion), name the concept, pick a method and its settings, queue the
job. Picking the kind ``motion`` switches the upload to clips and the method to the video method when it is
registered."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from app.widgets import error, field_input
from services.container import Services

MAIN_FIELDS = ("rank", "max_steps")
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".txt", ".zip"]
CLIP_TYPES = [".mp4", ".m4v", ".mov", ".webm", ".mkv", ".gif"]
KINDS = ["subject", "style", "motion"]
MOTION_KIND = "motion"
MOTION_METHOD = "motion_director"
IMAGES_LABEL = "Images (png, jpg, webp), .txt captions or a .zip"
CLIPS_LABEL = ("Clips (mp4, webm, animated gif) or folders of frames in a .zip; a caption per clip as "
               "<clip>.txt")


@dataclass(frozen=True)
class TrainTab:
    submit: gr.Button
    status: gr.Markdown


def _defaults(services: Services, method: str, kind: str = "subject") -> dict:
    return {f["name"]: f["default"] for f in services.training.describe_method(method, kind).fields}


def _preset_note(services: Services, method: str, kind: str) -> str:
    description = services.training.describe_method(method, kind)
    return f"**Preset for a {kind}:** {description.preset}. Every setting below can be changed."


def render(services: Services) -> TrainTab:
    methods = services.training.list_methods()
    default_method = "lora" if "lora" in methods else methods[0]
    defaults = _defaults(services, default_method)
    with gr.Tab("Train", id="train"):
        gr.Markdown("Upload a few images of one subject or style, name it, and queue a training job. "
                    "Captions can sit beside images as `name.txt` (kohya style), also inside a zip.")
        files = gr.File(label=IMAGES_LABEL, file_count="multiple", file_types=UPLOAD_TYPES + CLIP_TYPES,
                        elem_id="train-files")
        with gr.Row():
            name = gr.Textbox(label="Concept name", placeholder="my-dog", elem_id="train-name")
            trigger = gr.Textbox(label="Trigger word", value="sks", info="rare token that calls up a subject",
                                 elem_id="train-trigger")
            kind = gr.Radio(KINDS, value="subject", label="Kind", info="a motion is learnt from video clips",
                            elem_id="train-kind")
        with gr.Row():
            method = gr.Dropdown(methods, value=default_method, label="Method", elem_id="train-method")
            steps = gr.Number(value=defaults.get("max_steps", 200), precision=0, minimum=1, label="Steps",
                              elem_id="train-steps")
            rank = gr.Number(value=defaults.get("rank", 8), precision=0, minimum=1, label="Rank",
                             elem_id="train-rank")
        preset_note = gr.Markdown(_preset_note(services, default_method, "subject"), elem_id="train-preset")
        advanced = gr.State({})
        with gr.Accordion("Advanced settings", open=False):

            @gr.render(inputs=[method, kind])
            def method_form(method_name: str, concept_kind: str) -> None:
                description = services.training.describe_method(method_name, concept_kind)
                gr.Markdown(f"_{description.summary}_")
                for field in description.fields:
                    if field["name"] in MAIN_FIELDS:
                        continue
                    widget = field_input(field)
                    widget.change(lambda value, current, key=field["name"]: {**current, key: value},
                                  [widget, advanced], advanced)

        def on_method_or_kind(method_name: str, concept_kind: str):
            description = services.training.describe_method(method_name, concept_kind)
            values = {f["name"]: f["default"] for f in description.fields}
            return ({}, gr.update(value=values.get("max_steps")),
                    gr.update(value=values.get("rank"), visible=description.uses_rank),
                    _preset_note(services, method_name, concept_kind))

        def on_kind(concept_kind: str, method_name: str):
            """Clips and the video method for a motion; images (and the default method again) otherwise."""
            motion = concept_kind == MOTION_KIND
            if motion and MOTION_METHOD in methods:
                method_name = MOTION_METHOD
            elif not motion and method_name == MOTION_METHOD:
                method_name = default_method
            return gr.update(value=method_name), gr.update(label=CLIPS_LABEL if motion else IMAGES_LABEL)

        kind.change(on_kind, [kind, method], [method, files], api_visibility="undocumented")
        for trigger_widget in (method, kind):
            trigger_widget.change(on_method_or_kind, [method, kind], [advanced, steps, rank, preset_note])
        submit = gr.Button("Queue training", variant="primary", elem_id="train-submit")
        status = gr.Markdown(elem_id="train-status")

    def on_submit(uploaded, concept, trigger_word, concept_kind, method_name, n_steps, r, extra):
        motion = concept_kind == MOTION_KIND
        if not uploaded:
            raise gr.Error("upload at least one clip first" if motion else "upload at least one image first")
        try:
            config = {k: v for k, v in (extra or {}).items() if v is not None and v != ""}
            config["max_steps"] = int(n_steps or 0)
            if services.training.describe_method(method_name, concept_kind).uses_rank:
                config["rank"] = int(r or 0)
            dataset, job = services.train_from_upload(
                list(uploaded), name=concept or "", method=method_name, kind=concept_kind,
                trigger_word=trigger_word if concept_kind == "subject" else "", config=config)
        except (ValueError, KeyError) as exc:
            raise error(exc) from None
        items = "clip(s)" if motion else "image(s)"
        lines = [f"Queued **{job.title}** (job `{job.id[:8]}`) with {dataset.image_count} {items}. "
                 "Follow it in the Jobs tab."]
        lines += [f"- skipped {r}" for r in dataset.rejected]
        return "\n".join(lines)

    submit.click(on_submit, [files, name, trigger, kind, method, steps, rank, advanced], status,
                 concurrency_limit=4, api_name="train")
    return TrainTab(submit, status)
