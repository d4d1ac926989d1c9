"""Catalog bookkeeping of orthogonal-adaptation basis slots (paper:2312.02432; methods.md section 2).

Concepts trained with the ``orthogonal`` method are orthogonal to each other only when they use the same base
model, basis seed and rank and DIFFERENT basis slots. This module hands out slots at submission time and warns
when a generation mixes adapters that are not orthogonal.

A slot is taken by every catalog adapter of the method (also one in the trash: restoring it must not create a
clash; the slot is freed when the trash is emptied) and by every queued or running training job. The slot is
written into the job's config, so the adapter's ``training_config`` and file header record it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from core.pipelines import BaseModelSource, hub_cache_dir
from storage import catalog, jobs
from training.methods.orthogonal import DEFAULT_BASIS_SEED, adapted_input_sizes, slot_count, unet_skeleton
from training.presets import preset_config

METHOD = "orthogonal"
_ACTIVE_JOBS = ("queued", "running")
_MAX_ACTIVE_JOBS = 100_000
_PG_LOCK_KEY = 0x0A7B_5107  # serialises slot assignment on PostgreSQL (SQLite: the write lock does it)


def _basis_of(config: Mapping[str, Any] | None) -> tuple[int, int, int] | None:
    """(slot, basis_seed, rank) a config trains with (auto counts as slot 0, as the method trains it); None if
    the config is not readable as one."""
    try:
        config = dict(config or {})
        slot = max(int(config.get("basis_slot", -1)), 0)
        return slot, int(config.get("basis_seed", DEFAULT_BASIS_SEED)), int(config["rank"])
    except (KeyError, TypeError, ValueError):
        return None


def asked_for_auto_slot(kind: str, config: Mapping[str, Any] | None) -> bool:
    """Whether a submission's settings leave ``basis_slot`` to the catalog (-1, the default)."""
    return int(preset_config(METHOD, kind, dict(config or {}))["basis_slot"]) < 0


# capacity ---------------------------------------------------------------------------------------------------


def _unet_config_dir(source: BaseModelSource) -> Path | None:
    """The folder holding the base model's ``unet/config.json``, when it is on this machine."""
    if source.kind in ("builtin", "folder"):
        folder = Path(source.location) / "unet"
        return folder if (folder / "config.json").is_file() else None
    location = source.location if source.kind == "hub" else source.config
    if not location:
        return None
    if Path(location).is_dir():
        folder = Path(location) / "unet"
        return folder if (folder / "config.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(location, "unet/config.json", cache_dir=hub_cache_dir(source.cache_dir))
    except Exception:  # an invalid id or an unreadable cache: unknown here, the worker checks at training time
        return None
    return Path(found).parent if isinstance(found, str) else None


@functools.lru_cache(maxsize=16)
def _input_sizes(folder: str, stamp: int, targets: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(adapted_input_sizes(unet_skeleton(folder), list(targets)).values())


def capacity(source: BaseModelSource, config: Mapping[str, Any]) -> int | None:
    """Slots the base model has for this config's rank and target modules; None when its UNet config is not on
    this machine (the worker then checks the slot when it injects the adapter)."""
    folder = _unet_config_dir(source)
    if folder is None:
        return None
    stamp = (folder / "config.json").stat().st_mtime_ns
    sizes = _input_sizes(str(folder), stamp, tuple(config["target_modules"]))
    return slot_count({str(i): size for i, size in enumerate(sizes)}, int(config["rank"]))


# assignment -------------------------------------------------------------------------------------------------


def used_slots(session: Session, base_model: str, basis_seed: int, rank: int) -> dict[int, list[str]]:
    """Slot → what holds it: catalog adapters (trash included) and queued/running training jobs of the method on
    ``base_model`` with this basis seed and rank."""
    held: dict[int, list[str]] = {}
    for row in catalog.list_adapters(session, include_deleted=True):
        basis = _basis_of(row.training_config) if row.method == METHOD and row.base_model == base_model else None
        if basis is not None and basis[1:] == (basis_seed, rank):
            held.setdefault(basis[0], []).append(row.name + (" (in the trash)" if row.deleted_at else ""))
    for job in jobs.list_jobs(session, limit=_MAX_ACTIVE_JOBS, statuses=_ACTIVE_JOBS):
        p = job.payload or {}
        if job.kind != "train" or p.get("method") != METHOD or p.get("base_model") != base_model:
            continue
        basis = _basis_of(p.get("config"))
        if basis is not None and basis[1:] == (basis_seed, rank):
            held.setdefault(basis[0], []).append(f"training job {p.get('name', job.id)!r}")
    return held


def reserve(session: Session, payload: dict[str, Any], slots: int | None, auto: bool) -> dict[str, Any]:
    """The payload with its basis slot settled: with ``auto``, the lowest slot nothing holds; else the requested
    one, checked against ``slots`` (the base model's capacity, None = unknown). Call it in the transaction that
    queues the job so two submissions cannot take the same slot."""
    config = dict(payload["config"])
    rank, seed, slot = int(config["rank"]), int(config["basis_seed"]), int(config["basis_slot"])
    if slots == 0:
        raise ValueError(f"rank {rank} is larger than the smallest adapted layer of {payload['base_model']!r}: no "
                         "orthogonal basis slot fits; use a smaller rank")
    if not auto:
        if slots is not None and not slot < slots:
            raise ValueError(f"basis_slot {slot} is out of range: rank {rank} on {payload['base_model']!r} allows "
                             f"slots 0 to {slots - 1}")
        return payload
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    held = used_slots(session, payload["base_model"], seed, rank)
    slot = next(s for s in range(len(held) + 1) if s not in held)
    if slots is not None and slot >= slots:
        smaller = f"use a smaller rank (rank {rank // 2} allows at least {2 * slots} slots), " if rank > 1 else ""
        raise ValueError(f"no free orthogonal basis slot: rank {rank} allows {slots} slots on "
                         f"{payload['base_model']!r} (basis seed {seed}) and all are taken by adapters (the trash "
                         f"included) or queued training jobs; {smaller}use another basis seed (not orthogonal to "
                         "these), or empty the trash")
    return {**payload, "config": {**config, "basis_slot": slot}}


# composition ------------------------------------------------------------------------------------------------


def composition_warnings(picks: Iterable[tuple[Any, float]]) -> list[str]:
    """Warnings for a mix of adapters (objects with ``id``, ``name``, ``method``, ``base_model``,
    ``training_config``) with weights: orthogonal adapters sharing a basis slot, or orthogonal adapters whose
    basis seeds or ranks differ. Adapters with weight 0 do not count. Never raises."""
    seen: set[str] = set()
    bases: dict[tuple[str, int, int], dict[int, list[str]]] = {}
    for adapter, weight in picks:
        if adapter.method != METHOD or not weight or adapter.id in seen:
            continue
        seen.add(adapter.id)
        basis = _basis_of(adapter.training_config)
        if basis is None:
            continue
        slot, seed, rank = basis
        bases.setdefault((adapter.base_model, seed, rank), {}).setdefault(slot, []).append(adapter.name)
    warnings = []
    for (_, seed, rank), slots in bases.items():
        for slot, names in sorted(slots.items()):
            if len(names) > 1:
                warnings.append(f"{' and '.join(names)} share orthogonal basis slot {slot} (basis seed {seed}, rank "
                                f"{rank}): their updates are not orthogonal and may interfere when merged; retrain "
                                "one with basis_slot -1 to get a free slot")
    if len(bases) > 1:
        groups = "; ".join(f"{', '.join(n for names in slots.values() for n in names)}: basis seed {seed}, rank {rank}"
                           for (_, seed, rank), slots in bases.items())
        warnings.append(f"orthogonal adapters with different basis seeds or ranks are mixed ({groups}): they are "
                        "not guaranteed orthogonal to each other; concepts meant to merge need the same rank and "
                        "basis seed")
    return warnings
