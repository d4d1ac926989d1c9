"""Use cases: export a catalog adapter as a kohya ``.safetensors`` file, import a kohya/diffusers/peft LoRA file.

The tensor conversion is ``training.interchange``; this module reads and writes the files and the catalog.
Formats: ``docs/formats.md``.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

import training.methods  # noqa: F401  (registers every training method)
from core.io import BadWeightsFile, atomic_write_bytes, load_safetensors
from core.types import CONCEPT_KINDS, AdapterInfo
from services.runtime import ModelRuntime
from storage import catalog
from storage.artifacts import ArtifactStore
from storage.db import writing
from storage.uploads import sanitize_filename
from training.artifact import adapter_file_metadata
from training.base import METHODS
from training.interchange import PRECISIONS, ExportInfo, header_hints, import_lora, kohya_file_bytes

EXPORT_FORMATS = ("kohya", "native")
MAX_IMPORT_BYTES = 2 * 2**30  # the largest LoRA file accepted (an SDXL LoRA of rank 256 in fp16 is about 1.7 GiB)
_NAME = re.compile(r"^[\w][\w .\-]{0,63}$")  # the same rule as names of trained adapters
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04")  # a raw pickle, or the zip container of torch.save


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
        """Check a kohya/diffusers/peft LoRA file against the base model and add it to the catalog as a ``lora``.

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
        hints = header_hints(metadata)
        name = _check_name(name if name and name.strip() else _default_name(shown))
        triggers = [trigger_word.strip()] if trigger_word and trigger_word.strip() else hints.get("trigger_words", [])
        kind = kind or hints.get("kind") or ("subject" if triggers else "style")
        if kind not in CONCEPT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(CONCEPT_KINDS)}, got {kind!r}")
        if kind == "subject" and not triggers:
            raise ValueError("a subject needs a trigger word (a rare token such as 'sks') to call it up in prompts")
        base = (base_model or self._default_base).strip()
        with self._sessions.begin() as session:
            if catalog.find_adapter(session, name) is not None:
                raise ValueError(f"an adapter named {name!r} already exists; pick another name")
        with self._runtime.lock:
            pipe = self._runtime.pipeline(base)
            try:
                imported = import_lora(tensors, metadata, pipe, alpha=alpha)
            except ValueError as exc:
                raise ValueError(f"{shown}: {exc}{self._base_hint(hints, base)}") from None
        config: dict[str, Any] = {"imported_from": shown, "format": imported.format, "rank": imported.rank,
                                  "alpha": imported.alpha, "layers": imported.layers}
        if metadata.get("lorastudio.method"):
            config["source_method"] = metadata["lorastudio.method"]
        return self._save(imported, config, name=name, kind=kind, triggers=triggers, base=base,
                          steps=int(hints.get("steps", 0)))

    @staticmethod
    def _base_hint(hints: dict[str, Any], base: str) -> str:
        other = hints.get("base_model")
        if other and other != base:
            return f" (the file says it was made for base model {other!r}; this import checked it against {base!r})"
        return ""

    def _save(self, imported, config: dict[str, Any], *, name: str, kind: str, triggers: list[str], base: str,
              steps: int) -> AdapterInfo:
        adapter_id = uuid.uuid4().hex
        base_hash = self._runtime.base_hash(base)
        metadata = adapter_file_metadata("lora", config, base, base_hash, triggers, kind, steps,
                                         method_metadata=imported.metadata)
        manifest = {"id": adapter_id, "name": name, "method": "lora", "kind": kind, "base_model": base,
                    "base_model_hash": base_hash, "trigger_words": triggers, "rank": imported.rank,
                    "training_config": config, "steps": steps, "dataset_id": None, "job_id": None}
        written = self._store.write_adapter(adapter_id, imported.tensors, metadata, config, manifest)
        try:
            with writing(self._sessions) as session:
                row = catalog.add_adapter(session, id=adapter_id, name=name, method="lora", kind=kind,
                                          base_model=base, base_model_hash=base_hash, trigger_words=triggers,
                                          rank=imported.rank, training_config=config, steps=steps,
                                          sha256=written.sha256, file_size=written.size, file_path=written.path)
                return catalog.adapter_info(row)
        except BaseException:
            self._store.remove_adapter(adapter_id)  # never leave files the catalog does not know
            raise
