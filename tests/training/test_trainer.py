"""The training loop: what it changes, that it learns, callbacks, cancellation, checkpoints and resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import Recorder, lora_config, write_images
from training.base import JobCancelled, TrainResult
from training.data import ImageCaptionDataset
from training.methods.lora import LoRA
from training.trainer import CHECKPOINT_DIR, Trainer, checkpoint_dirs, latest_checkpoint


def _train(pipe, records, callback=None, work_dir=None, resume_from=None, **overrides) -> TrainResult:
    cfg = lora_config(**overrides)
    dataset = ImageCaptionDataset(records, cfg.resolution)
    return Trainer(LoRA(cfg), pipe, dataset, cfg, "sks", callback or Recorder(), work_dir).run(resume_from)


def _snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone()
            for name in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


class _GradProbe(Recorder):
    """Records, during training, which parameters of the whole pipeline require grad."""

    def __init__(self, pipe) -> None:
        super().__init__()
        self.pipe = pipe
        self.trainable: set[str] = set()

    def on_step(self, step, total, loss, it_per_s, eta_s) -> None:
        super().on_step(step, total, loss, it_per_s, eta_s)
        for name in ("unet", "vae", "text_encoder"):
            params = getattr(self.pipe, name).named_parameters()
            self.trainable |= {f"{name}.{n}" for n, p in params if p.requires_grad}


def test_training_changes_only_the_adapter(pipe, records) -> None:
    before = _snapshot(pipe)
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    probe = _GradProbe(pipe)
    result = _train(pipe, records, probe, max_steps=3, learning_rate=1e-2)
    assert probe.trainable and all(".lora_" in n and n.startswith("unet.") for n in probe.trainable)
    assert len(probe.trainable) == len(result.tensors)
    after = _snapshot(pipe)
    assert after.keys() == before.keys()  # the adapter is gone again
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    assert "forward" not in pipe.unet.__dict__
    assert any(v.abs().sum() > 0 for k, v in result.tensors.items() if "lora_B" in k)  # and it did train


def _eval_loss(pipe, latents: torch.Tensor, embeds: torch.Tensor) -> float:
    """Noise-prediction MSE at fixed timesteps and noise: comparable before and after training."""
    g = torch.Generator().manual_seed(7)
    timesteps = torch.tensor([50, 200, 350, 500, 650, 800, 950])
    noise = torch.randn((len(timesteps), *latents.shape[1:]), generator=g)
    lat = latents.expand(len(timesteps), -1, -1, -1)
    noisy = pipe.scheduler.add_noise(lat, noise, timesteps)
    with torch.no_grad():
        pred = pipe.unet(noisy, timesteps, embeds.expand(len(timesteps), -1, -1), return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, noise).item()


def test_ten_steps_reduce_the_loss_on_one_image(pipe, records) -> None:
    one = [records[0]]
    cfg = lora_config(max_steps=10, learning_rate=1e-2)
    dataset = ImageCaptionDataset(one, 64)
    with torch.no_grad():
        latents = pipe.vae.encode(dataset[0]["pixels"][None]).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds = pipe.encode_prompt(["sks " + one[0][1]], "cpu", 1, False)[0]
    start = _eval_loss(pipe, latents, embeds)
    method = LoRA(cfg)
    result = Trainer(method, pipe, dataset, cfg, "sks", Recorder(), keep_adapter=True).run()
    try:
        end = _eval_loss(pipe, latents, embeds)
    finally:
        method.remove()
    assert len(result.losses) == 10 and all(torch.isfinite(torch.tensor(result.losses)))
    assert end < 0.97 * start, (start, end)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert _eval_loss(pipe, latents, embeds) == pytest.approx(start)  # base restored


def test_callbacks_get_steps_previews_and_checkpoints(pipe, records, tmp_path: Path) -> None:
    rec = Recorder()
    result = _train(pipe, records, rec, tmp_path, max_steps=4, preview_every=2, checkpoint_every=2)
    assert [s[0] for s in rec.steps] == [1, 2, 3, 4] and {s[1] for s in rec.steps} == {4}
    assert all(s[3] > 0 and s[4] >= 0 for s in rec.steps) and rec.steps[-1][4] == 0
    assert [s[2] for s in rec.steps] == result.losses and result.final_loss == result.losses[-1]
    assert [step for step, _ in rec.previews] == [2, 4]  # every 2 steps and at the end
    assert all(img.size == (64, 64) and img.mode == "RGB" for _, img in rec.previews)
    assert result.preview is rec.previews[-1][1]
    assert [step for step, _ in rec.checkpoints] == [2]  # none at the last step: the result is returned instead
    ckpt = Path(rec.checkpoints[0][1])
    assert ckpt == tmp_path / CHECKPOINT_DIR / "step-000002"
    assert {p.name for p in ckpt.iterdir()} == {"adapter.safetensors", "state.safetensors", "state.json"}
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert result.steps_done == 4 and result.seconds > 0 and result.config["max_steps"] == 4
    assert result.metadata["lorastudio.rank"] == "8"


def test_previews_off(pipe, records) -> None:
    rec = Recorder()
    result = _train(pipe, records, rec, max_steps=2, preview_every=0)
    assert rec.previews == [] and result.preview is None


def test_cancel_raises_and_leaves_nothing(pipe, records, tmp_path: Path) -> None:
    rec = Recorder(stop_after=3)
    before = _snapshot(pipe)
    with pytest.raises(JobCancelled, match="step 3 of 8"):
        _train(pipe, records, rec, tmp_path, max_steps=8, checkpoint_every=1)
    assert [s[0] for s in rec.steps] == [1, 2, 3]
    assert not (tmp_path / CHECKPOINT_DIR).exists()
    after = _snapshot(pipe)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_resume_reaches_the_same_weights(pipe, records, tmp_path: Path) -> None:
    settings = {"max_steps": 6, "flip": True, "lr_warmup_steps": 2, "learning_rate": 1e-3, "noise_offset": 0.05}
    full = _train(pipe, records, Recorder(), tmp_path / "a", **settings, checkpoint_every=4)

    work = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(pipe, records, Recorder(crash_at=4), work, **settings, checkpoint_every=1)
    kept = checkpoint_dirs(work)
    assert [p.name for p in kept] == ["step-000002", "step-000003"]  # only the latest two
    assert latest_checkpoint(work) == kept[-1]

    rec = Recorder()
    resumed = _train(pipe, records, rec, work, resume_from=kept[-1], **settings, checkpoint_every=1)
    assert [s[0] for s in rec.steps] == [4, 5, 6]
    assert resumed.steps_done == 6 and resumed.losses == full.losses
    assert resumed.tensors.keys() == full.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], full.tensors[k]) for k in full.tensors)


def test_resume_refuses_changed_settings(pipe, records, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _train(pipe, records, Recorder(crash_at=2), tmp_path, max_steps=3, checkpoint_every=1)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    with pytest.raises(ValueError, match="changed settings: rank"):
        _train(pipe, records, Recorder(), tmp_path, resume_from=ckpt, max_steps=3, rank=4)
    with pytest.raises(ValueError, match="dataset"):
        _train(pipe, records[:2], Recorder(), tmp_path, resume_from=ckpt, max_steps=3)
    more = _train(pipe, records, Recorder(), tmp_path, resume_from=ckpt, max_steps=5)  # more steps is fine
    assert more.steps_done == 5


def test_setup_errors_are_clear(pipe, records, tmp_path: Path) -> None:
    cfg = lora_config()
    with pytest.raises(ValueError, match="resolution"):
        Trainer(LoRA(cfg), pipe, ImageCaptionDataset(records, 32), cfg)
    with pytest.raises(ValueError, match="differs from the method"):
        Trainer(LoRA(cfg), pipe, ImageCaptionDataset(records, 64), lora_config(rank=2))
    with pytest.raises(ValueError, match="target_modules"):
        _train(pipe, records, target_modules=["no_such_layer"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16.*CUDA"):
            _train(pipe, records, mixed_precision="fp16")
    assert not getattr(pipe.unet, "peft_config", {})


def test_prompts_get_the_trigger_word(pipe, tmp_path: Path) -> None:
    records = write_images(tmp_path / "imgs", count=2)
    cfg = lora_config()
    subject = Trainer(LoRA(cfg), pipe, ImageCaptionDataset(records, 64), cfg, "sks", kind="subject")
    style = Trainer(LoRA(cfg), pipe, ImageCaptionDataset(records, 64), cfg, "sks", kind="style")
    assert all(p.startswith("sks a red square") for p in subject.prompts)
    assert all(p.startswith("a red square") for p in style.prompts)
    assert subject.preview_prompt == style.preview_prompt == "sks " + records[0][1]
    custom = lora_config(preview_prompt="a blue square")
    assert Trainer(LoRA(custom), pipe, ImageCaptionDataset(records, 64), custom).preview_prompt == "a blue square"


@pytest.mark.parametrize(
    "overrides",
    [
        {"mixed_precision": "bf16"},
        {"gradient_checkpointing": True},
        {"flip": True, "timestep_bias": -0.5, "noise_offset": 0.1, "batch_size": 5},
        {"init": "default", "alpha": 2, "lr_warmup_steps": 5, "max_grad_norm": 0},
    ],
)
def test_options_train_and_clean_up(pipe, records, overrides: dict) -> None:
    result = _train(pipe, records, max_steps=2, **overrides)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not pipe.unet.is_gradient_checkpointing
    assert not getattr(pipe.unet, "peft_config", {}) and "forward" not in pipe.unet.__dict__


def test_v_prediction_schedulers_train(pipe, records) -> None:
    from diffusers import DDPMScheduler

    original = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(original.config, prediction_type="v_prediction")
    try:
        result = _train(pipe, records, max_steps=2)
    finally:
        pipe.scheduler = original
    assert all(torch.isfinite(torch.tensor(result.losses)))
