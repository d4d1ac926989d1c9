"""Use cases: export a catalog adapter as a kohya ``.safetensors`` file, import a kohya/diffusers/peft LoRA file.

The tensor conversion is ``training.interchange``; this module reads and writes the files and the catalog.
An import is a queued job (kind ``import``): :meth:`InterchangeService.submit_import` checks what needs no model
and stores the upload under ``jobs/<id>/``, the worker that owns the device runs
:meth:`InterchangeService.run_import_job`. Formats: ``docs/formats.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

import training.methods  # noqa: F401  (registers every training method)
from core.io import BadWeightsFile, atomic_write_bytes, load_safetensors, sha256_file
from core.types import CONCEPT_KINDS, AdapterInfo, JobInfo
from services.adapter_records import NewAdapter, job_adapter_id, record_adapter
from services.runtime import ModelRuntime
from services.worker import JobReporter
from storage import catalog, jobs
from storage.artifacts import ArtifactStore
from storage.db import new_id, writing
from storage.uploads import sanitize_filename
from training.artifact import adapter_file_metadata
from training.base import METHODS
from training.interchange import PRECISIONS, ExportInfo, detect_format, header_hints, import_lora, kohya_file_bytes

EXPORT_FORMATS = ("kohya", "native")
MAX_IMPORT_BYTES = 2 * 2**30  # the largest LoRA file accepted (an SDXL LoRA of rank 256 in fp16 is about 1.7 GiB)
_NAME = re.compile(r"^[\w][\w .\-]{0,63}$")  # the same rule as names of trained adapters
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04")  # a raw pickle, or the zip container of torch.save
IMPORT_FILE = "import.safetensors"  # an import job's copy of the upload, under jobs/<job id>/


@dataclass(frozen=True)
class ExportResult:
    """Where the file went, the format actually written and, when it differs from the one asked for, why."""

    path: Path
    format: str
    layers: int
    note: str = ""


def _check_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name):
        raise ValueError("adapter name must be 1-64 letters, digits, spaces, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def _default_name(display_name: str) -> str:
    """An adapter name made from a sanitized file name (its stem, with anything unusual replaced)."""
    stem = Path(sanitize_filename(display_name)).stem
    name = re.sub(r"[^\w .\-]", "_", stem).lstrip(" ._-")[:64].rstrip()
    return name or "imported"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "adapter"


def _sniff(path: Path, display_name: str, max_bytes: int) -> None:
    """Refuse, before anything is parsed, files that are missing, empty, too big or are pickles."""
    suffix = Path(display_name).suffix.lower()
    if suffix in _PICKLE_SUFFIXES:
        raise ValueError(f"{display_name}: {suffix} files are pickles, which can run code when opened, so they are "
                         "never loaded; convert the LoRA to .safetensors first")
    if suffix != ".safetensors":
        raise ValueError(f"{display_name}: only .safetensors LoRA files can be imported")
    if not path.is_file():
        raise FileNotFoundError(f"{display_name}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{display_name}: the file is empty")
    if size > max_bytes:
        raise ValueError(f"{display_name}: {size / 2**20:.0f} MiB is over the import limit of "
                         f"{max_bytes / 2**20:.0f} MiB")
    with path.open("rb") as fh:
        head = fh.read(9)
    if head.startswith(_PICKLE_MAGICS):
        raise ValueError(f"{display_name}: this is a pickle (PyTorch .pt/.ckpt) file named .safetensors; it was "
                         "not opened")
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{display_name}: not a valid .safetensors file")


def _read_header(path: Path, shown: str) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a ``.safetensors`` file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys()), dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a bad header
        raise ValueError(f"{shown}: not a valid .safetensors file ({exc})") from None


def _base_hint(hints: dict[str, Any], base: str) -> str:
    other = hints.get("base_model")
    if other and other != base:
        return f" (the file says it was made for base model {other!r}; this import checked it against {base!r})"
    return ""


@dataclass(frozen=True)
class _ImportPlan:
    """An import's settings, decided before any model is loaded; an import job's payload holds them."""

    shown: str  # the sanitized file name, only ever shown
    name: str
    kind: str
    triggers: list[str]
    base: str
    alpha: float | None
    steps: int
    base_hint: str = ""

    def payload(self) -> dict[str, Any]:
        return {"file_name": self.shown, "name": self.name, "kind": self.kind, "trigger_words": self.triggers,
                "base_model": self.base, "alpha": self.alpha, "steps": self.steps, "base_hint": self.base_hint}

    @classmethod
    def from_payload(cls, p: dict[str, Any]) -> _ImportPlan:
        return cls(p["file_name"], p["name"], p["kind"], list(p["trigger_words"]), p["base_model"], p["alpha"],
                   int(p["steps"]), p.get("base_hint", ""))


class InterchangeService:
    def __init__(self, sessions: sessionmaker[Session], store: ArtifactStore, runtime: ModelRuntime,
                 default_base: str, max_import_bytes: int = MAX_IMPORT_BYTES) -> None:
        self._sessions = sessions
        self._store = store
        self._runtime = runtime
        self._default_base = default_base
        self._max_import_bytes = max_import_bytes
        self._downloads: Path | None = None

    # export ---------------------------------------------------------------------------------------------------

    def export_adapter(self, id_or_name: str, out: str | Path, fmt: str = "kohya",
                       precision: str = "fp16") -> ExportResult:
        """Write the adapter to ``out`` (a ``.safetensors`` path, or a folder to put ``<name>.safetensors`` in).

        ``kohya`` needs a method whose update is plain low-rank (``Method.export_lora``); for any other method
        the native file is written instead and ``note`` says why. ``native`` copies the catalog's file as is.
        """
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        info, images = self._adapter(id_or_name)
        target = Path(out).expanduser()
        if target.is_dir():
            target = target / f"{_slug(info.name)}.safetensors"
        if target.suffix.lower() != ".safetensors":
            raise ValueError(f"{target}: the exported file must end in .safetensors")
        source = self._store.resolve(info.file_path)
        blob = source.read_bytes()
        if hashlib.sha256(blob).hexdigest() != info.sha256:
            raise ValueError(f"adapter {info.name}: {info.file_path} no longer matches its catalog sha256 "
                             "(modified or corrupted); not exported")
        if fmt == "native":
            atomic_write_bytes(target, blob)
            return ExportResult(target, "native", 0)
        tensors, metadata = load_safetensors(source)
        try:
            layers = METHODS.get(info.method).export_lora(tensors, metadata)
        except (ValueError, KeyError) as exc:
            atomic_write_bytes(target, blob)
            note = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            return ExportResult(target, "native", 0, f"{note}; wrote the native LoRA Studio file instead")
        export_info = ExportInfo(
            title=info.name, method=info.method, base_model=info.base_model, trigger_words=info.trigger_words,
            steps=info.steps, created_at=info.created_at, resolution=info.training_config.get("resolution"),
            num_train_images=images)
        atomic_write_bytes(target, kohya_file_bytes(layers, export_info, metadata, precision))
        return ExportResult(target, "kohya", len(layers))

    def export_for_download(self, id_or_name: str, fmt: str = "kohya") -> ExportResult:
        """Export into a private temp folder (one file per adapter and format, replaced on each export)."""
        if self._downloads is None:
            self._downloads = Path(tempfile.mkdtemp(prefix="lorastudio-exports-"))
        info, _ = self._adapter(id_or_name)
        folder = self._downloads / info.id
        folder.mkdir(exist_ok=True)
        return self.export_adapter(info.id, folder / f"{_slug(info.name)}-{fmt}.safetensors", fmt=fmt)

    def _adapter(self, id_or_name: str) -> tuple[AdapterInfo, int | None]:
        """The adapter's catalog entry and, when its dataset is still there, its number of training images."""
        with self._sessions.begin() as session:
            row = catalog.get_adapter(session, id_or_name)
            images = None
            if row.dataset_id:
                try:
                    images = len(catalog.get_dataset(session, row.dataset_id).images)
                except KeyError:
                    images = None
            return catalog.adapter_info(row), images

    # import ---------------------------------------------------------------------------------------------------

    def import_adapter(self, path: str | Path, *, name: str | None = None, kind: str | None = None,
                       trigger_word: str | None = None, base_model: str | None = None, alpha: float | None = None,
                       display_name: str | None = None) -> AdapterInfo:
        """Check a kohya/diffusers/peft LoRA file against the base model and add it to the catalog as a ``lora``,
        here and now (the web app and the CLI queue an ``import`` job instead: :meth:`submit_import`).

        ``display_name`` is the name the user knows the file by (an upload's original name); it is only ever
        sanitized and shown, never used as a path. Unset ``kind``/``trigger_word`` come from the file's header
        when it has them (a file exported from here does). The file is refused whole on any problem, and a
        failure leaves neither files nor a catalog row behind.
        """
        source = Path(path)
        shown = sanitize_filename(display_name or source.name)
        _sniff(source, shown, self._max_import_bytes)
        try:
            tensors, metadata = load_safetensors(source)
        except BadWeightsFile as exc:
            raise ValueError(f"{shown}: not a valid .safetensors file ({exc.__cause__ or exc})") from None
        plan = self._plan(shown, metadata, name, kind, trigger_word, base_model, alpha)
        self._check_name_free(plan.name)
        imported, config = self._convert(tensors, metadata, plan)
        return self._record(uuid.uuid4().hex, imported, config, plan)

    def submit_import(self, file_path: str | Path, *, name: str | None, kind: str | None = None,
                      trigger: str | None = None, base: str | None = None, alpha: float | None = None,
                      priority: int = 1, display_name: str | None = None) -> JobInfo:
        """Check everything that needs no model, store a copy of the file and queue an ``import`` job.

        The copy goes to ``jobs/<job id>/import.safetensors`` before the job row is committed, under the id the
        row will get; if either step fails, neither is left behind. The job's payload holds the settings, the
        sanitized file name and the copy's sha256. Refusals raise ``ValueError`` naming the problem.
        """
        source = Path(file_path)
        shown = sanitize_filename(display_name or source.name)
        _sniff(source, shown, self._max_import_bytes)
        keys, metadata = _read_header(source, shown)
        try:
            fmt = detect_format(keys)
        except ValueError as exc:
            raise ValueError(f"{shown}: {exc}") from None
        plan = self._plan(shown, metadata, name, kind, trigger, base, alpha)
        self._runtime.resolve(plan.base)  # a missing base fails now, not in the worker
        self._check_name_free(plan.name)
        job_id = new_id()
        try:
            rel, sha256 = self._store.write_job_file(job_id, IMPORT_FILE, source)
            payload = {**plan.payload(), "file": rel, "sha256": sha256,
                       "size": self._store.resolve(rel).stat().st_size, "format": fmt}
            with writing(self._sessions) as session:
                self._check_name_free(plan.name, session)
                row = jobs.enqueue(session, "import", payload, title=f"import {plan.name} ({fmt} LoRA)",
                                   priority=priority, job_id=job_id)
                return jobs.job_info(row)
        except BaseException:
            with contextlib.suppress(OSError):  # the original error matters more than a failed clean-up
                self._store.remove(f"jobs/{job_id}")  # never keep an upload no job points to
            raise

    def run_import_job(self, job: JobInfo, reporter: JobReporter) -> str | None:
        """The worker's side of :meth:`submit_import`: convert the stored file, record the adapter, finish the job.

        A refusal (keys that do not fit the base model, NaNs, a changed file ...) fails the job with the reason
        as its error and leaves no adapter files behind. The adapter id is derived from the job id, so files left
        by an attempt that crashed before its catalog row was committed are replaced by the rerun.
        """
        plan = _ImportPlan.from_payload(job.payload)
        reporter.progress(0, 3, message="reading the file", force=True)
        try:
            tensors, metadata = self._stored_upload(job)
            reporter.check_cancel()
            reporter.progress(1, 3, message=f"checking its layers against {plan.base}", force=True)
            imported, config = self._convert(tensors, metadata, plan)
        except ValueError as exc:
            with writing(self._sessions) as session:
                jobs.fail(session, job.id, str(exc), worker_id=reporter.worker_id)
            return None
        del tensors
        reporter.check_cancel()
        reporter.progress(2, 3, message="saving the adapter", force=True)
        adapter_id = job_adapter_id(job.id)
        self._record(adapter_id, imported, config, plan, job_id=job.id, worker_id=reporter.worker_id)
        with contextlib.suppress(OSError):
            self._store.remove(f"jobs/{job.id}/{IMPORT_FILE}")  # the adapter holds the tensors now
        return adapter_id

    def _stored_upload(self, job: JobInfo) -> tuple[dict, dict[str, str]]:
        rel = f"jobs/{job.id}/{IMPORT_FILE}"
        path = self._store.resolve(rel)
        shown = job.payload.get("file_name", IMPORT_FILE)
        if not path.is_file():
            raise ValueError(f"{shown}: the uploaded copy {rel} is gone; import the file again")
        if sha256_file(path) != job.payload.get("sha256"):
            raise ValueError(f"{shown}: the uploaded copy {rel} changed since it was queued; import the file again")
        try:
            return load_safetensors(path)
        except BadWeightsFile as exc:
            raise ValueError(f"{shown}: not a valid .safetensors file ({exc.__cause__ or exc})") from None

    # shared steps ---------------------------------------------------------------------------------------------

    def _plan(self, shown: str, metadata: dict[str, str], name: str | None, kind: str | None,
              trigger_word: str | None, base_model: str | None, alpha: float | None) -> _ImportPlan:
        """The import's settings: what was asked for, else what the file's header says, else the defaults."""
        hints = header_hints(metadata)
        name = _check_name(name if name and name.strip() else _default_name(shown))
        triggers = [trigger_word.strip()] if trigger_word and trigger_word.strip() else hints.get("trigger_words", [])
        kind = kind or hints.get("kind") or ("subject" if triggers else "style")
        if kind not in CONCEPT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(CONCEPT_KINDS)}, got {kind!r}")
        if kind == "subject" and not triggers:
            raise ValueError("a subject needs a trigger word (a rare token such as 'sks') to call it up in prompts")
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        base = (base_model or self._default_base).strip()
        return _ImportPlan(shown, name, kind, list(triggers), base, None if alpha is None else float(alpha),
                           int(hints.get("steps", 0)), _base_hint(hints, base))

    def _check_name_free(self, name: str, session: Session | None = None) -> None:
        if session is None:
            with self._sessions.begin() as session:
                self._check_name_free(name, session)
            return
        if catalog.find_adapter(session, name) is not None:
            raise ValueError(f"an adapter named {name!r} already exists; pick another name")

    def _convert(self, tensors: dict, metadata: dict[str, str], plan: _ImportPlan) -> tuple[Any, dict[str, Any]]:
        """The file in the ``lora`` method's format, checked against the base model, and its catalog config."""
        with self._runtime.lock:
            pipe = self._runtime.pipeline(plan.base)
            try:
                imported = import_lora(tensors, metadata, pipe, alpha=plan.alpha)
            except ValueError as exc:
                raise ValueError(f"{plan.shown}: {exc}{plan.base_hint}") from None
        config: dict[str, Any] = {"imported_from": plan.shown, "format": imported.format, "rank": imported.rank,
                                  "alpha": imported.alpha, "layers": imported.layers}
        if metadata.get("lorastudio.method"):
            config["source_method"] = metadata["lorastudio.method"]
        return imported, config

    def _record(self, adapter_id: str, imported, config: dict[str, Any], plan: _ImportPlan,
                job_id: str | None = None, worker_id: str | None = None) -> AdapterInfo:
        """Write the adapter's files and its catalog row; with ``job_id`` the job is finished in the same
        transaction (a name taken meanwhile then gets a suffix, as a trained adapter's does)."""
        base_hash = self._runtime.base_hash(plan.base)
        metadata = adapter_file_metadata("lora", config, plan.base, base_hash, plan.triggers, plan.kind, plan.steps,
                                         method_metadata=imported.metadata)
        spec = NewAdapter(name=plan.name, method="lora", kind=plan.kind, base_model=plan.base,
                          base_model_hash=base_hash, trigger_words=plan.triggers, rank=imported.rank,
                          training_config=config, steps=plan.steps, job_id=job_id)
        return record_adapter(self._sessions, self._store, adapter_id, spec, imported.tensors, metadata,
                              worker_id=worker_id, rename_if_taken=job_id is not None)
