"""The import rule: app → services → training | composition | storage → core, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "services", "training", "composition", "storage", "core")
ALLOWED = {
    "core": set(),
    "storage": {"core"},
    "training": {"core"},
    "composition": {"core"},
    "services": {"core", "storage", "training", "composition"},
    "app": {"core", "services"},
}
BANNED_IN_APP = {"torch", "diffusers", "sqlalchemy", "peft", "transformers"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import (use absolute imports)")
            names.add((node.module or "").split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    for path in _modules(package):
        project_imports = (_imports(path) & set(PACKAGES)) - {package}
        illegal = project_imports - ALLOWED[package]
        assert not illegal, f"{path.relative_to(ROOT)} imports {sorted(illegal)}; {package} may use {ALLOWED[package]}"


def test_app_stays_free_of_heavy_libraries() -> None:
    for path in _modules("app"):
        heavy = _imports(path) & BANNED_IN_APP
        assert not heavy, f"{path.relative_to(ROOT)} imports {sorted(heavy)}; the UI goes through services"


def test_every_module_imports() -> None:
    import importlib

    for package in PACKAGES:
        for path in _modules(package):
            if "migrations" in path.parts:  # Alembic runs these itself, inside a migration context
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            importlib.import_module(module)
