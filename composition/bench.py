"""Composition benchmark: seconds per image of every composer against the base model, in one process.

For each N the pipeline carries exactly N adapters; every registered composer samples the same 20-step request
with all N at weight 1, best of ``repeats``. Reported per composer: seconds, the ratio to the base model without
adapters (timed in the same run), the analytic floor in UNet passes per step (merge/switch 1, composite N,
CMLoRA ``f * N + (1 - f) / c`` with the reference's shallow fraction ``f = 0.38``, CLoRA ``(N + 1)(1 + 2u)`` for
the base branch plus N with forward+backward on the fraction ``u`` of update steps) and the ratio to that floor,
plus ``naive_composite``: ``set_adapters`` before each of the N passes, the implementation ours must beat. Times
are whole images (prompt encoding, N-independent scheduler work and VAE decode included), so ratios to a floor
above 1 can come out below 1.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import peft
import torch
from torch import Tensor

from composition.base import COMPOSERS, AdapterSet, Composer, StepContext, UNetFn
from composition.sampler import SampleRequest, sample

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CMLORA_SHALLOW_FRACTION = 0.38  # methods.md §7a: cached pass of SD-1.5 at 512² ≈ 0.38 NFE
REQUEST_PROMPT = "a dog and a cat with a hat in a garden"
CONCEPT_WORDS = ["dog", "cat", "hat", "garden"]


class NoAdapterSet:
    """The base model: nothing attached, nothing to apply."""

    def names(self) -> list[str]:
        return []

    def apply(self, weights: dict[str, float]) -> None:
        if weights:
            raise KeyError(f"no adapters attached: {', '.join(weights)}")


class NaiveComposite(Composer):
    """LoRA Composite as the reference runs it: ``set_adapters([i])`` before each of the N UNet passes."""

    def predict_noise(self, ctx: StepContext, unet_fn: UNetFn) -> Tensor:
        active = {n: w for n, w in ctx.weights.items() if w != 0.0}
        if not active:
            return ctx.guide(unet_fn())
        preds = []
        for name, weight in active.items():
            ctx.pipe.enable_lora()
            ctx.pipe.set_adapters([name], [weight])
            ctx.active = {name: weight}
            preds.append(ctx.guide(unet_fn()))
        return torch.stack(preds).mean(0)


def attach_random_loras(pipe, count: int, rank: int = 8, prefix: str = "bench") -> list[str]:
    """Replace any adapters named ``prefix*`` by ``count`` random-initialised peft LoRAs on the UNet attention."""
    old = [n for n in getattr(pipe.unet, "peft_config", {}) if n.startswith(prefix)]
    if old:
        pipe.delete_adapters(old)
    names = [f"{prefix}{i}" for i in range(count)]
    for i, name in enumerate(names):
        config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=False)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            torch.manual_seed(1000 + i)
            pipe.unet.add_adapter(config, adapter_name=name)
    return names


def analytic_floor(composer: str, n: int, settings: dict[str, Any]) -> float | None:
    """UNet passes per step that the method cannot go below (``None`` where no floor is defined)."""
    if composer in ("merge", "switch"):
        return 1.0
    if composer in ("composite", "naive_composite"):
        return float(n)
    if composer == "clora":  # base branch + N; steps with the latent update cost ~3 passes (forward + backward)
        return (n + 1) * (1 + 2 * float(settings.get("update_fraction", 0.5)))
    if composer == "cmlora":
        interval = int(settings.get("cache_interval", 2))
        if interval <= 1:
            return float(n)
        return CMLORA_SHALLOW_FRACTION * n + (1 - CMLORA_SHALLOW_FRACTION) / interval
    return None


def default_settings(names: list[str]) -> dict[str, dict[str, Any]]:
    """CLoRA needs a concept word per adapter: the i-th adapter stands for the i-th object of the prompt."""
    return {"clora": {"concepts": "; ".join(f"{a}={w}" for a, w in zip(names, CONCEPT_WORDS, strict=False))}}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_compose_benchmark(
    pipe,
    adapters_factory: Callable[[int], AdapterSet],
    n_values: tuple[int, ...] = (1, 2, 3, 4),
    steps: int = 20,
    repeats: int = 3,
    composers: list[str] | None = None,
    settings: Callable[[list[str]], dict[str, dict[str, Any]]] | dict[str, dict[str, Any]] | None = None,
    base_pipe: Any = None,
) -> dict[str, Any]:
    """Seconds per image of each composer at each N, as ratios to the base model and to the analytic floor.

    ``adapters_factory(n)`` attaches exactly ``n`` adapters to ``pipe`` and returns them as an ``AdapterSet``.
    ``settings`` maps composer names to their settings, or is a function of the attached adapter names giving
    that map (default ``default_settings``: CLoRA's concept words for the benchmark prompt). The base model is
    timed before any adapter is attached. Within one N the composers are timed round-robin, ``repeats`` rounds,
    best round kept, so load from other processes hits all of them alike; with ``base_pipe`` (an identical
    pipeline that never gets adapters) the base model joins every round and each N's ratios use that N's base.
    """
    if settings is None:
        settings = default_settings
    names = composers if composers is not None else COMPOSERS.names()
    request = SampleRequest(REQUEST_PROMPT, negative_prompt="blurry", seed=0, steps=steps, guidance_scale=7.5)
    merge = COMPOSERS.get("merge")

    def base_run(target: Any = pipe) -> None:
        sample(target, merge(), NoAdapterSet(), {}, request)

    base_run()  # warm-up
    base_all = [_timed(base_run) for _ in range(repeats)]
    base_s = min(base_all)
    results: dict[str, Any] = {"steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
                               "base": {"seconds": base_s, "seconds_all": base_all}, "n": {}}
    for n in n_values:
        adapters = adapters_factory(n)
        weights = dict.fromkeys(adapters.names(), 1.0)
        config = settings(adapters.names()) if callable(settings) else settings
        runs: dict[str, tuple[Callable[[], Composer], dict[str, Any]]] = {
            name: ((lambda name=name, config=config: COMPOSERS.get(name).from_settings(config.get(name))),
                   config.get(name, {}))
            for name in names
        }
        runs["naive_composite"] = (NaiveComposite, {})
        row: dict[str, Any] = {}
        timings: dict[str, list[float]] = {}
        if base_pipe is not None:
            runs = {"base": (merge, {}), **runs}
        for label, (make, _) in runs.items():
            if label == "base":
                base_run(base_pipe)
                timings[label] = []
                continue
            try:
                sample(pipe, make(), adapters, weights, request)  # warm-up (caches, allocator)
                timings[label] = []
            except (ValueError, NotImplementedError) as exc:
                row[label] = {"error": str(exc)}
        for _ in range(repeats):
            for label in timings:
                make = runs[label][0]
                if label == "base":
                    timings[label].append(_timed(lambda: base_run(base_pipe)))
                    continue
                timings[label].append(_timed(
                    lambda make=make, adapters=adapters, weights=weights: sample(pipe, make(), adapters, weights,
                                                                                 request)))
        n_base = min(timings["base"]) if "base" in timings else base_s
        for label, all_s in timings.items():
            seconds = min(all_s)
            entry: dict[str, Any] = {"seconds": seconds, "seconds_all": all_s}
            if label != "base":
                entry["vs_base"] = seconds / n_base
                floor = analytic_floor(label, n, runs[label][1])
                if floor is not None:
                    entry["floor_passes"] = floor
                    entry["vs_floor"] = seconds / (n_base * floor)
            row[label] = entry
        naive = row.get("naive_composite", {}).get("seconds")
        for label in ("composite", "cmlora"):
            if naive and "seconds" in row.get(label, {}):
                row[label]["speedup_vs_naive"] = naive / row[label]["seconds"]
        results["n"][str(n)] = row
    return results
