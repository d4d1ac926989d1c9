"""What a trained adapter file carries besides its tensors, and loading one back by its method name."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

import training.methods  # noqa: F401  (registers the methods)
from core.config import BaseConfig
from training.base import METHODS, AttachedAdapter

PREFIX = "lorastudio."
METHOD_KEY = PREFIX + "method"
FORMAT_VERSION = "1"


def adapter_file_metadata(method_name: str, config: BaseConfig | Mapping[str, Any], base_model_ref: str,
                          base_model_hash: str, trigger_words: Iterable[str], kind: str, steps: int,
                          method_metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """The safetensors header of an adapter file: all strings, ``lorastudio.*`` keys plus ``format: pt``.

    ``method_metadata`` (``Method.adapter_metadata()``) is merged in; its keys may not collide with ours.
    """
    if method_name not in METHODS:
        METHODS.get(method_name)  # raises KeyError listing the known methods
    config_dict = config.to_dict() if isinstance(config, BaseConfig) else dict(config)
    ours = {
        "format": "pt",
        PREFIX + "format_version": FORMAT_VERSION,
        METHOD_KEY: method_name,
        PREFIX + "config": json.dumps(config_dict, sort_keys=True),
        PREFIX + "base_model": str(base_model_ref),
        PREFIX + "base_model_hash": str(base_model_hash),
        PREFIX + "trigger_words": json.dumps([str(w) for w in trigger_words]),
        PREFIX + "kind": str(kind),
        PREFIX + "steps": str(int(steps)),
    }
    if "rank" in config_dict and config_dict["rank"] is not None:
        ours[PREFIX + "rank"] = str(config_dict["rank"])
    extra = dict(method_metadata or {})
    bad = [k for k, v in extra.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"method metadata values must be strings: {bad}")
    clash = sorted(k for k in extra if k in ours and extra[k] != ours[k])
    if clash:
        raise ValueError(f"method metadata would overwrite {', '.join(clash)}")
    return {**extra, **ours}


def method_name_of(metadata: Mapping[str, str]) -> str:
    name = metadata.get(METHOD_KEY)
    if not name:
        raise ValueError(f"not a LoRA Studio adapter: the file header has no {METHOD_KEY!r} entry")
    return name


def load_adapter(pipe: Any, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str],
                 name: str) -> AttachedAdapter:
    """Attach a saved adapter to ``pipe`` as ``name`` with the method named in its header.

    Raises ``ValueError`` for an unknown method or tensors that do not fit the base model (nothing is applied).
    """
    method_name = method_name_of(metadata)
    if method_name not in METHODS:
        known = ", ".join(METHODS.names())
        raise ValueError(f"adapter was trained with unknown method {method_name!r}; known: {known}")
    method = METHODS.get(method_name)
    return method.attach(pipe, tensors, metadata, name)
