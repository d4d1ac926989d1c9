"""One training job as a standalone program, data-parallel over every process that ``accelerate launch`` or
``torchrun`` starts (see docs/distributed.md); run with plain ``python`` it trains in one process.

    accelerate launch --num_processes 2 -m training.launch --base builtin:tiny-sd --images DIR --method lora \\
        --trigger sks --kind subject --out adapter.safetensors --work-dir WORK

Every process loads the base model the way the app does (``core.pipelines``), reads the same images and runs the
same ``Trainer``; each trains on its own slice of every global batch (``training.trainer``). The main process
alone prints progress, writes checkpoints under ``--work-dir`` and writes the adapter file, whose header is the
app's (``training.artifact.adapter_file_metadata``), so the file can be imported into the catalog. A run whose
``--work-dir`` holds checkpoints resumes from the latest one (``--fresh`` starts over); every process loads the
checkpoint the main process picked. Creating the ``--stop-file`` stops every process at the same step.

Exit status: 0 done, 2 bad arguments or settings, 3 stopped by the stop file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import training.methods  # noqa: F401  (registers the methods)
from core.builtin import BUILTIN_PREFIX, DEFAULT_BUILTIN
from core.devices import choose_placement
from core.io import save_safetensors
from core.pipelines import BaseModelSource, base_model_hash, load_pipeline, resolve_base
from training.artifact import adapter_file_metadata
from training.base import METHODS, JobCancelled, MethodConfig
from training.data import PROMPT_KINDS, ImageCaptionDataset
from training.trainer import Trainer, latest_checkpoint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3
log = logging.getLogger("training.launch")


def default_models_dir() -> Path:
    """Where built-in models are saved: ``$LORASTUDIO_MODELS``, else ``$LORASTUDIO_HOME/models``, as the app does."""
    if os.environ.get("LORASTUDIO_MODELS"):
        return Path(os.environ["LORASTUDIO_MODELS"]).expanduser()
    return Path(os.environ.get("LORASTUDIO_HOME", "lorastudio_data")).expanduser() / "models"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=f"{BUILTIN_PREFIX}{DEFAULT_BUILTIN}",
                   help="base model: builtin:<name>, a diffusers folder, a .safetensors file or a hub id")
    p.add_argument("--base-config", help="diffusers folder (or builtin:<name>) with the configs of a single file")
    p.add_argument("--models-dir", type=Path, default=None, help="where built-in models are saved")
    p.add_argument("--images", type=Path, required=True, help="folder of images with optional <stem>.txt captions")
    p.add_argument("--method", default="lora", help=f"training method: {', '.join(METHODS.names())}")
    p.add_argument("--config", help="method settings as a JSON object, or the path of a .json file holding one")
    p.add_argument("--trigger", default="", help="trigger word (prepended to subject captions)")
    p.add_argument("--kind", default="subject", choices=PROMPT_KINDS)
    p.add_argument("--out", type=Path, required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--work-dir", type=Path, help="checkpoints (and class images) go here; none without it")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints already in --work-dir")
    p.add_argument("--stop-file", type=Path, help="stop the run (every process) once this file exists")
    p.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, float16 or bfloat16")
    return p.parse_args(argv)


def read_images(folder: Path) -> list[tuple[Path, str]]:
    """``(image, caption)`` pairs of ``folder``, sorted by name; a caption is ``<stem>.txt`` next to the image."""
    if not folder.is_dir():
        raise ValueError(f"--images {folder}: no such folder")
    records = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            caption = path.with_suffix(CAPTION_SUFFIX)
            records.append((path, caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""))
    if not records:
        raise ValueError(f"--images {folder}: no {', '.join(IMAGE_SUFFIXES)} files")
    return records


def read_config(method: str, raw: str | None) -> MethodConfig:
    """``method``'s config from ``--config`` (JSON text or a .json file); unset settings keep their defaults."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is unknown; known: {', '.join(METHODS.names())}")
    data: Any = {}
    if raw:
        text = Path(raw).read_text(encoding="utf-8") if raw.endswith(".json") and Path(raw).is_file() else raw
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config must be a JSON object of settings, got {type(data).__name__}")
    config = METHODS.get(method).config_cls.from_dict(data)
    config.validate()
    return config


class ConsoleCallback:
    """The main process's progress on stdout; ``should_stop`` once the stop file exists."""

    def __init__(self, stop_file: Path | None) -> None:
        self.stop_file = stop_file

    def on_step(self, step: int, total: int, loss: float, it_per_s: float, eta_s: float) -> None:
        print(f"step {step}/{total} loss {loss:.6f} {it_per_s:.2f} it/s eta {eta_s:.0f}s", flush=True)

    def on_preview(self, step: int, image: Image.Image) -> None:
        print(f"preview at step {step}", flush=True)

    def on_checkpoint(self, step: int, path: str) -> None:
        print(f"checkpoint {path}", flush=True)

    def should_stop(self) -> bool:
        return self.stop_file is not None and self.stop_file.exists()

    def pending_requests(self) -> set[str]:
        return set()


def _load_base(state: Any, args: argparse.Namespace) -> tuple[BaseModelSource, Any]:
    """Resolve and load the base model on this process's device; one process per host builds a built-in model
    or downloads a hub model first, the others then find it there."""
    device = f"cuda:{state.local_process_index}" if torch.cuda.is_available() else "cpu"
    placement = choose_placement(device, args.dtype)
    models_dir = args.models_dir or default_models_dir()
    pipe = None
    with state.local_main_process_first():
        source = resolve_base(args.base, models_dir, config=args.base_config)
        if source.kind == "hub":
            pipe = load_pipeline(source, placement)
    return source, pipe if pipe is not None else load_pipeline(source, placement)


def _agreed_checkpoint(state: Any, work_dir: Path | None, fresh: bool) -> Path | None:
    """The checkpoint the main process resumes from, found by every process (the work dir must be shared)."""
    from accelerate.utils import broadcast

    found = latest_checkpoint(work_dir) if work_dir is not None and not fresh else None
    step = int(found.name.split("-")[1]) if found is not None else -1
    if state.num_processes > 1:
        step = int(broadcast(torch.tensor([step], device=state.device), from_process=0).item())
    if step < 0:
        return None
    assert work_dir is not None
    path = work_dir / "checkpoints" / f"step-{step:06d}"
    if not path.is_dir():
        raise ValueError(f"process {state.process_index}: checkpoint {path} of the main process is missing here; "
                         "--work-dir must be one folder shared by every host")
    return path


def train(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    config = read_config(args.method, args.config)
    dataset = ImageCaptionDataset(read_images(args.images), config.resolution, flip=config.flip)
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: the adapter file must end in .safetensors")
    source, pipe = _load_base(state, args)
    resume_from = _agreed_checkpoint(state, args.work_dir, args.fresh)
    if main:
        print(f"training {args.method} on {len(dataset)} images with {state.num_processes} process(es) "
              f"({state.distributed_type}); global batch {config.batch_size * state.num_processes}"
              + (f"; resuming from {resume_from}" if resume_from else ""), flush=True)
    trainer = Trainer(METHODS.get(args.method)(config), pipe, dataset, config, trigger_word=args.trigger,
                      callback=ConsoleCallback(args.stop_file) if main else None, work_dir=args.work_dir,
                      kind=args.kind)
    try:
        result = trainer.run(resume_from=resume_from)
    except JobCancelled as exc:
        print(f"process {state.process_index}: {exc}", flush=True)
        return EXIT_CANCELLED
    if main:
        trigger_words = [args.trigger] if args.trigger else []
        metadata = adapter_file_metadata(args.method, result.config, args.base, base_model_hash(source),
                                         trigger_words, args.kind, result.steps_done,
                                         method_metadata=result.metadata)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(args.out, result.tensors, metadata)
        print(f"wrote {args.out} after {result.steps_done} steps in {result.seconds:.1f}s, "
              f"final loss {result.final_loss:.6f}", flush=True)
    state.wait_for_everyone()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        return train(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        log.info("finished in %.1fs", time.perf_counter() - started)


if __name__ == "__main__":
    sys.exit(main())
