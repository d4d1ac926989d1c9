"""The video-model training script: only motion modules learn, a stopped run resumes bit-exactly, and the output is
an AnimateDiff pipeline that loads through the public loader."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.world import train_video
from training.world.train_video import VideoSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = VideoSettings(clips=4, steps=3, batch=1, warmup=1, checkpoint_every=1, eval_every=1000, eval_prompts=1,
                     threads=1)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.builtin import TINY_SD, ensure_builtin

    return ensure_builtin(tmp_path_factory.mktemp("models"), TINY_SD)


def _motion_state(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_only_motion_modules_learn_and_resume_is_exact(tmp_path: Path, image_model: Path) -> None:
    from diffusers import UNet2DConditionModel

    straight, _, _ = train_video.train_motion(TINY, tmp_path / "a", image_model, progress=False)
    # a run stopped after one step (its checkpoint kept), then started again with the same settings
    stopped = tmp_path / "b"
    train_video.train_motion(replace(TINY, stop=1), stopped, image_model, progress=False)
    resumed, _, _ = train_video.train_motion(TINY, stopped, image_model, progress=False)
    a, b = _motion_state(straight), _motion_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    image_unet = UNet2DConditionModel.from_pretrained(image_model / "unet")
    image_state = image_unet.state_dict()
    changed = {k for k, v in a.items() if k in image_state and not torch.equal(v, image_state[k])}
    assert not changed, f"spatial weights changed: {sorted(changed)[:3]}"
    untrained, _, _ = train_video.train_motion(replace(TINY, steps=0), tmp_path / "c", image_model, progress=False)
    moved = [k for k, v in _motion_state(untrained).items()
             if ".motion_modules." in f".{k}" and not torch.equal(v, a[k])]
    assert moved


def test_cross_attention_training_changes_only_attn2_besides_motion(tmp_path: Path, image_model: Path) -> None:
    from diffusers import UNet2DConditionModel

    pipe, _, _ = train_video.train_motion(replace(TINY, train_cross_attention=True), tmp_path, image_model,
                                       progress=False)
    image_state = UNet2DConditionModel.from_pretrained(image_model / "unet").state_dict()
    changed = {k for k, v in _motion_state(pipe).items() if k in image_state and not torch.equal(v, image_state[k])}
    assert changed and all(".attentions." in k and ".attn2." in k for k in changed)
    assert any(".to_k." in k for k in changed)


def test_high_noise_share_draws_its_share_from_the_top_timesteps() -> None:
    t = train_video._timesteps(1000, 8, 0.5, torch.Generator().manual_seed(0))
    assert (t[:4] >= 600).all() and t.shape == (8,)
    plain = train_video._timesteps(1000, 8, 0.0, torch.Generator().manual_seed(0))  # unchanged draws by default
    assert torch.equal(plain, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0)))


def test_spatial_training_changes_every_part_of_the_unet(tmp_path: Path, image_model: Path) -> None:
    from diffusers import UNet2DConditionModel

    pipe, _, _ = train_video.train_motion(replace(TINY, train_spatial=True), tmp_path, image_model, progress=False)
    image_state = UNet2DConditionModel.from_pretrained(image_model / "unet").state_dict()
    state = _motion_state(pipe)
    changed = {k for k, v in state.items() if k in image_state and not torch.equal(v, image_state[k])}
    for part in ("conv_in.", "time_embedding.", ".resnets.", ".attn1.", ".attn2.", "conv_out."):
        assert any(part in f".{k}" for k in changed), part
    assert any(".motion_modules." in k for k in state)


def test_run_writes_a_loadable_animatediff_pipeline(tmp_path: Path, image_model: Path) -> None:
    from core.pipelines import BaseModelSource, load_pipeline

    out = tmp_path / "out"
    train_video.run(TINY, tmp_path / "work", image_model, out, progress=False, final_prompts=1)
    record = json.loads((out / "training.json").read_text())
    video = json.loads((out / "metrics.json").read_text())["video"]
    assert record["settings"]["steps"] == 3 and {"direction", "axis", "shape"} <= set(video)
    pipe = load_pipeline(BaseModelSource(str(out), "folder", str(out)))
    assert type(pipe).__name__ == "AnimateDiffPipeline"
    unet_state, adapter_state = pipe.unet.state_dict(), pipe.motion_adapter.state_dict()
    assert all(torch.equal(v, unet_state[k]) for k, v in adapter_state.items())  # the adapter holds the trained ones
    assert record["times_s"]["train"] > 0
    frames = pipe("a big red circle moving up on a blue plain background", num_frames=8, num_inference_steps=2,
                  height=64, width=64, output_type="np").frames
    assert frames.shape == (1, 8, 64, 64, 3)
    # a later run continues from the written model's motion modules (fp16 on disk)
    continued, _, _ = train_video.train_motion(replace(TINY, steps=0, init_from=str(out)), tmp_path / "d", image_model,
                                            progress=False)
    saved = pipe.unet.state_dict()
    motion = {k: v for k, v in _motion_state(continued).items() if ".motion_modules." in f".{k}"}
    assert motion and all(torch.equal(v, saved[k].float()) for k, v in motion.items())
    with pytest.raises(ValueError, match="no unet"):
        train_video.train_motion(replace(TINY, init_from=str(tmp_path)), tmp_path / "e", image_model, progress=False)


def test_zero_snr_trains_v_prediction_from_pure_noise(tmp_path: Path, image_model: Path) -> None:
    from diffusers import DDPMScheduler

    from core.builtin import SCHEDULER_CONFIG

    stock = DDPMScheduler(**SCHEDULER_CONFIG)
    schedule = train_video.zero_snr_schedule(stock)
    assert stock.alphas_cumprod[-1] > 0.004  # the stock noisiest step keeps ~7 % of the clip's amplitude
    assert schedule.alphas_cumprod[-1] == 0 and schedule.config.prediction_type == "v_prediction"
    weights = train_video._loss_weights(schedule, torch.tensor([999, 500, 0]), 5.0)
    assert weights[0] == 1 and weights[1] == 1 and weights[2] < 0.01  # the pure-noise step keeps its full weight
    assert torch.equal(train_video._loss_weights(stock, torch.tensor([0, 999]), 5.0),
                       train_video._snr_weights(stock, torch.tensor([0, 999]), 5.0))  # epsilon: unchanged

    pipe, _, _ = train_video.train_motion(replace(TINY, zero_snr=True), tmp_path, image_model, progress=False)
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction" and config.rescale_betas_zero_snr
    pipe.scheduler.set_timesteps(20)
    assert int(pipe.scheduler.timesteps[0]) == 999  # "trailing": sampling starts at the pure-noise step


def test_text_encoder_learns_only_when_asked(tmp_path: Path, image_model: Path) -> None:
    from transformers import CLIPTextModel

    image_state = CLIPTextModel.from_pretrained(image_model / "text_encoder").state_dict()
    frozen, _, _ = train_video.train_motion(TINY, tmp_path / "a", image_model, progress=False)
    assert all(torch.equal(v, image_state[k]) for k, v in frozen.text_encoder.state_dict().items())
    trained, _, _ = train_video.train_motion(replace(TINY, train_text_encoder=True), tmp_path / "b", image_model,
                                             progress=False)
    state = trained.text_encoder.state_dict()
    assert any(not torch.equal(v, image_state[k]) for k, v in state.items() if "embeddings" in k)
    assert not trained.text_encoder.training and not any(p.requires_grad for p in trained.text_encoder.parameters())


def test_reversed_pairs_play_each_clip_backwards_under_the_opposite_words(tmp_path: Path, image_model: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    caption = "a small red star moving up on a black dotted background"
    assert train_video.reversed_caption(caption) == "a small red star moving down on a black dotted background"
    with pytest.raises(ValueError, match="straight move"):
        train_video.reversed_caption("a small red star moving in an orbit on a black dotted background")
    from diffusers import UNetMotionModel

    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    forward = UNetMotionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        if self.training:
            calls.append((sample.detach().clone(), timestep.clone(), encoder_hidden_states.detach().clone()))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNetMotionModel, "forward", spy)
    train_video.train_motion(replace(TINY, batch=2, reversed_pairs=True, cond_dropout=0.0), tmp_path, image_model,
                             progress=False)
    sample, timestep, text = calls[0]
    assert timestep[0] == timestep[1]
    difference = sample[0] - sample[1]  # same noise, so only the clip and its reverse differ: odd under reversal
    assert difference.abs().max() > 0 and torch.allclose(difference.flip(1), -difference, atol=1e-5)
    assert not torch.equal(text[0], text[8])  # clip 0's frames, then clip 1's, each under its own words
    with pytest.raises(ValueError, match="even"):
        train_video.train_motion(replace(TINY, batch=3, reversed_pairs=True), tmp_path / "odd", image_model,
                                 progress=False)


def test_pair_difference_loss_sees_only_what_the_pair_does_not_share() -> None:
    target = torch.randn(4, 4, 8, 2, 2)  # two pairs: rows 0, 1 and their reversed partners 2, 3
    shared_error = torch.randn(1, 4, 8, 2, 2)
    weights, keep = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.ones(2)
    # an error both clips of a pair share (the background, say) costs nothing in the difference ...
    assert train_video.pair_difference_loss(target + shared_error, target, weights, keep) < 1e-10
    # ... while predicting the same for both clips (ignoring the words) costs the whole difference
    same = torch.cat([target[:2], target[:2]])
    ignored = train_video.pair_difference_loss(same, target, weights, keep)
    assert torch.isclose(ignored, (target[:2] - target[2:]).pow(2).mean()) and ignored > 0
    # pairs without words (dropped captions) do not count
    only_first = train_video.pair_difference_loss(same, target, weights, torch.tensor([1.0, 0.0]))
    assert torch.isclose(only_first, (target[0] - target[2]).pow(2).mean())


def test_pair_difference_trains_and_needs_reversed_pairs(tmp_path: Path, image_model: Path) -> None:
    with pytest.raises(ValueError, match="--reversed-pairs"):
        train_video.train_motion(replace(TINY, pair_difference=1.0), tmp_path / "a", image_model, progress=False)
    plain, _, _ = train_video.train_motion(replace(TINY, batch=2, reversed_pairs=True, cond_dropout=0.0),
                                           tmp_path / "b", image_model, progress=False)
    paired, _, _ = train_video.train_motion(replace(TINY, batch=2, reversed_pairs=True, cond_dropout=0.0,
                                                    pair_difference=4.0), tmp_path / "c", image_model,
                                            progress=False)
    before = _motion_state(plain)
    moved = [k for k, v in _motion_state(paired).items() if not torch.equal(v, before[k])]
    assert moved and all(".motion_modules." in k for k in moved)  # the extra term changed what was learned
