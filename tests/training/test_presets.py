"""Presets: every preset is a valid config of its method, differs by kind, and user settings win over it."""

from __future__ import annotations

import pytest

import training.methods  # noqa: F401  (registers the methods)
from training.base import METHODS
from training.presets import preset_config, preset_for, presets


def test_every_registered_method_has_a_valid_preset_per_kind() -> None:
    for name in METHODS.names():
        for kind in ("subject", "style"):
            preset = preset_for(name, kind)
            assert preset.summary
            config = preset_config(name, kind)  # validates through the method's config class
            for key, value in preset.settings.items():
                assert config[key] == value, (name, kind, key)


def test_subject_and_style_presets_differ_and_style_flips() -> None:
    for preset in presets():
        other = preset_for(preset.method, "style" if preset.kind == "subject" else "subject")
        assert preset.settings != other.settings
        if preset.kind == "style":
            assert preset.settings.get("flip") is True
        else:
            assert preset.settings.get("flip") is False


def test_overrides_win_and_are_validated() -> None:
    assert preset_config("lora", "style", {"rank": 4})["rank"] == 4
    assert preset_config("lora", "style")["rank"] == 16
    with pytest.raises(ValueError, match="rank"):
        preset_config("lora", "subject", {"rank": 0})
    with pytest.raises(ValueError, match="unknown"):
        preset_config("lora", "subject", {"no_such_setting": 1})


def test_unknown_method_is_refused() -> None:
    with pytest.raises(KeyError):
        preset_for("nope", "subject")
