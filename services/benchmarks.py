"""Benchmarks on the built-in model: the basic loop (a 20-step generation and a 50-step training run, each in its
own spawned process so that its peak memory, max RSS, is its own), composition, and every training method against
a plain diffusers + peft training loop (``training.bench``).
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from core.types import GenerationRequest
from services.container import build_services
from services.settings import Settings
from training.bench import DEFAULT_THREADS, format_table, make_images, run_training_suite


def run_compose_benchmark(n_values: tuple[int, ...] = (1, 2, 3, 4), steps: int = 20, repeats: int = 5,
                          threads: int | None = 1) -> dict[str, Any]:
    """Seconds per image of every composer at N adapters on the built-in model, against the base without adapters.

    The adapters are N random r=8 LoRAs switched through the production ``PeftAdapterSet``; a second copy of the
    pipeline without adapters is the base. ``threads`` (default 1) pins torch's CPU threads: the tiny model gains
    nothing from more, and on a shared CPU spinning OpenMP workers make timings erratic.
    """
    import torch

    from composition.bench import attach_random_loras
    from composition.bench import run_compose_benchmark as run_suite
    from core.builtin import build_pipeline
    from services.runtime import PeftAdapterSet

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        pipe, base_pipe = build_pipeline(), build_pipeline()
        pipe.set_progress_bar_config(disable=True)
        base_pipe.set_progress_bar_config(disable=True)
        return run_suite(pipe, lambda count: PeftAdapterSet(pipe, attach_random_loras(pipe, count)),
                         n_values=n_values, steps=steps, repeats=repeats, base_pipe=base_pipe)
    finally:
        torch.set_num_threads(previous)


def run_training_benchmark(methods: list[str] | None = None, quick: bool = False, steps: int | None = None,
                           rounds: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Steps/s, trainable parameters and memory of each training method (default: every registered one) and of
    the diffusers + peft baseline loop, at the shared fixed settings; ``quick``: few steps, one round.

    ``threads``: torch threads of every loop (default 1: steady timings on a shared CPU; 0: each loop's own)."""
    threads = DEFAULT_THREADS if threads is None else threads
    return run_training_suite(methods, quick=quick, steps=steps, rounds=rounds, threads=threads)


def training_table(results: dict[str, Any]) -> str:
    """``run_training_benchmark``'s results as a readable text table."""
    return format_table(results)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _generation(settings: Settings, steps: int) -> dict[str, Any]:
    services = build_services(settings)
    try:
        load_start = time.perf_counter()
        services.runtime.pipeline(settings.base_model)
        load_s = time.perf_counter() - load_start
        rss_loaded = _peak_rss_mb()
        timings = []
        for seed in range(3):
            job = services.generation.submit(GenerationRequest(prompt="a red circle", seed=seed, steps=steps))
            start = time.perf_counter()
            services.worker.run_once(job.id)
            timings.append(time.perf_counter() - start)
            assert services.jobs.get(job.id).status == "succeeded"
        return {"what": f"generate {steps} steps", "seconds_best": min(timings), "seconds_all": timings,
                "load_seconds": load_s, "peak_rss_mb": _peak_rss_mb(), "rss_after_load_mb": rss_loaded}
    finally:
        services.close()


def _training(settings: Settings, steps: int, work: Path) -> dict[str, Any]:
    services = build_services(settings)
    try:
        (work / "images").mkdir(parents=True, exist_ok=True)
        files = [path for path, _ in make_images(work / "images", 3)]
        _, job = services.train_from_upload(files, name="bench", trigger_word="sks",
                                            config={"max_steps": steps, "preview_every": 0, "checkpoint_every": 0})
        start = time.perf_counter()
        services.worker.run_once(job.id)
        seconds = time.perf_counter() - start
        done = services.jobs.get(job.id)
        assert done.status == "succeeded", done.error
        return {"what": f"train lora {steps} steps", "seconds": seconds, "steps_per_s": steps / seconds,
                "final_loss": done.losses[-1] if done.losses else None, "peak_rss_mb": _peak_rss_mb()}
    finally:
        services.close()


def _child(kind: str, settings: Settings, steps: int, work: str, queue) -> None:
    try:
        result = _generation(settings, steps) if kind == "generate" else _training(settings, steps, Path(work))
        queue.put(result)
    except BaseException as exc:  # report, don't hang the parent
        queue.put({"error": repr(exc)})


def run_loop_benchmark(base: Settings, generate_steps: int = 20, train_steps: int = 50) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorastudio-bench-") as tmp:
        for kind, steps in (("generate", generate_steps), ("train", train_steps)):
            settings = Settings(data_dir=Path(tmp) / kind, models_path=base.models_dir, base_model=base.base_model,
                                device=base.device, dtype=base.dtype)
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(kind, settings, steps, str(Path(tmp) / kind), queue))
            proc.start()
            results[kind] = queue.get()
            proc.join()
    return results
