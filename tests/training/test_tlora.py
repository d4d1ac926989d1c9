"""T-LoRA: rank schedule, per-sample masks, the Ortho-LoRA layer, training, saved files, inference and export."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import training.methods.tlora  # noqa: F401  (registers "tlora")
from composition.routing import router_for
from core.io import load_safetensors
from tests.training.conftest import FAST, Recorder, save_trained, unet_inputs, unet_out, write_images
from training.artifact import load_adapter
from training.base import TrainResult
from training.data import ImageCaptionDataset
from training.methods.lora import LoRA
from training.methods.tlora import (
    PARTS,
    RankMasks,
    RankSchedule,
    TimestepClock,
    TLoRA,
    TLoRAAttachedAdapter,
    TLoRAConfig,
    TLoRALinear,
    layer_seed,
    ortho_init,
)
from training.trainer import Trainer, checkpoint_dirs

CLOCK = "_lorastudio_tlora_clock"
CASES = {"per_sample": torch.tensor([10, 900]), "same": torch.tensor([500, 500]), "scalar": torch.tensor(250),
         "extremes": torch.tensor([0, 999])}


def tlora_config(**overrides: Any) -> TLoRAConfig:
    return TLoRAConfig.from_dict({**FAST, **overrides})


def _randomize(params: list[nn.Parameter], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _forward(pipe, t: torch.Tensor, seed: int = 123) -> torch.Tensor:
    latents, _, embeds = unet_inputs(pipe, seed)
    return unet_out(pipe, (latents, t, embeds))


# ------------------------------------------------------------------------------------------ schedule, config --


@pytest.mark.parametrize(("rank", "min_rank", "exponent", "t", "expected"), [
    (8, 4, 1.0, 0, 8), (8, 4, 1.0, 999, 4), (8, 4, 1.0, 500, 6), (8, 4, 1.0, 250, 7),
    (64, 32, 2.0, 0, 64), (64, 32, 2.0, 999, 32), (64, 32, 2.0, 500, 40), (4, 1, 0.5, 750, 2), (16, 16, 1.0, 300, 16),
])
def test_rank_schedule_values(rank: int, min_rank: int, exponent: float, t: int, expected: int) -> None:
    assert RankSchedule(rank, min_rank, exponent, 1000).ranks(torch.tensor([t])).tolist() == [expected]


def test_rank_schedule_is_the_formula_at_every_timestep_and_masks_are_prefixes() -> None:
    t = torch.arange(1000)
    for rank, min_rank, exponent in [(8, 4, 1.0), (64, 32, 1.7), (5, 1, 0.3)]:
        schedule = RankSchedule(rank, min_rank, exponent, 1000)
        expected = [math.floor(((1000 - x) / 1000) ** exponent * (rank - min_rank)) + min_rank for x in range(1000)]
        assert schedule.ranks(t).tolist() == expected
        masks = schedule.masks(t)
        assert masks.shape == (1000, rank) and masks.sum(1).long().tolist() == expected
        assert (masks[:, 1:] <= masks[:, :-1]).all()  # the first r(t) components are kept


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rank": 4, "min_rank": 5}, r"min_rank \(5\) must be <= rank \(4\)"),
    ({"alpha": 8}, "alpha is not used by T-LoRA"),
    ({"sig_type": "first"}, "sig_type must be one of principal, last, middle"),
    ({"rank_exponent": 0}, "rank_exponent must be >="),
    ({"min_rank": 0}, "min_rank must be >= 1"),
])
def test_config_refuses_bad_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tlora_config(**overrides)
    assert tlora_config().describe()  # every field documents itself
    assert all(f["help"] for f in TLoRAConfig.describe() if f["name"] in ("min_rank", "rank_exponent", "sig_type"))


def test_ortho_init_is_seeded_paired_and_picks_the_requested_singular_values() -> None:
    g = torch.Generator().manual_seed(5)
    matrix = torch.randn(6, 10, generator=g) / 3
    values = torch.linalg.svdvals(matrix)
    for sig_type, picked in [("last", values[-3:]), ("principal", values[:3]), ("middle", values[1:4])]:
        q, p, lam = ortho_init(6, 10, 3, sig_type, seed=5)
        assert q.shape == (3, 10) and p.shape == (6, 3) and lam.shape == (3,)
        torch.testing.assert_close(lam, picked)
        torch.testing.assert_close(q @ q.T, torch.eye(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(p.T @ p, torch.eye(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(matrix @ q.T, p * lam, atol=1e-5, rtol=1e-4)  # paired: M v_i = s_i u_i
    assert all(torch.equal(a, b) for a, b in zip(ortho_init(6, 10, 3, "last", 5), ortho_init(6, 10, 3, "last", 5)))
    assert not torch.equal(ortho_init(6, 10, 3, "last", 5)[0], ortho_init(6, 10, 3, "last", 6)[0])
    assert len({layer_seed(0, "a.to_q"), layer_seed(0, "a.to_k"), layer_seed(1, "a.to_q")}) == 3


# ------------------------------------------------------------------------------------------------ the layer --


def test_layer_output_is_base_plus_the_masked_update_per_sample() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    schedule = RankSchedule(8, 2, 1.0, 1000)
    owner = nn.Module()
    clock = TimestepClock.acquire(owner)
    rank = 5  # min(R, d_in, d_out): the layer's mask is the schedule's cut to 5
    layer = TLoRALinear(base, *ortho_init(5, 6, rank, "last", seed=1), RankMasks(schedule, clock))
    x = torch.randn(2, 3, 6)
    t = torch.tensor([100, 900])
    clock.set(t)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # ΔW = 0 exactly at init
        _randomize([layer.q, layer.p, layer.lam])
        out = layer(x)

    def by_hand(xb: torch.Tensor, step: int) -> torch.Tensor:
        r = min(int(schedule.ranks(torch.tensor([step]))[0]), rank)
        m = (torch.arange(rank) < r).float()
        delta = layer.p @ torch.diag(layer.lam * m) @ layer.q - layer.p0 @ torch.diag(layer.lam0 * m) @ layer.q0
        return base(xb) + xb @ delta.T

    with torch.no_grad():
        assert schedule.ranks(t).tolist() == [7, 2]
        for b, step in enumerate(t.tolist()):
            torch.testing.assert_close(out[b], by_hand(x[b], step))
        assert not torch.allclose(by_hand(x[1], 100), out[1], atol=1e-3)  # the rank really differs per sample
        frames = torch.randn(4, 3, 6)  # 2 samples x 2 frames folded into the batch, sample-major
        folded = layer(frames)
        for row in range(4):
            torch.testing.assert_close(folded[row], by_hand(frames[row], t[row // 2].item()))
        clock.set(torch.tensor(900))  # one timestep for the whole batch
        torch.testing.assert_close(layer(x), torch.stack([by_hand(x[0], 900), by_hand(x[1], 900)]))
        clock.set(torch.tensor([1, 2, 3]))
        with pytest.raises(ValueError, match="does not fit 3 per-sample"):
            layer(x)
    clock.release(owner)
    assert CLOCK not in owner.__dict__ and not owner._forward_pre_hooks


# ---------------------------------------------------------------------------------------- inject / remove --


def test_inject_starts_at_the_base_model_and_remove_restores_it(pipe) -> None:
    unet = pipe.unet
    before = _forward(pipe, CASES["per_sample"])
    modules = dict(unet.named_modules())
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    method = TLoRA(tlora_config())
    params = method.inject(unet)
    try:
        assert len(params) == 3 * 4 * 14  # Q, P, λ on q/k/v/out of 14 attention modules
        assert [p.shape for p in params[:3]] == [(8, 64), (64, 8), (8,)]
        assert all(isinstance(unet.get_submodule(path), TLoRALinear) for path in method.layers)
        assert {n for n, p in unet.named_parameters() if any(p is q for q in params)} == {
            f"{path}.{part}" for path in method.layers for part in ("q", "p", "lam")}
        assert torch.equal(_forward(pipe, CASES["per_sample"]), before)  # ΔW = 0 exactly
        _randomize(params)
        assert not torch.allclose(_forward(pipe, CASES["per_sample"]), before, atol=1e-4)
        with pytest.raises(ValueError, match="exceeds num_train_timesteps"):
            method.on_timesteps(torch.tensor([1001]))
    finally:
        method.remove()
    assert torch.equal(_forward(pipe, CASES["per_sample"]), before)
    after = dict(unet.named_modules())
    assert after.keys() == modules.keys() and all(after[n] is m for n, m in modules.items())
    assert unet.state_dict().keys() == state.keys() and all(torch.equal(v, state[k]) for k, v in
                                                             unet.state_dict().items())
    assert CLOCK not in unet.__dict__ and not unet._forward_pre_hooks


def test_inject_refuses_unknown_or_non_linear_targets(pipe) -> None:
    with pytest.raises(ValueError, match="match no UNet layer"):
        TLoRA(tlora_config(target_modules=["to_q", "nope"])).inject(pipe.unet)
    with pytest.raises(ValueError, match="plain Linear layers only"):
        TLoRA(tlora_config(target_modules=["conv_in"])).inject(pipe.unet)
    assert CLOCK not in pipe.unet.__dict__ and not any(isinstance(m, TLoRALinear) for m in pipe.unet.modules())


def test_each_sample_gets_the_mask_of_its_own_timestep(pipe) -> None:
    method = TLoRA(tlora_config(rank=8, min_rank=1))
    _randomize(method.inject(pipe.unet))
    latents, _, embeds = unet_inputs(pipe)
    t = CASES["per_sample"]
    try:
        assert method.schedule.ranks(t).tolist() == [7, 1]
        batched = unet_out(pipe, (latents, t, embeds))
        for i in range(2):
            alone = unet_out(pipe, (latents[i:i + 1], t[i:i + 1], embeds[i:i + 1]))
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-4, atol=1e-5)

        def first_sample_only(module: nn.Module, args: tuple, kwargs: dict) -> None:
            method.clock.set(args[1][:1])  # the reference's one mask per batch, from timesteps[0]

        handle = pipe.unet.register_forward_pre_hook(first_sample_only, with_kwargs=True)
        batch_wide = unet_out(pipe, (latents, t, embeds))
        handle.remove()
        assert (batch_wide[1] - batched[1]).abs().max() > 1e-3
    finally:
        method.remove()


# ----------------------------------------------------------------------------------- training and loading --


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A T-LoRA trained 4 steps (preview through ``pipe(...)`` at the end), saved; the trained UNet's outputs."""
    folder = tmp_path_factory.mktemp("tlora")
    cfg = tlora_config(rank=8, min_rank=2, learning_rate=1e-2, preview_every=4, preview_steps=2)
    method = TLoRA(cfg)
    dataset = ImageCaptionDataset(write_images(folder / "images"), 64)
    recorder = Recorder()
    result = Trainer(method, pipe, dataset, cfg, "sks", recorder, keep_adapter=True).run()
    assert result.steps_done == 4 and len(recorder.previews) == 1
    reference = {case: _forward(pipe, t) for case, t in CASES.items()}
    method.remove()
    base = {case: _forward(pipe, t) for case, t in CASES.items()}
    path = folder / "adapter.safetensors"
    save_trained(path, "tlora", cfg, result)
    return {"path": path, "reference": reference, "base": base, "result": result}


@pytest.fixture()
def fresh_pipe(_second_pipe):
    """A pipeline that never saw the training run; adapters and the timestep hook are taken out after each test."""
    yield _second_pipe
    unet = _second_pipe.unet
    _second_pipe.unload_lora_weights()
    while CLOCK in unet.__dict__:
        unet.__dict__[CLOCK].release(unet)
    assert not any("lora" in n for n, _ in unet.named_parameters()) and not unet._forward_pre_hooks


def test_saved_file_keys_and_metadata(trained) -> None:
    result: TrainResult = trained["result"]
    assert len(result.tensors) == 6 * 4 * 14
    assert {k.rsplit(".tlora.", 1)[1] for k in result.tensors} == set(PARTS)
    assert result.metadata == {"lorastudio.tlora.rank": "8", "lorastudio.tlora.min_rank": "2",
                               "lorastudio.tlora.rank_exponent": "1.0", "lorastudio.tlora.num_train_timesteps": "1000"}
    tensors, metadata = load_safetensors(trained["path"])
    assert metadata["lorastudio.method"] == "tlora"
    key = next(k for k in tensors if k.endswith(".tlora.q"))
    assert not torch.equal(tensors[key], tensors[key + "0"])  # Q trained away from its frozen copy


def test_attached_file_reproduces_the_training_wrapper(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    adapter = load_adapter(fresh_pipe, tensors, metadata, "mine")
    assert isinstance(adapter, TLoRAAttachedAdapter)
    for case, t in CASES.items():
        out = _forward(fresh_pipe, t)
        torch.testing.assert_close(out, trained["reference"][case], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out, trained["base"][case], atol=1e-4)
    adapter.set_scale(0.0)
    torch.testing.assert_close(_forward(fresh_pipe, CASES["per_sample"]), trained["base"]["per_sample"],
                               rtol=1e-5, atol=1e-6)
    adapter.set_scale(1.0)
    torch.testing.assert_close(_forward(fresh_pipe, CASES["per_sample"]), trained["reference"]["per_sample"],
                               rtol=1e-4, atol=1e-5)
    reason = router_for(fresh_pipe.unet).unsupported_reason({"mine"})
    assert reason == "adapter 'mine' has a timestep-dependent rank mask (T-LoRA); routing does not support it"
    with pytest.raises(ValueError, match="already loaded"):
        TLoRA.attach(fresh_pipe, tensors, metadata, "mine")
    adapter.remove()
    torch.testing.assert_close(_forward(fresh_pipe, CASES["per_sample"]), trained["base"]["per_sample"],
                               rtol=1e-5, atol=1e-6)
    assert not getattr(fresh_pipe.unet, "peft_config", {}) and CLOCK not in fresh_pipe.unet.__dict__
    assert not fresh_pipe.unet._forward_pre_hooks


def test_generation_masks_each_step_with_the_sampler_timestep(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    adapter = load_adapter(fresh_pipe, tensors, metadata, "gen")
    path = next(k for k in tensors if k.endswith(".tlora.q"))[len("unet."):-len(".tlora.q")]
    kept: list[int] = []
    steps: list[torch.Tensor] = []
    lora_a = fresh_pipe.unet.get_submodule(path).lora_A["gen"]
    hooks = [lora_a.register_forward_hook(lambda m, a, out: kept.append(int((out[0, 0, :8] != 0).sum()))),
             fresh_pipe.unet.register_forward_pre_hook(lambda m, args: steps.append(args[1]))]

    def generate() -> Any:
        return fresh_pipe("sks", num_inference_steps=3, height=64, width=64, output_type="np",
                          generator=torch.Generator().manual_seed(0)).images[0]

    image = generate()
    for hook in hooks:
        hook.remove()
    assert kept == [int(adapter.schedule.ranks(t.reshape(-1))[0]) for t in steps] and len(set(kept)) == 3
    adapter.set_scale(0.0)
    assert not torch.allclose(torch.from_numpy(image), torch.from_numpy(generate()), atol=1e-4)
    adapter.remove()


def _plain_lora(tensors: dict[str, torch.Tensor], layer: str = "to_q") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for key, q in tensors.items():
        if key.endswith(f".{layer}.tlora.q"):
            prefix = key[:-len(".tlora.q")]
            d_out = tensors[prefix + ".tlora.p"].shape[0]
            out[prefix + ".lora_A.weight"] = torch.randn(2, q.shape[1], generator=g) * 0.2
            out[prefix + ".lora_B.weight"] = torch.randn(d_out, 2, generator=g) * 0.2
    return out


def test_mixes_with_other_peft_adapters_through_set_adapters(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    load_adapter(fresh_pipe, tensors, metadata, "t")
    LoRA.attach(fresh_pipe, _plain_lora(tensors), {}, "p")
    t = CASES["per_sample"]
    fresh_pipe.set_adapters(["t", "p"], [1.0, 0.0])
    torch.testing.assert_close(_forward(fresh_pipe, t), trained["reference"]["per_sample"], rtol=1e-4, atol=1e-5)
    fresh_pipe.set_adapters(["p"], [1.0])
    plain_only = _forward(fresh_pipe, t)
    assert not torch.allclose(plain_only, trained["base"]["per_sample"], atol=1e-4)
    fresh_pipe.set_adapters(["t", "p"], [1.0, 1.0])
    both = _forward(fresh_pipe, t)
    assert not torch.allclose(both, plain_only, atol=1e-4)
    assert not torch.allclose(both, trained["reference"]["per_sample"], atol=1e-4)
    router = router_for(fresh_pipe.unet)
    assert router.unsupported_reason({"p"}) is None
    assert "rank mask (T-LoRA)" in router.unsupported_reason({"t", "p"})


def test_export_lora_is_the_full_rank_update(trained) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    factors = TLoRA.export_lora(tensors, metadata)
    assert len(factors) == 4 * 14
    changed = 0
    for path, f in factors.items():
        q, p, lam, q0, p0, lam0 = (tensors[f"unet.{path}.tlora.{part}"] for part in PARTS)
        expected = p @ torch.diag(lam) @ q - p0 @ torch.diag(lam0) @ q0
        assert f.rank == 2 * q.shape[0] and f.scale == 1.0 and f.alpha == f.rank
        torch.testing.assert_close(f.scale * f.up @ f.down, expected, rtol=1e-4, atol=1e-6)
        changed += bool(expected.abs().max() > 1e-4)
    assert changed == len(factors)
    with pytest.raises(ValueError, match="not a complete T-LoRA file"):
        TLoRA.export_lora({k: v for k, v in tensors.items() if not k.endswith(".lam0")}, metadata)


def _reshape_first_q(tensors: dict) -> dict:
    key = next(k for k in tensors if k.endswith(".tlora.q"))
    return {**tensors, key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}


def _rename_first(tensors: dict) -> dict:
    key = next(k for k in tensors if ".to_q." in k)
    out = dict(tensors)
    out[key.replace(".to_q.", ".to_qq.")] = out.pop(key)
    return out


def _same(x: dict) -> dict:
    return x


@pytest.mark.parametrize(("corrupt", "corrupt_meta", "message"), [
    (_reshape_first_q, _same, r"shapes do not fit the base layer: q \(8, 65\) \(expected \(8, 64\)\)"),
    (lambda t: {k: v for k, v in t.items() if not k.endswith(".to_k.tlora.q0")}, _same,
     r"missing tensor\(s\) tlora.q0"),
    (lambda t: {**t, "text_encoder.foo.lora_A.weight": torch.zeros(1)}, _same, "not a T-LoRA key"),
    (_rename_first, _same, "no Linear layer of that name"),
    (lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, _same, "NaN"),
    (lambda t: {}, _same, "no tensors"),
    (_same, lambda m: {**m, "lorastudio.tlora.min_rank": "9"}, "needs 1 <= min_rank <= rank"),
    (_same, lambda m: {**m, "lorastudio.tlora.num_train_timesteps": "500"}, "pipeline's scheduler 1000"),
    (_same, lambda m: {k: v for k, v in m.items() if k != "lorastudio.tlora.rank"}, "missing lorastudio.tlora.rank"),
    (_same, lambda m: {**m, "lorastudio.tlora.rank": "4"}, r"rank 8 is outside 1..min\(rank 4"),
])
def test_mismatched_files_are_refused_and_nothing_is_applied(trained, fresh_pipe, corrupt, corrupt_meta,
                                                             message: str) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    TLoRA.validate_tensors(fresh_pipe, tensors, metadata)  # the real file is fine
    bad, bad_meta = corrupt(tensors), corrupt_meta(metadata)
    with pytest.raises(ValueError, match=message):
        TLoRA.validate_tensors(fresh_pipe, bad, bad_meta)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh_pipe, bad, bad_meta, "bad")
    assert not getattr(fresh_pipe.unet, "peft_config", {}) and CLOCK not in fresh_pipe.unet.__dict__


# ------------------------------------------------------------------------------------------------- resume --


def test_resume_reaches_the_same_weights(pipe, tmp_path: Path) -> None:
    records = write_images(tmp_path / "images")

    def train(work: Path, callback: Recorder, resume_from: Path | None = None, **extra: Any) -> TrainResult:
        cfg = tlora_config(max_steps=4, learning_rate=1e-3, **extra)
        dataset = ImageCaptionDataset(records, cfg.resolution)
        return Trainer(TLoRA(cfg), pipe, dataset, cfg, "sks", callback, work).run(resume_from)

    full = train(tmp_path / "a", Recorder())
    work = tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(work, Recorder(crash_at=3), checkpoint_every=1)
    kept = checkpoint_dirs(work)
    assert [p.name for p in kept] == ["step-000001", "step-000002"]
    rec = Recorder()
    resumed = train(work, rec, resume_from=kept[-1], checkpoint_every=1)
    assert [s[0] for s in rec.steps] == [3, 4]
    assert resumed.losses == full.losses and resumed.tensors.keys() == full.tensors.keys()
    assert all(torch.equal(resumed.tensors[k], full.tensors[k]) for k in full.tensors)
    assert not any(isinstance(m, TLoRALinear) for m in pipe.unet.modules()) and CLOCK not in pipe.unet.__dict__


def test_trains_under_bf16_autocast_with_gradient_checkpointing(pipe, tmp_path: Path) -> None:
    before = _forward(pipe, CASES["per_sample"])
    cfg = tlora_config(max_steps=2, mixed_precision="bf16", gradient_checkpointing=True, sig_type="middle")
    dataset = ImageCaptionDataset(write_images(tmp_path / "images", count=2), cfg.resolution)
    result = Trainer(TLoRA(cfg), pipe, dataset, cfg, "sks", Recorder()).run()
    assert all(math.isfinite(loss) for loss in result.losses) and len(result.losses) == 2
    key = next(k for k in result.tensors if k.endswith(".tlora.lam"))
    assert not torch.equal(result.tensors[key], result.tensors[key + "0"])
    assert torch.equal(_forward(pipe, CASES["per_sample"]), before)


def test_layers_of_different_rank_attach_with_their_own_rank(pipe, fresh_pipe) -> None:
    """``time_embedding.linear_1`` (32 -> 128, 2-D input) is capped at rank 32; the q projections keep 48."""
    cfg = tlora_config(rank=48, min_rank=40, target_modules=["to_q", "time_embedding.linear_1"])
    method = TLoRA(cfg)
    _randomize(method.inject(pipe.unet), seed=3)
    try:
        expected = {case: _forward(pipe, t) for case, t in CASES.items()}
        tensors, metadata = method.adapter_state_dict(), method.adapter_metadata()
    finally:
        method.remove()
    assert tensors["unet.time_embedding.linear_1.tlora.q"].shape == (32, 32)
    assert {v.shape[0] for k, v in tensors.items() if k.endswith(".to_q.tlora.q")} == {48}
    adapter = TLoRA.attach(fresh_pipe, tensors, metadata, "mixed")
    assert fresh_pipe.unet.get_submodule("time_embedding.linear_1").r["mixed"] == 64
    for case, t in CASES.items():
        torch.testing.assert_close(_forward(fresh_pipe, t), expected[case], rtol=1e-4, atol=1e-5)
    adapter.remove()


@pytest.mark.parametrize(("steps", "shape"), [
    ([100, 900], (2, 3, 6)),  # per-sample masks of ranks 5 and 2
    ([900], (2, 3, 6)),  # one mask row for the whole batch
    ([0, 700], (4, 2, 2, 6)),  # 2 samples x 2 frames folded into the batch, 4-D input
    ([300, 950], (2, 6)),  # 2-D input, one token per sample
])
def test_folded_backward_matches_autograd_of_the_formula(steps: list[int], shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double().requires_grad_(False)
    schedule = RankSchedule(8, 2, 1.0, 1000)
    owner = nn.Module()
    clock = TimestepClock.acquire(owner)
    layer = TLoRALinear(base, *ortho_init(5, 6, 5, "last", seed=2), RankMasks(schedule, clock)).double()
    _randomize([layer.q, layer.p, layer.lam], seed=4)
    clock.set(torch.tensor(steps))
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    rows = len(steps)

    def custom(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(layer, {"q": q, "p": p, "lam": lam}, (x,))

    def formula(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        masks = schedule.masks(torch.tensor(steps))[:, :5].double()
        outs = []
        for b, xb in enumerate(x.reshape(rows, -1, 6)):
            m = masks[b]
            delta = p @ torch.diag(lam * m) @ q - layer.p0 @ torch.diag(layer.lam0 * m) @ layer.q0
            outs.append(xb @ (base.weight + delta).T + base.bias)
        return torch.cat(outs).reshape(*shape[:-1], 5)

    inputs = (x, layer.q, layer.p, layer.lam)
    out = custom(*inputs)
    assert type(out.grad_fn).__name__ == "FoldedTLoRAFunctionBackward"  # the hand-written backward is in use
    torch.testing.assert_close(out, formula(*inputs))
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, inputs, grad_out),
                               torch.autograd.grad(formula(*inputs), inputs, grad_out))
    assert torch.autograd.gradcheck(custom, inputs)
    grads = torch.autograd.grad(custom(x, *inputs[1:]).sum(), inputs[1:])  # x without a gradient still works
    x.requires_grad_(False)
    torch.testing.assert_close(torch.autograd.grad(custom(x, *inputs[1:]).sum(), inputs[1:]), grads)
    clock.release(owner)
