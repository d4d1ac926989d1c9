"""Jobs tab: the live queue with progress bars; one job's loss curve, preview (played when it is a clip, as a
motion job's are) and log; cancel, retry, move to top, save now and sample now."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
import pandas as pd

from app.formatting import job_detail_md, job_log_text, job_table_html, short
from app.widgets import error
from services.container import Services

REFRESH_SECONDS = 1.0


@dataclass(frozen=True)
class JobsTab:
    table: gr.HTML
    selected: gr.Dropdown


def render(services: Services) -> JobsTab:
    with gr.Tab("Jobs", id="jobs"):
        table = gr.HTML(elem_id="jobs-table")
        with gr.Row():
            selected = gr.Dropdown(label="Job", choices=[], allow_custom_value=True, elem_id="jobs-selected")
            cancel = gr.Button("Cancel job", variant="stop", elem_id="jobs-cancel")
            retry = gr.Button("Retry", elem_id="jobs-retry")
            top = gr.Button("Move to top", elem_id="jobs-top")
            save_now = gr.Button("Save now", elem_id="jobs-save-now")
            sample_now = gr.Button("Sample now", elem_id="jobs-sample-now")
        detail = gr.Markdown(elem_id="jobs-detail")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", height=240, elem_id="jobs-loss")
            preview = gr.Image(label="Latest preview", type="filepath", height=240, interactive=False,
                               elem_id="jobs-preview")
        log = gr.Textbox(label="Log", lines=8, max_lines=20, interactive=False, elem_id="jobs-log")
        timer = gr.Timer(REFRESH_SECONDS)

    def refresh(current: str | None):
        jobs = services.jobs.list_jobs(limit=100)
        choices = [(f"{short(j.id)} · {j.title} · {j.status}", j.id) for j in jobs]
        if current not in {j.id for j in jobs}:
            running = [j for j in jobs if j.status == "running"]
            current = (running or jobs)[0].id if jobs else None
        job = next((j for j in jobs if j.id == current), None)
        if job is None:
            return job_table_html(jobs), gr.update(choices=choices, value=None), "", None, None
        curve = pd.DataFrame({"step": list(range(1, len(job.losses) + 1)), "loss": list(job.losses)})
        clip = job.payload.get("kind") == "motion"  # its previews are clips (animated PNGs): the image plays them
        preview_update = gr.update(value=job.progress.preview_path,
                                   label="Latest preview (clip)" if clip else "Latest preview")
        return (job_table_html(jobs), gr.update(choices=choices, value=current), job_detail_md(job), curve,
                preview_update)

    def job_log(job_id: str | None) -> str:
        if not job_id:
            return ""
        try:
            return job_log_text(services.jobs.get(job_id))
        except KeyError:
            return ""

    def action(operation, done: str):
        def run(job_id: str | None) -> None:
            if not job_id:
                raise gr.Error("pick a job first")
            try:
                outcome = operation(job_id)
            except (ValueError, KeyError) as exc:
                raise error(exc) from None
            gr.Info(f"job {short(job_id)}: {outcome if isinstance(outcome, str) else done}")
        return run

    outputs = [table, selected, detail, loss_plot, preview]
    timer.tick(refresh, selected, outputs, show_progress="hidden", api_visibility="undocumented")
    timer.tick(job_log, selected, log, show_progress="hidden", api_visibility="undocumented")
    selected.input(refresh, selected, outputs, show_progress="hidden", api_name="job_status")
    selected.input(job_log, selected, log, show_progress="hidden", api_name="job_log")
    cancel.click(action(services.jobs.cancel, "cancel requested"), selected, None, api_name="cancel_job")
    retry.click(action(services.jobs.retry, "queued again"), selected, None, api_name="retry_job")
    top.click(action(services.jobs.move_to_top, "moved to the top of the queue"), selected, None,
              api_name="move_job_to_top")
    save_now.click(action(services.jobs.save_now, "checkpoint requested"), selected, None, api_name="save_now")
    sample_now.click(action(services.jobs.sample_now, "preview requested"), selected, None, api_name="sample_now")
    return JobsTab(table, selected)
