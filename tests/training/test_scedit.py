"""SCEdit: skip-channel layout, identity init, a backward pass that never enters the encoder, the saved format,
loading back, mixing and per-sample routing of several SCEdit adapters, and refusal of files that do not fit."""

from __future__ import annotations

import collections
import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import training.methods.scedit  # noqa: F401  (registers "scedit")
from core.io import load_safetensors
from tests.training.conftest import FAST, Recorder, lora_config, save_trained, unet_inputs, unet_out, write_images
from training.artifact import load_adapter
from training.base import METHODS
from training.data import ImageCaptionDataset
from training.methods.lora import LoRA
from training.methods.scedit import (
    DIMS_KEY,
    DOWN_RATIO_KEY,
    PARTS,
    TUNERS_ATTR,
    SCEdit,
    SCEditAttachedAdapter,
    SCEditConfig,
    skip_channels,
    skip_tuner_host,
    trainable_parameter_count,
    tuner_parameter_count,
)
from training.trainer import Trainer

TINY_DIMS = [64, 64, 64, 32, 32, 32]  # block_out_channels (32, 64, 64), one resnet per down block
ENCODER = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sce_config(**overrides: Any) -> SCEditConfig:
    return SCEditConfig.from_dict({**FAST, **overrides})


def _decoder_resnets(unet) -> list[str]:
    return [n for n, _ in unet.named_modules() if n.startswith("up_blocks.") and n.count(".") == 3
            and ".resnets." in n]


def _no_hooks_left(unet) -> bool:
    return not any(m._forward_pre_hooks or hasattr(m, TUNERS_ATTR) for m in unet.modules()) \
        and skip_tuner_host(unet, create=False) is None


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_of(v)]
    return []


# ------------------------------------------------------------------------------------------------ config --

def test_config_defaults_follow_the_reference_and_refuse_lora_settings() -> None:
    cfg = SCEditConfig()
    assert cfg.down_ratio == 1.0 and cfg.learning_rate == 1e-4 and cfg.rank is None and cfg.alpha is None
    assert METHODS.get("scedit") is SCEdit and SCEdit.uses_rank is False
    with pytest.raises(ValueError, match="rank does not apply"):
        SCEditConfig.from_dict({"rank": 8})
    with pytest.raises(ValueError, match="alpha does not apply"):
        SCEditConfig.from_dict({"alpha": 4})
    with pytest.raises(ValueError, match="target_modules cannot be changed"):
        SCEditConfig.from_dict({"target_modules": "to_q,to_k"})
    with pytest.raises(ValueError, match="down_ratio must be >="):
        SCEditConfig.from_dict({"down_ratio": 0})


# ----------------------------------------------------------------------------------------- skip layout --

def test_skip_channels_match_a_real_forward(pipe) -> None:
    """The last C channels of each decoder resnet's input are exactly the encoder skip the decoder pops."""
    unet = pipe.unet
    dims = skip_channels(unet)
    assert list(dims) == _decoder_resnets(unet) and list(dims.values()) == TINY_DIMS
    skips: list[torch.Tensor] = []
    inputs: dict[str, torch.Tensor] = {}
    handles = [unet.conv_in.register_forward_hook(lambda m, a, out: skips.append(out))]
    handles += [b.register_forward_hook(lambda m, a, out: skips.extend(out[1])) for b in unet.down_blocks]
    handles += [unet.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: inputs.__setitem__(p, a[0]))
                for p in dims]
    try:
        unet_out(pipe, unet_inputs(pipe))
    finally:
        for h in handles:
            h.remove()
    assert len(skips) == len(dims)
    for (path, c), skip in zip(dims.items(), reversed(skips)):  # the decoder pops the skips last-in first-out
        assert skip.shape[1] == c, path
        assert inputs[path].shape[1] == unet.get_submodule(path).in_channels
        assert torch.equal(inputs[path][:, -c:], skip), path


def test_skip_channels_of_the_sd15_and_sdxl_layouts() -> None:
    """Reference dims (methods.md §3a): SD-1.5 12 tuners, SDXL 9; SD-1.5 at down_ratio 1 has 19.68 M parameters."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        sd15 = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)
    assert list(skip_channels(sd15).values()) == [1280] * 5 + [640] * 3 + [320] * 4
    assert list(skip_channels(sdxl).values()) == [1280] * 2 + [640] * 3 + [320] * 4
    assert tuner_parameter_count(skip_channels(sd15).values(), 1.0) == 19_680_000


# ------------------------------------------------------------------------------------------- injection --

def test_inject_returns_only_the_tuners_in_a_fixed_order(pipe) -> None:
    unet = pipe.unet
    unet.requires_grad_(False)
    method = SCEdit(sce_config(down_ratio=0.25))
    params = method.inject(unet)
    try:
        assert len(params) == 4 * len(TINY_DIMS)
        shapes = [tuple(p.shape) for p in params[:4]]
        assert shapes == [(16, 64), (16,), (64, 16), (64,)]
        trainable = [p for p in unet.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in params}
        assert trainable_parameter_count(params) == tuner_parameter_count(TINY_DIMS, 0.25)
        assert all(torch.count_nonzero(p) == 0 for p in params[2::4] + params[3::4])  # W2 and b2 start at zero
        with pytest.raises(RuntimeError, match="already injected"):
            method.inject(unet)
    finally:
        method.remove()
        unet.requires_grad_(True)
    assert _no_hooks_left(unet)


def test_parameter_count_against_lora_rank_8(pipe) -> None:
    sce = SCEdit(sce_config())
    sce_params = trainable_parameter_count(sce.inject(pipe.unet))
    sce.remove()
    lora = LoRA(lora_config(rank=8))
    lora_params = trainable_parameter_count(lora.inject(pipe.unet))
    lora.remove()
    assert sce_params == tuner_parameter_count(TINY_DIMS, 1.0) == 31_296
    assert lora_params == 14 * 4 * 8 * (64 + 64) == 57_344  # q/k/v/out of 14 attentions, all 64 -> 64 wide


def test_zero_init_is_the_identity_and_w2_changes_the_output(pipe) -> None:
    inputs = unet_inputs(pipe)
    base = unet_out(pipe, inputs)
    method = SCEdit(sce_config())
    params = method.inject(pipe.unet)
    try:
        assert torch.equal(unet_out(pipe, inputs), base)
        with torch.no_grad():
            params[2].normal_(0, 0.1)  # W2 of up_blocks.0.resnets.0
        assert not torch.allclose(unet_out(pipe, inputs), base, atol=1e-4)
    finally:
        method.remove()
    assert torch.equal(unet_out(pipe, inputs), base)
    assert _no_hooks_left(pipe.unet)


@pytest.mark.parametrize("method_name", ["scedit", "lora"])
def test_backward_never_enters_the_encoder(pipe, method_name: str) -> None:
    """No encoder output requires grad and the encoder saves nothing for backward; LoRA is the control."""
    unet = pipe.unet
    unet.requires_grad_(False)
    method = SCEdit(sce_config()) if method_name == "scedit" else LoRA(lora_config())
    params = method.inject(unet)
    for p in params:
        p.requires_grad_(True)
    region: list[str] = []
    saved: collections.Counter[str] = collections.Counter()
    needs_grad: dict[str, list[bool]] = collections.defaultdict(list)

    def enter(name: str):
        return lambda module, args: region.append(name)

    def leave(name: str):
        def hook(module, args, out) -> None:
            needs_grad[name].extend(t.requires_grad for t in _tensors_of(out))
            region.pop()
        return hook

    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    blocks += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    watched = {n: unet.get_submodule(n) for n in (*ENCODER, *blocks) if n != "down_blocks"}
    handles = [m.register_forward_pre_hook(enter(n)) for n, m in watched.items()]
    handles += [m.register_forward_hook(leave(n)) for n, m in watched.items()]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[region[-1] if region else "other"] += 1
        return t

    latents, timesteps, embeds = unet_inputs(pipe)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pred = unet(latents, timesteps, embeds, return_dict=False)[0]
            loss = F.mse_loss(pred, torch.randn_like(pred))
        leaves = _graph_leaves(loss)
        loss.backward()
        base_grads = [n for n, p in unet.named_parameters() if p.grad is not None and not any(p is q for q in params)]
        tuner_grads = [p.grad is not None for p in params]
    finally:
        for h in handles:
            h.remove()
        method.remove()
        unet.requires_grad_(True)
    assert base_grads == [] and all(tuner_grads)
    assert {id(t) for t in leaves} == {id(p) for p in params}  # the graph's only leaves are the adapter's
    assert set(needs_grad) == set(watched)  # every watched module ran
    encoder = [n for n in watched if not n.startswith("up_blocks.")]
    decoder = [n for n in watched if n.startswith("up_blocks.")]
    assert all(saved[n] > 0 and all(needs_grad[n]) for n in decoder)
    if method_name == "scedit":
        assert {n: saved[n] for n in encoder} == dict.fromkeys(encoder, 0)
        assert not any(flag for n in encoder for flag in needs_grad[n])
    else:
        assert saved["down_blocks.1"] > 0 and saved["mid_block"] > 0 and any(needs_grad["down_blocks.1"])


def _graph_leaves(loss: torch.Tensor) -> list[torch.Tensor]:
    seen, leaves, todo = set(), [], [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return leaves


def test_trainer_changes_only_the_tuners(pipe, records) -> None:
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cfg = sce_config(learning_rate=1e-2, max_steps=3)
    method = SCEdit(cfg)
    result = Trainer(method, pipe, ImageCaptionDataset(records, 64), cfg, "sks", Recorder(), keep_adapter=True).run()
    try:
        after = pipe.unet.state_dict()
        tuner_keys = {k for k in after if f".{TUNERS_ATTR}." in k}
        assert len(tuner_keys) == 4 * len(TINY_DIMS) and set(after) - tuner_keys == set(before)
        assert all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        method.remove()
    assert set(pipe.unet.state_dict()) == set(before) and _no_hooks_left(pipe.unet)
    keys = [f"unet.{p}.sc.{part}" for p in _decoder_resnets(pipe.unet) for part in PARTS]
    assert sorted(result.tensors) == sorted(keys)
    assert all(torch.count_nonzero(v) > 0 for k, v in result.tensors.items() if k.endswith(".w2"))
    assert result.metadata == {DOWN_RATIO_KEY: "1.0", DIMS_KEY: json.dumps(TINY_DIMS)}
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in result.tensors.values())


def _train(pipe, records, work_dir=None, resume_from=None, **overrides: Any):
    cfg = sce_config(learning_rate=1e-2, **overrides)
    dataset = ImageCaptionDataset(records, 64)
    return Trainer(SCEdit(cfg), pipe, dataset, cfg, "sks", Recorder(), work_dir).run(resume_from)


def test_resume_and_gradient_checkpointing_reach_the_same_tuners(pipe, records, tmp_path) -> None:
    straight = _train(pipe, records, tmp_path, max_steps=4, checkpoint_every=2)
    resumed = _train(pipe, records, resume_from=tmp_path / "checkpoints" / "step-000002", max_steps=4)
    assert resumed.losses == straight.losses
    assert all(torch.equal(resumed.tensors[k], v) for k, v in straight.tensors.items())
    checkpointed = _train(pipe, records, max_steps=2, gradient_checkpointing=True)
    torch.testing.assert_close(checkpointed.losses, straight.losses[:2], rtol=1e-5, atol=1e-7)
    assert _no_hooks_left(pipe.unet)


# ----------------------------------------------------------------------------------------- saved files --

@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory: pytest.TempPathFactory):
    """An SCEdit adapter trained a few steps and saved, with the trained UNet's output and the base output."""
    folder = tmp_path_factory.mktemp("scedit")
    cfg = sce_config(learning_rate=1e-2, max_steps=5)
    method = SCEdit(cfg)
    dataset = ImageCaptionDataset(write_images(folder / "images"), 64)
    result = Trainer(method, pipe, dataset, cfg, "sks", Recorder(), keep_adapter=True).run()
    inputs = unet_inputs(pipe)
    reference = unet_out(pipe, inputs)
    method.remove()
    base = unet_out(pipe, inputs)
    path = folder / "adapter.safetensors"
    save_trained(path, "scedit", cfg, result)
    return {"path": path, "inputs": inputs, "reference": reference, "base": base}


@pytest.fixture(scope="module")
def _second_pipe():
    from core.builtin import build_pipeline

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def fresh_pipe(_second_pipe):
    """A pipeline that never saw the training run; every SCEdit adapter is taken out again after each test."""
    yield _second_pipe
    host = skip_tuner_host(_second_pipe.unet, create=False)
    for name in host.names() if host is not None else []:
        host.remove(name)
    assert _no_hooks_left(_second_pipe.unet)


def _second_adapter(tensors: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """The trained file with fresh random W2/b2: a different, non-trivial adapter of the same shapes."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 if k.endswith((".w2", ".b2")) else v
            for k, v in tensors.items()}


def test_header_and_keys_of_the_saved_file(trained) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    assert metadata["lorastudio.method"] == "scedit" and "lorastudio.rank" not in metadata
    assert json.loads(metadata[DIMS_KEY]) == TINY_DIMS and float(metadata[DOWN_RATIO_KEY]) == 1.0
    assert tensors["unet.up_blocks.2.resnets.1.sc.w1"].shape == (32, 32)


def test_attach_reproduces_the_trained_unet(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    adapter = load_adapter(fresh_pipe, tensors, metadata, "mine")
    assert isinstance(adapter, SCEditAttachedAdapter) and adapter.name == "mine"
    out = unet_out(fresh_pipe, trained["inputs"])
    assert torch.equal(out, trained["reference"])
    assert not torch.allclose(out, trained["base"], atol=1e-4)
    adapter.set_scale(0.0)
    assert torch.equal(unet_out(fresh_pipe, trained["inputs"]), trained["base"])
    adapter.set_scale(1.0)
    assert torch.equal(unet_out(fresh_pipe, trained["inputs"]), trained["reference"])
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(fresh_pipe, tensors, metadata, "mine")
    adapter.remove()
    assert torch.equal(unet_out(fresh_pipe, trained["inputs"]), trained["base"])
    assert _no_hooks_left(fresh_pipe.unet)


def test_pipeline_generation_with_the_adapter(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    adapter = load_adapter(fresh_pipe, tensors, metadata, "gen")

    def image() -> Any:
        return fresh_pipe("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                          output_type="np").images[0]

    with_adapter = image()
    adapter.set_scale(0.0)
    without = image()
    assert with_adapter.shape == (64, 64, 3) and bool((abs(with_adapter) < 2).all())
    assert abs(with_adapter - without).max() > 1e-4


def _tuner_delta(tensors: dict[str, torch.Tensor], path: str, skip: torch.Tensor) -> torch.Tensor:
    """Δ(skip) = W2·GELU(W1·skip + b1) + b2, computed per pixel with plain matrix products."""
    w1, b1, w2, b2 = (tensors[f"unet.{path}.sc.{p}"] for p in PARTS)
    tokens = skip.permute(0, 2, 3, 1)
    out = F.gelu(tokens @ w1.T + b1) @ w2.T + b2
    return out.permute(0, 3, 1, 2)


def test_two_adapters_add_their_weighted_deltas(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    other = _second_adapter(tensors)
    a = load_adapter(fresh_pipe, tensors, metadata, "a")
    b = load_adapter(fresh_pipe, other, metadata, "b")
    a.set_scale(0.7)
    b.set_scale(0.3)
    path, c = "up_blocks.1.resnets.1", 32
    resnet = fresh_pipe.unet.get_submodule(path)
    seen: dict[str, torch.Tensor] = {}
    handles = [resnet.register_forward_pre_hook(lambda m, args: seen.__setitem__("in", args[0]), prepend=True),
               resnet.register_forward_pre_hook(lambda m, args: seen.__setitem__("edited", args[0]))]
    try:
        unet_out(fresh_pipe, trained["inputs"])
    finally:
        for h in handles:
            h.remove()
    skip = seen["in"][:, -c:]
    expected = skip + 0.7 * _tuner_delta(tensors, path, skip) + 0.3 * _tuner_delta(other, path, skip)
    assert torch.equal(seen["edited"][:, :-c], seen["in"][:, :-c])
    torch.testing.assert_close(seen["edited"][:, -c:], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(seen["edited"][:, -c:], skip, atol=1e-4)


def test_routed_batch_equals_separate_runs(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    a = load_adapter(fresh_pipe, tensors, metadata, "a")
    b = load_adapter(fresh_pipe, _second_adapter(tensors), metadata, "b")
    groups = [{"a": 1.0}, {"a": 0.5, "b": 1.0}, {}]
    separate = []
    for group in groups:
        a.set_scale(group.get("a", 0.0))
        b.set_scale(group.get("b", 0.0))
        separate.append(unet_out(fresh_pipe, trained["inputs"]))
    a.set_scale(0.25)  # whatever is applied outside, routing uses exactly the groups' weights
    b.set_scale(2.0)
    latents, timesteps, embeds = trained["inputs"]
    host = skip_tuner_host(fresh_pipe.unet)
    assert host is not None and host.can_route(["a", "b"]) and not host.can_route(["a", "nope"])
    with host.route(groups):
        routed = unet_out(fresh_pipe, (latents.repeat(3, 1, 1, 1), timesteps.repeat(3), embeds.repeat(3, 1, 1)))
        with pytest.raises(ValueError, match="does not split into 3"):
            unet_out(fresh_pipe, trained["inputs"])
    for got, want in zip(routed.chunk(3), separate):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(separate[2], trained["base"])
    assert (a.scale, b.scale) == (0.25, 2.0)
    with pytest.raises(ValueError, match="nope are not SCEdit adapters"):
        host.route([{"nope": 1.0}]).__enter__()


def _wrong_channels(tensors: dict) -> dict:
    key = "unet.up_blocks.0.resnets.0.sc.w1"
    return {**tensors, key: torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)}


@pytest.mark.parametrize(
    ("corrupt", "header", "message"),
    [
        (_wrong_channels, {}, "do not fit a skip of 64 channels"),
        (lambda t: t, {DIMS_KEY: "[64, 64, 64, 32, 32, 16]"}, "differs from this UNet's skip channels"),
        (lambda t: t, {DOWN_RATIO_KEY: "0.5"}, "hidden width 32"),
        (lambda t: {k: v for k, v in t.items() if k != "unet.up_blocks.1.resnets.0.sc.b2"}, {}, "missing sc.b2"),
        (lambda t: {k: v for k, v in t.items() if ".up_blocks.2.resnets.1." not in k}, {}, "no tuner for"),
        (lambda t: {**t, "unet.up_blocks.5.resnets.0.sc.w1": torch.zeros(1)}, {}, "no decoder resnet"),
        (lambda t: {**t, "unet.down_blocks.0.resnets.0.sc.w1": torch.zeros(1)}, {}, "not an SCEdit key"),
        (lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, {}, "NaN"),
        (lambda t: {}, {}, "no tensors"),
        (lambda t: t, {DIMS_KEY: None}, "no 'lorastudio.scedit.dims' entry"),
    ],
)
def test_bad_files_are_refused_and_nothing_is_applied(trained, fresh_pipe, corrupt, header, message: str) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    SCEdit.validate_tensors(fresh_pipe, tensors, metadata)  # the real file is fine
    bad_meta = {k: v for k, v in {**metadata, **header}.items() if v is not None}
    bad = corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        SCEdit.validate_tensors(fresh_pipe, bad, bad_meta)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh_pipe, bad, bad_meta, "bad")
    assert _no_hooks_left(fresh_pipe.unet)


def test_export_as_lora_is_refused(trained) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    with pytest.raises(ValueError, match="cannot be exported as LoRA"):
        SCEdit.export_lora(tensors, metadata)
