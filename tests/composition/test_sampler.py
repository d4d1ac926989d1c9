"""The denoise loop: parity with diffusers' pipeline, determinism, hooks, cancellation and input checks."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from composition.base import COMPOSERS, AdapterSet, Composer, ComposerConfig, StepContext
from composition.methods.merge import MergeComposer
from composition.sampler import SampleRequest, make_scheduler, sample, scheduler_names
from tests.composition.conftest import NoAdapters, max_diff, reference_image

PROMPT = "a red circle on a blue background"


class Cancelled(Exception):
    pass


class RecordingComposer(Composer):
    """Default prediction plus a log of every hook, with checks of what the context holds at each point."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.events: list[str] = []
        self.fail_at = fail_at

    def setup(self, ctx: StepContext) -> None:
        assert ctx.prompt_embeds is None and ctx.latents is not None
        self.events.append("setup")

    def before_step(self, ctx: StepContext) -> None:
        assert ctx.encoder_hidden_states is not None
        self.events.append(f"before{ctx.step}")

    def predict_noise(self, ctx: StepContext, unet_fn) -> torch.Tensor:
        assert torch.is_inference_mode_enabled()
        if ctx.step == self.fail_at:
            raise RuntimeError("boom")
        self.events.append(f"predict{ctx.step}")
        return super().predict_noise(ctx, unet_fn)

    def after_step(self, ctx: StepContext) -> None:
        self.events.append(f"after{ctx.step}")

    def teardown(self, ctx: StepContext) -> None:
        self.events.append("teardown")
        super().teardown(ctx)


def test_registry_lists_merge() -> None:
    assert "merge" in COMPOSERS.names()
    assert COMPOSERS.get("merge") is MergeComposer


@pytest.mark.parametrize(
    ("scheduler", "steps", "guidance"),
    [(None, 20, 7.5), ("euler", 5, 7.5), ("dpm++", 5, 5.0), ("ddim", 5, 7.5), ("euler_a", 5, 7.5), (None, 5, 1.0)],
)
def test_sample_matches_pipeline_call(pipe, record_property, scheduler, steps, guidance) -> None:
    request = SampleRequest(PROMPT, seed=3, steps=steps, guidance_scale=guidance, scheduler=scheduler)
    own = pipe.scheduler
    try:
        pipe.scheduler = make_scheduler(pipe, scheduler)
        start = time.perf_counter()
        expected = reference_image(pipe, request)
        pipe_s = time.perf_counter() - start
    finally:
        pipe.scheduler = own
    start = time.perf_counter()
    image = sample(pipe, MergeComposer(), NoAdapters(), {}, request)
    sample_s = time.perf_counter() - start
    record_property("pipe_s", round(pipe_s, 3))
    record_property("sample_s", round(sample_s, 3))
    print(f"[{scheduler or 'pipeline'} x{steps}] pipe() {pipe_s:.3f}s, sample() {sample_s:.3f}s "
          f"({sample_s / pipe_s - 1:+.0%})")
    assert max_diff(image, expected) <= 1


def test_same_seed_same_image_other_seed_differs(pipe) -> None:
    request = SampleRequest(PROMPT, seed=7, steps=3)
    first = sample(pipe, MergeComposer(), NoAdapters(), {}, request)
    again = sample(pipe, MergeComposer(), NoAdapters(), {}, request)
    other = sample(pipe, MergeComposer(), NoAdapters(), {}, dataclasses.replace(request, seed=8))
    assert max_diff(first, again) == 0
    assert max_diff(first, other) > 10


def test_size_defaults_to_native_and_accepts_other_multiples(pipe) -> None:
    assert sample(pipe, MergeComposer(), NoAdapters(), {}, SampleRequest(PROMPT, steps=1)).size == (64, 64)
    image = sample(pipe, MergeComposer(), NoAdapters(), {}, SampleRequest(PROMPT, steps=1, width=48, height=32))
    assert image.size == (48, 32)


def test_pipeline_scheduler_is_never_touched(pipe) -> None:
    own = pipe.scheduler
    config = dict(own.config)
    timesteps = None if own.timesteps is None else own.timesteps.clone()
    sample(pipe, MergeComposer(), NoAdapters(), {}, SampleRequest(PROMPT, steps=2, scheduler="euler"))
    sample(pipe, MergeComposer(), NoAdapters(), {}, SampleRequest(PROMPT, steps=3))
    assert pipe.scheduler is own and dict(own.config) == config
    assert (own.timesteps is None and timesteps is None) or torch.equal(own.timesteps, timesteps)


def test_hooks_run_in_order_under_inference_mode(pipe) -> None:
    composer, adapters, progress = RecordingComposer(), NoAdapters(), []
    sample(pipe, composer, adapters, {}, SampleRequest(PROMPT, steps=2), on_step=lambda i, n: progress.append((i, n)))
    assert composer.events == ["setup", "before0", "predict0", "after0", "before1", "predict1", "after1", "teardown"]
    assert progress == [(0, 2), (1, 2)]
    assert adapters.calls == [{}]  # default weights activated once, before prompt encoding


def test_cancel_from_on_step_runs_teardown_and_propagates(pipe) -> None:
    composer, progress = RecordingComposer(), []

    def on_step(i: int, total: int) -> None:
        progress.append(i)
        if i == 1:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample(pipe, composer, NoAdapters(), {}, SampleRequest(PROMPT, steps=5), on_step=on_step)
    assert progress == [0, 1]
    assert composer.events[-2:] == ["after1", "teardown"]


def test_error_inside_composer_runs_teardown(pipe) -> None:
    composer = RecordingComposer(fail_at=1)
    with pytest.raises(RuntimeError, match="boom"):
        sample(pipe, composer, NoAdapters(), {}, SampleRequest(PROMPT, steps=3))
    assert composer.events[-1] == "teardown" and "predict1" not in composer.events


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"width": 30}, r"width must be a positive multiple of 4"),
        ({"height": 0}, r"height must be a positive multiple of 4"),
        ({"height": 32.0}, r"height must be a positive multiple of 4"),
        ({"steps": 0}, r"steps must be an integer >= 1"),
        ({"steps": True}, r"steps must be an integer >= 1"),
        ({"steps": 1001}, r"steps must be <= 1000"),
        ({"guidance_scale": -1.0}, r"guidance_scale must be a finite number >= 0"),
        ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number >= 0"),
        ({"seed": -1}, r"seed must be an integer between 0 and"),
        ({"seed": 1.5}, r"seed must be an integer between 0 and"),
        ({"prompt": None}, r"prompt must be a string"),
        ({"negative_prompt": None}, r"negative_prompt must be a string"),
        ({"scheduler": "heun"}, r"unknown scheduler 'heun'; use one of euler, euler_a, ddim, ddpm, dpm\+\+"),
    ],
)
def test_bad_requests_raise_clear_value_errors(pipe, changes, message) -> None:
    composer = RecordingComposer()
    request = dataclasses.replace(SampleRequest(PROMPT, steps=2), **changes)
    with pytest.raises(ValueError, match=message):
        sample(pipe, composer, NoAdapters(), {}, request)
    assert composer.events == []  # refused before anything ran


class _TwoAdapters(NoAdapters):
    def names(self) -> list[str]:
        return ["a", "b"]


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"c": 1.0}, r"unknown adapter\(s\) 'c'; attached: a, b"),
        ({"a": float("inf")}, r"adapter weights must be finite numbers; bad: a=inf"),
        ({"a": "1"}, r"adapter weights must be finite numbers; bad: a='1'"),
        ([("a", 1.0)], r"weights must be a dict"),
    ],
)
def test_bad_weights_raise_clear_value_errors(pipe, weights, message) -> None:
    with pytest.raises(ValueError, match=message):
        sample(pipe, MergeComposer(), _TwoAdapters(), weights, SampleRequest(PROMPT, steps=1))


def test_wrong_argument_types_raise_type_errors(pipe) -> None:
    with pytest.raises(TypeError, match="composer must be a Composer"):
        sample(pipe, object(), NoAdapters(), {}, SampleRequest(PROMPT, steps=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"adapters must provide names\(\) and apply"):
        sample(pipe, MergeComposer(), object(), {}, SampleRequest(PROMPT, steps=1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="MergeComposer needs a MergeConfig"):
        MergeComposer(ComposerConfig())


def test_protocols_and_scheduler_names() -> None:
    assert isinstance(NoAdapters(), AdapterSet)
    assert scheduler_names() == ["euler", "euler_a", "ddim", "ddpm", "dpm++"]


def test_requires_grad_composer_runs_under_no_grad_not_inference_mode(pipe) -> None:
    seen = []

    class GradComposer(Composer):
        requires_grad = True

        def predict_noise(self, ctx: StepContext, unet_fn) -> torch.Tensor:
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            with torch.enable_grad():
                latents = ctx.latents.detach().requires_grad_(True)
                (latents**2).sum().backward()
                assert latents.grad is not None
            return super().predict_noise(ctx, unet_fn)

    sample(pipe, GradComposer(), NoAdapters(), {}, SampleRequest(PROMPT, steps=1))
    assert seen == [(False, False)]
