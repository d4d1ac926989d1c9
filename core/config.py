"""Self-documenting dataclass configs: help text in field metadata, strict ``from_dict``."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

C = TypeVar("C", bound="BaseConfig")


@dataclasses.dataclass
class BaseConfig:
    """Base for method and composer configs.

    Each field carries ``metadata={"help": ..., "min": ..., "max": ..., "choices": [...]}``; the help is shown
    as the tooltip in the UI and in ``--help``. ``validate`` raises ``ValueError`` naming the field.
    """

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        data = dict(data or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {name: _coerce(name, hints[name], value) for name, value in data.items()}
        config = cls(**kwargs)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
            if lo is not None and value is not None and value < lo:
                raise ValueError(f"{f.name} must be >= {lo}, got {value}")
            if hi is not None and value is not None and value > hi:
                raise ValueError(f"{f.name} must be <= {hi}, got {value}")
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """Field descriptions for generated forms: name, type, default, help, bounds and choices."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            out.append(
                {
                    "name": f.name,
                    "type": _base_type(hints[f.name]).__name__,
                    "default": default,
                    "help": f.metadata.get("help", ""),
                    "min": f.metadata.get("min"),
                    "max": f.metadata.get("max"),
                    "choices": f.metadata.get("choices"),
                    "advanced": bool(f.metadata.get("advanced", False)),
                }
            )
        return out


def _base_type(hint: Any) -> type:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is not None:
        return origin
    return hint


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Accept the obvious string and numeric spellings (form fields), refuse the rest with a clear error."""
    if value is None:
        return None
    target = _base_type(hint)
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
        if target in (list, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return target(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be of type {target.__name__}, got {value!r}") from None
    return value
