"""Every registered training method on every tiny architecture (SD 1.x, SD 2.x, SDXL).

Each (architecture, method) pair trains 2 steps through the real ``Trainer``, is saved with its file header,
attached to a fresh pipeline of the same architecture with ``training.artifact.load_adapter`` and sampled with
``pipe(...)``; an adapter of one architecture must be refused by another.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import training.methods  # noqa: F401  (registers the methods)
from core.builtin import ARCHITECTURES, build_pipeline
from tests.training.conftest import FAST, Recorder, write_images
from training.artifact import adapter_file_metadata, load_adapter
from training.base import METHODS, Method, TrainResult
from training.data import ImageCaptionDataset
from training.trainer import Trainer

RESOLUTION = 32
PROMPT = "sks a red square"
# (architecture, method) pairs a method does not support; its inject must then raise a ValueError naming the
# architecture. Every registered method supports every architecture today, so this is empty.
UNSUPPORTED: dict[tuple[str, str], str] = {}
METHOD_NAMES = [n for n in METHODS.names()  # video methods train on a video base (test_motion_director)
                if getattr(METHODS.get(n), "base_kind", "image") == "image"]
PAIRS = [(arch, name) for arch in ARCHITECTURES for name in METHOD_NAMES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bases() -> dict[str, Any]:
    """One tiny pipeline per architecture, built once for the module; tests train on them or on copies."""
    out = {}
    for arch in ARCHITECTURES:
        pipe = build_pipeline(arch=arch)
        pipe.set_progress_bar_config(disable=True)
        out[arch] = pipe
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    return write_images(tmp_path_factory.mktemp("arch") / "images", count=2, size=RESOLUTION)


class _Run:
    """What one training run left: the result, the config, and the trainable tensors before and after."""

    def __init__(self, trainer: Trainer, result: TrainResult, before: list[torch.Tensor],
                 after: list[torch.Tensor]) -> None:
        self.trainer, self.result, self.before, self.after = trainer, result, before, after
        self.config = trainer.config


def _config(name: str, **overrides: Any):
    settings = {**FAST, "max_steps": 2, "batch_size": 1, "resolution": RESOLUTION, "learning_rate": 1e-3,
                "preview_every": 0, **overrides}
    return METHODS.get(name).config_cls.from_dict(settings)


def _watch_inject(method: Method, seen: dict[str, list[torch.Tensor]]) -> None:
    """Keep copies of the parameters ``inject`` returns, and the live tensors, to see what training changed."""
    inject = method.inject

    def watched(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
        params = inject(unet)
        seen["before"] = [p.detach().clone() for p in params]
        seen["live"] = list(params)
        return params

    method.inject = watched  # type: ignore[method-assign]


def train(pipe: Any, records: list[tuple[Path, str]], name: str, **overrides: Any) -> _Run:
    cfg = _config(name, **overrides)
    method = METHODS.get(name)(cfg)
    seen: dict[str, list[torch.Tensor]] = {}
    _watch_inject(method, seen)
    trainer = Trainer(method, pipe, ImageCaptionDataset(records, RESOLUTION), cfg, "sks", Recorder())
    result = trainer.run()
    return _Run(trainer, result, seen["before"], [p.detach().clone() for p in seen["live"]])


@pytest.fixture(scope="module")
def trained(bases: dict[str, Any], images: list[tuple[Path, str]]):
    """``trained(arch, name)``: that pair's 2-step run, trained once per module."""
    runs: dict[tuple[str, str], _Run] = {}

    def get(arch: str, name: str) -> _Run:
        if (arch, name) not in runs:
            runs[arch, name] = train(bases[arch], images, name)
        return runs[arch, name]

    return get


def _sample(pipe: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION, output_type="np",
                generator=generator).images


def _header(run: _Run, arch: str, name: str) -> dict[str, str]:
    return adapter_file_metadata(name, run.config, f"builtin:tiny-{arch}", "0" * 16, ["sks"], "subject",
                                 run.result.steps_done, method_metadata=run.result.metadata)


def _unet_state(pipe: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize(("arch", "name"), PAIRS)
def test_method_trains_saves_attaches_and_samples(bases, images, trained, arch: str, name: str) -> None:
    if (arch, name) in UNSUPPORTED:
        with pytest.raises(ValueError, match=UNSUPPORTED[arch, name]):
            train(bases[arch], images, name)
        return
    run = trained(arch, name)
    losses = torch.tensor(run.result.losses)
    assert len(losses) == 2 and torch.isfinite(losses).all()
    assert any(not torch.equal(b, a) for b, a in zip(run.before, run.after, strict=True)), "nothing trained"
    assert run.result.tensors and all(torch.isfinite(t).all() for t in run.result.tensors.values())

    base = copy.deepcopy(bases[arch])
    reference = _sample(base)
    attached = load_adapter(base, dict(run.result.tensors), _header(run, arch, name), "trained")
    image = _sample(base)
    assert image.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(image).all()
    assert not np.array_equal(image, reference), "the attached adapter changes nothing"
    assert attached.name == "trained"


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_adapter_of_another_architecture_is_refused(bases, trained, name: str) -> None:
    if ("sd1", name) in UNSUPPORTED:
        pytest.skip(f"{name} does not train on sd1")
    run = trained("sd1", name)
    target = copy.deepcopy(bases["sdxl"])
    before = _unet_state(target)
    with pytest.raises(ValueError):
        load_adapter(target, dict(run.result.tensors), _header(run, "sd1", name), "foreign")
    after = _unet_state(target)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sd2_trains_on_the_velocity(bases, tmp_path: Path) -> None:
    """SD 2.x predicts v = a·ε − b·x0: recompute step 1's loss from what the UNet saw and returned."""
    pipe = bases["sd2"]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    calls: list[tuple[torch.Tensor, ...]] = []

    def grab(_module, args, out) -> None:
        calls.append((args[0].detach().clone(), args[1].clone(), out[0].detach().clone()))

    handle = pipe.unet.register_forward_hook(grab)
    try:
        run = train(pipe, write_images(tmp_path, count=1, size=RESOLUTION), "lora", max_steps=1)
    finally:
        handle.remove()
    noisy, timesteps, pred = calls[0]
    alphas = torch.cumprod(1.0 - pipe.scheduler.betas, 0)
    a = alphas[timesteps].sqrt().view(-1, 1, 1, 1)
    b = (1 - alphas[timesteps]).sqrt().view(-1, 1, 1, 1)
    latents = run.trainer.latents[0, :1]
    noise = (noisy - a * latents) / b
    v_loss = torch.nn.functional.mse_loss(pred, a * noise - b * latents).item()
    eps_loss = torch.nn.functional.mse_loss(pred, noise).item()
    assert run.result.losses[0] == pytest.approx(v_loss, rel=1e-4)
    assert eps_loss != pytest.approx(v_loss, rel=1e-2)


def test_sdxl_unet_gets_pooled_text_and_size_ids(bases, images) -> None:
    pipe = bases["sdxl"]
    seen: list[dict[str, torch.Tensor]] = []

    def grab(_module, _args, kwargs):
        seen.append({k: v.detach().clone() for k, v in kwargs["added_cond_kwargs"].items()})

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        train(pipe, images[:1], "lora", max_steps=1)
    finally:
        handle.remove()
    with torch.no_grad():
        pooled = pipe.encode_prompt(prompt=[f"sks {images[0][1]}"], device="cpu", do_classifier_free_guidance=False)[2]
    assert len(seen) == 1
    assert torch.equal(seen[0]["time_ids"], torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]))
    assert torch.allclose(seen[0]["text_embeds"], pooled)
