"""Widgets generated from a config description (``BaseConfig.describe()``): one input per field."""

from __future__ import annotations

from typing import Any

import gradio as gr


def field_input(field: dict[str, Any]) -> gr.components.Component:
    label = field["name"].replace("_", " ")
    info = field["help"] or None
    default = field["default"]
    if field["choices"]:
        return gr.Dropdown(choices=list(field["choices"]), value=default, label=label, info=info)
    if field["type"] == "bool":
        return gr.Checkbox(value=bool(default), label=label, info=info)
    if field["type"] in ("int", "float"):
        return gr.Number(value=default, label=label, info=info, minimum=field["min"], maximum=field["max"],
                         precision=0 if field["type"] == "int" else None)
    if field["type"] in ("list", "tuple"):
        return gr.Textbox(value=", ".join(map(str, default or [])), label=label, info=info)
    return gr.Textbox(value="" if default is None else str(default), label=label, info=info)


def error(exc: Exception) -> gr.Error:
    """Show a service error to the user as a readable message (KeyError repr quotes are dropped)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return gr.Error(message)
