"""MotionDirector on the built-in tiny-video (AnimateDiff) model: the debiased loss by hand, the two paths touching
only their own LoRAs, training → file → attach, bit-exact resume, cancel, the diffusers-format export loaded by
diffusers' own ``load_lora_weights``, and bad files refused whole."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.io import load_safetensors, save_safetensors
from tests.training.conftest import Recorder
from training.artifact import adapter_file_metadata, load_adapter
from training.base import METHODS, JobCancelled
from training.methods.motion_director import (
    SPATIAL_SCALE_KEY,
    TRAIN_ADAPTER,
    MotionDirector,
    MotionDirectorConfig,
    debiased_loss,
    diffusers_lora_file,
    motion_modules,
    temporal_bypassed,
)
from training.motion_trainer import MotionTrainer
from training.trainer import checkpoint_dirs
from training.video import ClipDataset
from training.world.dataset import concept_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES, RES = 4, 32
FAST = {"rank": 4, "max_steps": 3, "num_frames": FRAMES, "resolution": RES, "preview_every": 0,
        "checkpoint_every": 0, "learning_rate": 1e-2, "spatial_learning_rate": 1e-2}
PROMPT = "a big red circle moving on a blue plain background"


@pytest.fixture(scope="module")
def video_pipe():
    from core.builtin import build_video_pipeline

    pipe = build_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def clips() -> ClipDataset:
    samples = list(concept_dataset("zigzag", 2))
    return ClipDataset([s.pixels for s in samples], [s.caption for s in samples], FRAMES, RES)


def config(**overrides: Any) -> MotionDirectorConfig:
    return MotionDirectorConfig.from_dict({**FAST, **overrides})


def trainer(pipe, clips: ClipDataset, cfg: MotionDirectorConfig, **kwargs: Any) -> MotionTrainer:
    return MotionTrainer(MotionDirector(cfg), pipe, clips, cfg, **kwargs)


@pytest.fixture(scope="module")
def trained(video_pipe, clips):
    """A 3-step run (hflip on, spatial never skipped, LoRA scale alpha/r = 2) and its saved-file header."""
    cfg = config(hflip_prob=0.5, spatial_skip_prob=0.0, alpha=8.0)
    result = trainer(video_pipe, clips, cfg).run()
    header = adapter_file_metadata("motion_director", cfg, "builtin:tiny-video", "0" * 16, [], "motion",
                                   result.steps_done, method_metadata=result.metadata)
    return result, header


def unet_inputs(pipe, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, FRAMES, RES // 4, RES // 4, generator=g)
    embeds = torch.randn(2 * FRAMES, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([50, 700]), embeds


@torch.no_grad()
def unet_out(pipe, inputs) -> torch.Tensor:
    return pipe.unet(*inputs, return_dict=False)[0]


def unet_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


# ------------------------------------------------------------------------------------------------- maths --

def test_debiased_loss_matches_the_formula_by_hand() -> None:
    # one clip, one channel, two 1x1 frames: pred (1, 3), target (0, 1), anchor frame 0
    pred = torch.tensor([1.0, 3.0]).view(1, 1, 2, 1, 1)
    target = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1)
    anchor = torch.tensor([0])
    # L_org = (1² + 2²) / 2 = 2.5; α = √2: φ(pred) = (√2 − 1, 3√2 − 1), φ(target) = (0, √2),
    # L_ad = ((√2 − 1)² + (2√2 − 1)²) / 2 = ((3 − 2√2) + (9 − 4√2)) / 2 = 6 − 3√2
    assert debiased_loss(pred, target, anchor, beta=1.0).item() == pytest.approx(8.5 - 3 * math.sqrt(2), abs=1e-6)
    # anchor frame 1: φ(pred) = (√2 − 3, 3√2 − 3), φ(target) = (−1, √2 − 1): L_ad = ((√2 − 2)² + (2√2 − 2)²) / 2
    #                                                                             = (6 − 4√2 + 12 − 8√2) / 2
    assert debiased_loss(pred, target, torch.tensor([1])).item() == pytest.approx(2.5 + 9 - 6 * math.sqrt(2),
                                                                                  abs=1e-6)
    # β = 0: φ is the identity, so L_ad = L_org
    assert debiased_loss(pred, target, anchor, beta=0.0).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="B, C, F, h, w"):
        debiased_loss(pred[0], target[0], anchor)


def test_config_defaults_and_validation() -> None:
    cfg = MotionDirectorConfig()
    assert (cfg.rank, cfg.lora_dropout, cfg.learning_rate, cfg.spatial_learning_rate) == (32, 0.1, 5e-4, 1e-4)
    assert (cfg.spatial_skip_prob, cfg.debias_beta, cfg.spatial_scale) == (0.2, 1.0, 0.0)
    fields = MotionDirectorConfig.describe()
    assert all(f["help"] for f in fields)
    for bad, match in (({"flip": True}, "hflip_prob"), ({"target_modules": ["proj_in"]}, "unknown layer"),
                       ({"spatial_target_modules": []}, "non-empty"), ({"mixed_precision": "fp16"}, "fp16"),
                       ({"prior_preservation": True, "class_prompt": "a dog"}, "motions"),
                       ({"spatial_skip_prob": 1.5}, "spatial_skip_prob"), ({"num_frames": 1}, "num_frames")):
        with pytest.raises(ValueError, match=match):
            MotionDirectorConfig.from_dict(bad)
    assert METHODS.get("motion_director") is MotionDirector and MotionDirector.kind == "motion"


# ------------------------------------------------------------------------------------------------- paths --

def test_bypassed_motion_unet_is_its_image_unet(video_pipe) -> None:
    from core.builtin import build_pipeline

    image_unet = build_pipeline().unet
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(2, 4, RES // 4, RES // 4, generator=g)
    embeds = torch.randn(2, 77, image_unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        image = image_unet(frame, t, embeds, return_dict=False)[0]
        plain = video_pipe.unet(frame.unsqueeze(2), t, embeds, return_dict=False)[0].squeeze(2)
        with temporal_bypassed(video_pipe.unet):
            bypassed = video_pipe.unet(frame.unsqueeze(2), t, embeds, return_dict=False)[0].squeeze(2)
    torch.testing.assert_close(bypassed, image, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, image, atol=1e-3)  # 1-frame clips still run the motion modules otherwise
    assert all("forward" not in m.__dict__ for m in motion_modules(video_pipe.unet).values())


def test_each_path_updates_only_its_own_loras(video_pipe, clips) -> None:
    run = trainer(video_pipe, clips, config(spatial_skip_prob=0.0))
    method = run.method
    with run._pipeline_borrowed():
        run._seed_everything()
        run._setup()
        spatial, temporal = run.spatial_params, run.temporal_params
        assert spatial and temporal and not {id(p) for p in spatial} & {id(p) for p in temporal}
        assert all(".attentions." in n for n in method.spatial_layers)
        assert all(".motion_modules." in n for n in method.temporal_layers)
        latents = run.latents[:, :1]
        embeds = run.embeddings[run.prompt_index[:1]]

        draw = run._draw()
        before = [p.detach().clone() for p in spatial + temporal]
        run.spatial_step(latents, draw, embeds)
        assert all(p.grad is None for p in temporal), "the spatial path gave a temporal LoRA a gradient"
        assert all(torch.equal(b, p) for b, p in zip(before[len(spatial):], temporal))
        assert any(not torch.equal(b, p) for b, p in zip(before, spatial))

        seen: list[float] = []
        layer = next(iter(method.spatial_layers.values()))
        handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.scaling[TRAIN_ADAPTER]))
        try:
            before = [p.detach().clone() for p in spatial + temporal]
            run.temporal_step(latents[0], draw, embeds)
            assert all(p.grad is None for p in spatial), "the temporal path gave a spatial LoRA a gradient"
            assert all(torch.equal(b, p) for b, p in zip(before, spatial))
            assert any(not torch.equal(b, p) for b, p in zip(before[len(spatial):], temporal))
            run.temporal_step(latents[0], {**draw, "skip_spatial": torch.tensor(True)}, embeds)
        finally:
            handle.remove()
        assert seen[0] == pytest.approx(1.0) and seen[-1] == 0.0  # spatial LoRAs on, then off when skipped
        assert all(p.requires_grad for p in spatial + temporal)
        assert all(m.scaling[TRAIN_ADAPTER] == pytest.approx(1.0) for m in method.spatial_layers.values())
    assert not getattr(video_pipe.unet, "peft_config", {})


# --------------------------------------------------------------------------------------- train and attach --

def _sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_frames=FRAMES, num_inference_steps=2, height=RES, width=RES, output_type="np",
                generator=generator).frames


def test_training_saves_attaches_and_changes_the_output(video_pipe, trained, tmp_path: Path) -> None:
    result, header = trained
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    keys = set(result.tensors)
    assert any(".motion_modules." in k for k in keys) and any(".attentions." in k for k in keys)
    assert not getattr(video_pipe.unet, "peft_config", {})
    save_safetensors(tmp_path / "motion.safetensors", result.tensors, header)
    tensors, metadata = load_safetensors(tmp_path / "motion.safetensors")

    fresh = copy.deepcopy(video_pipe)
    reference = _sample(fresh)
    attached = load_adapter(fresh, tensors, metadata, "zigzag")
    assert fresh.unet.peft_config["zigzag"]
    loaded = {n for n, m in fresh.unet.named_modules() if "zigzag" in getattr(m, "lora_A", {})}
    assert loaded and all(".motion_modules." in n for n in loaded)  # spatial LoRAs off at sampling by default
    video = _sample(fresh)
    assert video.shape == (1, FRAMES, RES, RES, 3) and np.isfinite(video).all()
    assert not np.allclose(video, reference, atol=1e-4)
    attached.set_scale(0.0)
    np.testing.assert_allclose(_sample(fresh), reference, atol=1e-6)
    attached.remove()
    assert not getattr(fresh.unet, "peft_config", {})


def test_previews_are_strips_and_frames(video_pipe, clips) -> None:
    class Frames(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[tuple[int, list]] = []

        def on_preview_frames(self, step: int, frames: list) -> None:
            self.frames.append((step, frames))

    recorder = Frames()
    trainer(video_pipe, clips, config(max_steps=2, preview_every=1, preview_steps=1), callback=recorder).run()
    assert [s for s, _ in recorder.previews] == [1, 2]  # step 1, then the final preview
    assert recorder.previews[0][1].size == (RES * FRAMES, RES)
    assert len(recorder.frames[0][1]) == FRAMES and recorder.frames[0][1][0].size == (RES, RES)
    assert [s[0] for s in recorder.steps] == [1, 2]


def test_resume_is_bit_exact_and_cancel_cleans_up(video_pipe, clips, tmp_path: Path) -> None:
    cfg = config(max_steps=4, checkpoint_every=2, hflip_prob=0.5, spatial_skip_prob=0.5)
    whole = trainer(video_pipe, clips, cfg, work_dir=tmp_path / "a").run()
    saved = checkpoint_dirs(tmp_path / "a")
    assert [p.name for p in saved] == ["step-000002"]
    resumed_run = trainer(video_pipe, clips, cfg, work_dir=tmp_path / "b")
    resumed = resumed_run.run(resume_from=saved[0])
    assert resumed.losses == whole.losses
    assert resumed.tensors.keys() == whole.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], whole.tensors[k]) for k in whole.tensors)

    with pytest.raises(ValueError, match="changed settings: rank"):
        trainer(video_pipe, clips, config(max_steps=4, checkpoint_every=2, hflip_prob=0.5, spatial_skip_prob=0.5,
                                          rank=2)).run(resume_from=saved[0])
    recorder = Recorder(stop_after=3)
    with pytest.raises(JobCancelled):
        trainer(video_pipe, clips, cfg, callback=recorder, work_dir=tmp_path / "c").run()
    assert len(recorder.steps) == 3 and not (tmp_path / "c" / "checkpoints").exists()
    assert not getattr(video_pipe.unet, "peft_config", {})


# ---------------------------------------------------------------------------------------------- export --

def test_diffusers_export_loads_with_load_lora_weights_as_attached(video_pipe, trained, tmp_path: Path) -> None:
    result, header = trained
    inputs = unet_inputs(video_pipe)
    outputs = {}
    for spatial_scale in ("0.0", "0.5"):
        metadata = {**header, SPATIAL_SCALE_KEY: spatial_scale}
        layers = MotionDirector.export_lora(result.tensors, metadata)
        state, file_header = diffusers_lora_file(result.tensors, metadata)
        path = tmp_path / f"motion-{spatial_scale}.safetensors"
        save_safetensors(path, state, file_header)

        ours = copy.deepcopy(video_pipe)
        MotionDirector.attach(ours, dict(result.tensors), metadata, "ours")
        theirs = copy.deepcopy(video_pipe)
        theirs.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="theirs")
        n_theirs = sum(1 for m in theirs.unet.modules() if "theirs" in getattr(m, "lora_A", {}))
        assert n_theirs == len(layers)
        outputs[spatial_scale] = unet_out(ours, inputs)
        torch.testing.assert_close(unet_out(theirs, inputs), outputs[spatial_scale], rtol=0, atol=1e-4)
    assert sum(".attentions." in p for p in MotionDirector.export_lora(result.tensors, header)) == 0
    assert not torch.allclose(outputs["0.0"], outputs["0.5"], atol=1e-5)  # the spatial part joins at scale 0.5
    assert not torch.allclose(outputs["0.0"], unet_out(video_pipe, inputs), atol=1e-5)


def test_bad_files_are_refused_whole(video_pipe, trained) -> None:
    from core.builtin import build_pipeline

    result, header = trained
    tensors = dict(result.tensors)
    with pytest.raises(ValueError, match="motion modules"):
        load_adapter(build_pipeline(), tensors, header, "image")
    temporal_key = next(k for k in tensors if ".motion_modules." in k and k.endswith("lora_A.weight"))
    spatial_only = {k: v for k, v in tensors.items() if ".motion_modules." not in k}
    bad_cases = {
        "shapes": {**tensors, temporal_key: torch.zeros(4, 3)},
        "not a UNet LoRA key": {**tensors, "unet.something.weight": torch.zeros(2)},
        "not a motion-module or spatial": {**tensors, "unet.conv_in.lora_A.weight": torch.zeros(4, 4, 3, 3),
                                           "unet.conv_in.lora_B.weight": torch.zeros(32, 4, 1, 1)},
        "no temporal": spatial_only,
        "NaN": {**tensors, temporal_key: torch.full_like(tensors[temporal_key], float("nan"))},
        "lora_A but not both": {k: v for k, v in tensors.items()
                                if k != temporal_key.replace("lora_A", "lora_B")},
    }
    pipe = copy.deepcopy(video_pipe)
    before = unet_state(pipe)
    for match, bad in bad_cases.items():
        with pytest.raises(ValueError, match=match):
            load_adapter(pipe, bad, header, "bad")
        assert not getattr(pipe.unet, "peft_config", {}), match
    with pytest.raises(ValueError, match="spatial_scale"):
        load_adapter(pipe, tensors, {**header, SPATIAL_SCALE_KEY: "-1"}, "bad")
    after = unet_state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="AnimateDiff"):
        MotionDirector(config()).inject(build_pipeline().unet)
