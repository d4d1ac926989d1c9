"""Gallery tab: adapter cards with previews and metadata; search, tags, rename, delete/restore, download, kohya
export, and import of kohya/diffusers/peft LoRA files (queued as an ``import`` job and followed to its end).

A motion adapter's preview is a clip (an animated PNG, or a GIF): its card plays it, and the selected adapter's
preview is shown larger beside its details."""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from app.formatting import adapter_caption, adapter_detail_md
from app.widgets import error
from services.container import Services

POLL_SECONDS = 0.25  # how often a running import job is looked at
MOTION_KIND = "motion"


@dataclass(frozen=True)
class GalleryTab:
    cards: gr.Gallery
    refresh: gr.Button


def render(services: Services, placeholder: str) -> GalleryTab:
    with gr.Tab("Gallery", id="gallery") as tab:
        with gr.Row():
            search = gr.Textbox(label="Search", placeholder="name, trigger word, method or tag", scale=3,
                                elem_id="gallery-search")
            show_trash = gr.Checkbox(label="Show deleted", value=False, scale=1)
            refresh = gr.Button("Refresh", scale=1, elem_id="gallery-refresh")
        cards = gr.Gallery(label="Adapters", columns=6, height="auto", allow_preview=False, fit_columns=False,
                           elem_id="gallery-cards")
        ids = gr.State([])
        chosen = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                detail = gr.Markdown("Select an adapter to see its details.", elem_id="gallery-detail")
                preview = gr.Image(label="Preview", type="filepath", interactive=False, height=256, visible=False,
                                   elem_id="gallery-preview")
            with gr.Column(scale=1):
                new_name = gr.Textbox(label="Rename to", elem_id="gallery-rename")
                rename = gr.Button("Rename")
                tags = gr.Textbox(label="Tags (comma-separated)", elem_id="gallery-tags")
                save_tags = gr.Button("Save tags")
                download = gr.DownloadButton("Download .safetensors", visible=False, elem_id="gallery-download")
                export = gr.Button("Export (kohya)", visible=False, elem_id="gallery-export")
                exported = gr.DownloadButton("Download kohya file", visible=False, elem_id="gallery-export-download")
                delete = gr.Button("Delete…", variant="stop", elem_id="gallery-delete")
                with gr.Row(visible=False) as confirm_row:
                    confirm = gr.Button("Yes, move to trash", variant="stop", elem_id="gallery-confirm-delete")
                    keep = gr.Button("Keep it")
                restore = gr.Button("Restore from trash", visible=False, elem_id="gallery-restore")
        with gr.Accordion("Import a LoRA file (kohya, diffusers or peft .safetensors)", open=False):
            with gr.Row():
                upload = gr.File(label="LoRA file", file_types=[".safetensors"], type="filepath",
                                 elem_id="gallery-import-file")
                with gr.Column():
                    import_name = gr.Textbox(label="Name", placeholder="default: the file name",
                                             elem_id="gallery-import-name")
                    import_kind = gr.Dropdown(["from file", "subject", "style"], value="from file", label="Kind")
                    import_trigger = gr.Textbox(label="Trigger word", placeholder="default: from the file")
                    import_button = gr.Button("Import", variant="primary", elem_id="gallery-import")
            import_status = gr.Markdown(elem_id="gallery-import-status")

    def load(query: str, trash: bool):
        adapters = services.catalog.list_adapters(search=query or None, include_deleted=trash)
        items = [(services.catalog.artifact_path(a.preview_paths[0]).as_posix()
                  if a.preview_paths else placeholder, adapter_caption(a)) for a in adapters]
        return items, [a.id for a in adapters]

    def preview_of(a) -> dict:
        """The adapter's preview, as on its card (played when it is a clip: motion adapters); hidden without one."""
        if not a.preview_paths:
            return gr.update(visible=False, value=None)
        label = "Preview (clip)" if a.kind == MOTION_KIND else "Preview"
        path = services.catalog.artifact_path(a.preview_paths[0]).as_posix()
        return gr.update(visible=True, label=label, value=path)

    def show(adapter_id: str | None):
        hidden = gr.update(visible=False)
        if not adapter_id:
            return ("Select an adapter to see its details.", "", "", hidden, hidden, hidden, hidden, hidden, hidden)
        a = services.catalog.get_adapter(adapter_id)
        deleted = a.deleted
        file_path = str(services.catalog.adapter_file(adapter_id))
        return (adapter_detail_md(a) + ("\n\n**In the trash.**" if deleted else ""), a.name, ", ".join(a.tags),
                gr.update(visible=True, value=file_path), gr.update(visible=not deleted),
                gr.update(visible=deleted), gr.update(visible=not deleted), hidden, preview_of(a))

    def export_kohya(adapter_id: str | None):
        if not adapter_id:
            raise gr.Error("select an adapter first")
        try:
            result = services.interchange.export_for_download(adapter_id)
        except (ValueError, KeyError) as exc:
            raise error(exc) from None
        if result.note:
            gr.Info(result.note)
        label = "Download kohya file" if result.format == "kohya" else "Download native file"
        return gr.update(visible=True, value=str(result.path), label=label)

    def import_file(path: str | None, name: str, kind: str, trigger: str):
        """Queue an import job for the upload, then follow it until the worker is done with it."""
        if not path:
            raise gr.Error("choose a .safetensors LoRA file first")
        try:
            job = services.interchange.submit_import(
                path, name=name.strip() or None, kind=None if kind == "from file" else kind,
                trigger=trigger.strip() or None)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise error(exc) from None
        services.worker.wake()
        yield f"queued import job `{job.id[:8]}`…", gr.update()
        while not (final := services.jobs.get(job.id)).finished:
            message = f": {final.progress.message}" if final.progress.message else ""
            yield f"import {final.status}{message}", gr.update()
            time.sleep(POLL_SECONDS)
        if final.status != "succeeded":
            raise gr.Error(f"import {final.status}: {final.error or final.progress.message or ''}")
        adapter = services.catalog.get_adapter(final.result_ref)
        config = adapter.training_config
        yield (f"Imported **{adapter.name}** ({config['format']} LoRA, {config['layers']} layers, rank "
               f"{adapter.rank}).", None)

    def pick(adapter_ids: list[str], evt: gr.SelectData):
        return adapter_ids[evt.index] if 0 <= evt.index < len(adapter_ids) else None

    def guarded(fn):
        def run(adapter_id, *args):
            if not adapter_id:
                raise gr.Error("select an adapter first")
            try:
                fn(adapter_id, *args)
            except (ValueError, KeyError) as exc:
                raise error(exc) from None
            return adapter_id
        return run

    detail_outputs = [detail, new_name, tags, download, delete, restore, export, exported, preview]
    refresh_outputs = [cards, ids]
    search.submit(load, [search, show_trash], refresh_outputs)
    refresh.click(load, [search, show_trash], refresh_outputs, api_name="list_adapters")
    tab.select(load, [search, show_trash], refresh_outputs, api_visibility="undocumented")
    show_trash.change(load, [search, show_trash], refresh_outputs)
    cards.select(pick, ids, chosen).then(show, chosen, detail_outputs)
    rename.click(guarded(services.catalog.rename), [chosen, new_name], chosen).then(
        show, chosen, detail_outputs).then(load, [search, show_trash], refresh_outputs)
    save_tags.click(guarded(services.catalog.set_tags), [chosen, tags], chosen).then(show, chosen, detail_outputs)
    delete.click(lambda: gr.update(visible=True), None, confirm_row)
    keep.click(lambda: gr.update(visible=False), None, confirm_row)
    confirm.click(guarded(services.catalog.delete), chosen, chosen).then(
        lambda: gr.update(visible=False), None, confirm_row).then(show, chosen, detail_outputs).then(
        load, [search, show_trash], refresh_outputs)
    restore.click(guarded(services.catalog.restore), chosen, chosen).then(show, chosen, detail_outputs).then(
        load, [search, show_trash], refresh_outputs)
    export.click(export_kohya, chosen, exported)
    import_button.click(import_file, [upload, import_name, import_kind, import_trigger], [import_status, upload]).then(
        load, [search, show_trash], refresh_outputs)
    return GalleryTab(cards, refresh)
