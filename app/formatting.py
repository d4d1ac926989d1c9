"""Pure helpers turning DTOs into what widgets display (HTML is always escaped)."""

from __future__ import annotations

import html
from datetime import datetime

from core.types import AdapterInfo, ImageInfo, JobInfo


def short(job_id: str) -> str:
    return job_id[:8]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "–"


def job_table_html(jobs: list[JobInfo]) -> str:
    """The live job list: one row a job with a progress bar."""
    if not jobs:
        return "<p class='ls-empty'>No jobs yet. Submit one from the Train or Generate tab.</p>"
    rows = []
    for job in jobs:
        p = job.progress
        pct = int(round(100 * p.fraction)) if job.status != "succeeded" else 100
        loss = f"{p.loss:.4f}" if p.loss is not None else "–"
        speed = f"{p.it_per_s:.2f} it/s" if p.it_per_s else "–"
        eta = duration(p.eta_s) if job.status == "running" else "–"
        rows.append(
            f"<tr data-job='{html.escape(job.id)}' class='ls-{html.escape(job.status)}'>"
            f"<td><code>{html.escape(short(job.id))}</code></td><td>{html.escape(job.title)}</td>"
            f"<td>{html.escape(job.status)}</td>"
            f"<td><progress max='100' value='{pct}'></progress> {p.step}/{p.total_steps or '?'}</td>"
            f"<td>{loss}</td><td>{speed}</td><td>{eta}</td></tr>"
        )
    head = ("<tr><th>job</th><th>what</th><th>status</th><th>progress</th><th>loss</th><th>speed</th>"
            "<th>ETA</th></tr>")
    return f"<table class='ls-jobs'>{head}{''.join(rows)}</table>"


def job_detail_md(job: JobInfo) -> str:
    p = job.progress
    lines = [
        f"**{job.title}** — `{job.id}`",
        f"status **{job.status}**, step {p.step}/{p.total_steps or '?'}"
        + (f", loss {p.loss:.4f}" if p.loss is not None else "")
        + (f", {p.it_per_s:.2f} it/s" if p.it_per_s else "")
        + (f", ETA {duration(p.eta_s)}" if job.status == "running" and p.eta_s is not None else ""),
        f"created {when(job.created_at)}, started {when(job.started_at)}, finished {when(job.finished_at)}",
        f"priority {job.priority}, attempt {job.attempts} of {job.max_attempts}"
        + (f", worker `{job.worker_id}`" if job.worker_id else "")
        + (", save requested" if job.save_now else "") + (", sample requested" if job.sample_now else ""),
    ]
    if p.message:
        lines.append(f"_{p.message}_")
    if job.error:
        lines.append(f"**error:** {job.error}")
    return "\n\n".join(lines)


def job_log_text(job: JobInfo) -> str:
    """The job's log, one ``time  message`` line per event; the error is always shown."""
    lines = [f"{stamp}  {text}" for stamp, text in job.log]
    if job.error and not any(job.error in text for _, text in job.log):
        lines.append(f"error: {job.error}")
    return "\n".join(lines)


def adapter_caption(a: AdapterInfo) -> str:
    return f"{a.name} · {a.method} · {a.kind}"


def adapter_detail_md(a: AdapterInfo) -> str:
    size_kb = a.file_size / 1024
    tags = ", ".join(a.tags) or "–"
    triggers = ", ".join(a.trigger_words) or "–"
    return "\n".join([
        f"### {a.name}",
        f"- **method** {a.method} · **kind** {a.kind} · **rank** {a.rank or '–'} · **steps** {a.steps}",
        f"- **trigger words** {triggers}",
        f"- **base model** `{a.base_model}` (hash `{a.base_model_hash}`)",
        f"- **file** {size_kb:.1f} KiB, sha256 `{a.sha256[:16]}…`",
        f"- **tags** {tags}",
        f"- **created** {when(a.created_at)} · **updated** {when(a.updated_at)}",
        f"- **id** `{a.id}`",
    ])


def _text(value: str) -> str:
    """Escape ``<``, ``>`` and ``&`` in text shown as Markdown (quotes stay readable)."""
    return html.escape(value, quote=False)


def image_seconds(image: ImageInfo) -> float | None:
    """Seconds the image took to sample and decode (older records: the whole job)."""
    value = image.params.get("sample_seconds", image.params.get("seconds"))
    return float(value) if value is not None else None


def compare_caption(image: ImageInfo) -> str:
    """``<composer> · <seconds> s`` under an image of a composer comparison."""
    seconds = image_seconds(image)
    return f"{image.composer} · {seconds:.2f} s" if seconds is not None else image.composer


def generation_status_md(image: ImageInfo) -> str:
    """The Generate tab's status line for a finished image: time, seed, adapters, CLoRA's region colours, notes."""
    seconds = image.params.get("seconds")
    head = f"done in {seconds:.2f} s" if seconds is not None else "done"
    lines = [f"{head} · seed {image.seed} · {len(image.adapters)} adapter(s) · {_text(image.composer)}"]
    legend = (image.params.get("regions") or {}).get("legend") or []
    if legend:
        parts = [f"{_text(str(e.get('colour')))} = {_text(str(e.get('name')))}"
                 + (f" ({_text(str(e['concept']))})" if e.get("concept") else "") for e in legend]
        lines.append("Regions: " + ", ".join(parts))
    lines += [f"⚠️ {_text(note)}" for note in image.notes]
    return "\n\n".join(lines)
