"""The base-model training script: stages resume bit-exactly from their checkpoints, and the output is a loadable
diffusers pipeline with fp16 weights and its training record."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from training.world import train_base
from training.world.train_base import BaseSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = BaseSettings(pool=24, vae_pool=24, vae_steps=4, vae_batch=2, unet_steps=4, unet_batch=2, warmup=2,
                    checkpoint_every=2, eval_every=1000, eval_prompts=2, threads=1)


def _states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_stages_resume_bit_exactly(tmp_path: Path) -> None:
    for name in "abc":
        (tmp_path / name).mkdir()
    pixels, masks, captions = train_base.render_pool(TINY, tmp_path / "a", progress=False)
    straight_vae = train_base.train_vae(TINY, tmp_path / "a", pixels, masks, progress=False)
    train_base.train_vae(replace(TINY, vae_stop=2), tmp_path / "b", pixels, masks, progress=False)  # "crash" at step 2
    resumed_vae = train_base.train_vae(TINY, tmp_path / "b", pixels, masks, progress=False)
    a, b = _states(straight_vae), _states(resumed_vae)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight_vae.config.scaling_factor == resumed_vae.config.scaling_factor

    unet_a, te_a, _, _ = train_base.train_unet(TINY, tmp_path / "a", straight_vae, captions, pixels, progress=False)
    train_base.train_unet(replace(TINY, unet_stop=2), tmp_path / "b", resumed_vae, captions, pixels, progress=False)
    unet_b, te_b, _, _ = train_base.train_unet(TINY, tmp_path / "b", resumed_vae, captions, pixels, progress=False)
    for left, right in ((unet_a, unet_b), (te_a, te_b)):
        a, b = _states(left), _states(right)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the UNet really trained: it left its (seeded) initial weights
    one_step = train_base.train_unet(replace(TINY, unet_steps=1), tmp_path / "c", straight_vae, captions, pixels,
                                     progress=False)[0]
    assert any(not torch.equal(p, q) for p, q in zip(one_step.parameters(), unet_a.parameters()))


def test_a_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    pixels, masks, _ = train_base.render_pool(TINY, tmp_path, progress=False)
    train_base.train_vae(replace(TINY, vae_stop=2), tmp_path, pixels, masks, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train_base.train_vae(replace(TINY, vae_lr=5e-4), tmp_path, pixels, masks, progress=False)


def test_decoder_tuning_changes_only_the_decoder_and_keeps_the_latents(tmp_path: Path) -> None:
    pixels, masks, _ = train_base.render_pool(TINY, tmp_path, progress=False)
    vae = train_base.train_vae(TINY, tmp_path, pixels, masks, progress=False)
    before = _states(vae)
    latents = train_base.pool_latents(vae, pixels, tmp_path, progress=False)
    tuned = train_base.tune_decoder(replace(TINY, decoder_steps=3, decoder_batch=2), tmp_path, vae, pixels, masks,
                                    progress=False)
    after = _states(tuned)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert all(p.requires_grad for p in tuned.parameters())
    again = train_base.pool_latents(tuned, pixels, tmp_path, progress=False)  # the cache still fits: same encoder
    assert len(list(tmp_path.glob("latents-*.pt"))) == 1 and torch.equal(latents[0], again[0])
    assert BaseSettings().stage_key("unet") == replace(BaseSettings(), decoder_steps=9).stage_key("unet")


def test_run_writes_a_loadable_fp16_pipeline_with_its_record(tmp_path: Path, models_dir: Path) -> None:
    from core.pipelines import BaseModelSource, load_pipeline

    out = tmp_path / "out"
    record = train_base.run(replace(TINY, decoder_steps=2, decoder_batch=2), tmp_path / "work", out, progress=False,
                            final_prompts=2)
    assert (out / "model_index.json").is_file()
    training = json.loads((out / "training.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert training["settings"]["unet_steps"] == 4 and training["hardware"]["cpu_count"] >= 1
    assert training["times_s"]["decoder_s"] > 0
    assert 0.0 <= metrics["base"]["scene"] <= 1.0 and metrics["base"]["prompts"] == 2
    assert record["metrics"]["vae"]["psnr"] > 0
    with safe_open(str(next((out / "unet").glob("*.safetensors"))), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    pipe = load_pipeline(BaseModelSource(str(out), "folder", str(out)))
    assert pipe.tokenizer.model_max_length == TINY.max_tokens
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images = pipe("a big red circle on the left on a blue plain background", num_inference_steps=2,
                  output_type="np").images
    assert images.shape == (1, 64, 64, 3)
