"""Plain LoRA: injection, the lean training forward, saved keys, validation, and loading back for inference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from core.io import load_safetensors
from tests.training.conftest import Recorder, lora_config, save_trained, unet_inputs, unet_out
from training.artifact import adapter_file_metadata, load_adapter
from training.data import ImageCaptionDataset
from training.methods.lora import TRAIN_ADAPTER, LoRA
from training.trainer import Trainer

KEY = re.compile(r"unet\.[\w.]+\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight")


def _randomize(params: list[torch.nn.Parameter], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_inject_trains_only_adapter_parameters(pipe) -> None:
    unet = pipe.unet
    unet.requires_grad_(False)
    method = LoRA(lora_config(rank=4))
    params = method.inject(unet)
    try:
        trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in unet.named_parameters() if any(p is q for q in params)}
        assert len(params) == 2 * 4 * 14  # lora_A + lora_B on q/k/v/out of 14 attention modules
        assert all("lora_" in n for n in trainable)
        assert {p.shape[0] for p in params[::2]} == {4}
    finally:
        method.remove()
    assert not any(p.requires_grad for p in unet.parameters())
    unet.requires_grad_(True)


def test_remove_restores_the_base_unet(pipe) -> None:
    inputs = unet_inputs(pipe)
    before = unet_out(pipe, inputs)
    method = LoRA(lora_config())
    _randomize(method.inject(pipe.unet))
    assert not torch.allclose(unet_out(pipe, inputs), before)
    method.remove()
    assert torch.equal(unet_out(pipe, inputs), before)
    assert not getattr(pipe.unet, "peft_config", {})


@pytest.mark.parametrize("rows", [4, 4096])  # folded B·A path for small layers, two-matmul path for large ones
def test_lean_forward_equals_peft_forward(pipe, rows: int) -> None:
    method = LoRA(lora_config(rank=4, alpha=12))
    _randomize(method.inject(pipe.unet))
    try:
        layer = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
        assert "forward" in layer.__dict__
        x = torch.randn(1, rows, layer.in_features, requires_grad=True)
        lean = layer(x)
        (grad_lean,) = torch.autograd.grad(lean.sum(), [layer.lora_A[TRAIN_ADAPTER].weight])
        reference = type(layer).forward(layer, x)
        (grad_ref,) = torch.autograd.grad(reference.sum(), [layer.lora_A[TRAIN_ADAPTER].weight])
        torch.testing.assert_close(lean, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_lean, grad_ref, rtol=1e-4, atol=1e-4)
    finally:
        method.remove()


def test_state_dict_holds_only_lora_tensors_in_diffusers_format(pipe) -> None:
    method = LoRA(lora_config(rank=4))
    method.inject(pipe.unet)
    try:
        tensors = method.adapter_state_dict()
        metadata = method.adapter_metadata()
    finally:
        method.remove()
    assert len(tensors) == 2 * 4 * 14 and all(KEY.fullmatch(k) for k in tensors)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in tensors.values())
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["lorastudio.rank"] == "4"


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA (rank 4, alpha 8: scale 2) trained a few steps, saved, with the trained UNet's reference output."""
    from tests.training.conftest import write_images

    folder = tmp_path_factory.mktemp("trained")
    cfg = lora_config(rank=4, alpha=8, learning_rate=1e-2, max_steps=5)
    method = LoRA(cfg)
    dataset = ImageCaptionDataset(write_images(folder / "images"), 64)
    result = Trainer(method, pipe, dataset, cfg, "sks", Recorder(), keep_adapter=True).run()
    inputs = unet_inputs(pipe)
    reference = unet_out(pipe, inputs)
    method.remove()
    base = unet_out(pipe, inputs)
    path = folder / "adapter.safetensors"
    save_trained(path, "lora", cfg, result)
    return {"path": path, "inputs": inputs, "reference": reference, "base": base}


@pytest.fixture()
def fresh_pipe(_second_pipe):
    """A pipeline that never saw the training run; every LoRA layer is taken out again after each test."""
    yield _second_pipe
    _second_pipe.unload_lora_weights()
    assert not any("lora" in n for n, _ in _second_pipe.unet.named_parameters())


def test_attach_reproduces_the_trained_unet(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    adapter = LoRA.attach(fresh_pipe, tensors, metadata, "mine")
    out = unet_out(fresh_pipe, trained["inputs"])
    torch.testing.assert_close(out, trained["reference"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, trained["base"], atol=1e-4)
    adapter.set_scale(0.0)
    torch.testing.assert_close(unet_out(fresh_pipe, trained["inputs"]), trained["base"], rtol=1e-5, atol=1e-6)
    adapter.set_scale(1.0)
    torch.testing.assert_close(unet_out(fresh_pipe, trained["inputs"]), trained["reference"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="already loaded"):
        LoRA.attach(fresh_pipe, tensors, metadata, "mine")
    adapter.remove()
    torch.testing.assert_close(unet_out(fresh_pipe, trained["inputs"]), trained["base"], rtol=1e-5, atol=1e-6)


def test_diffusers_loads_the_saved_file(trained, fresh_pipe) -> None:
    fresh_pipe.load_lora_weights(str(trained["path"]), adapter_name="from_file")
    torch.testing.assert_close(unet_out(fresh_pipe, trained["inputs"]), trained["reference"], rtol=1e-4, atol=1e-5)


def test_load_adapter_dispatches_on_the_method_in_the_header(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    assert metadata["lorastudio.method"] == "lora"
    adapter = load_adapter(fresh_pipe, tensors, metadata, "dispatched")
    assert adapter.name == "dispatched"
    torch.testing.assert_close(unet_out(fresh_pipe, trained["inputs"]), trained["reference"], rtol=1e-4, atol=1e-5)


def _rename_first(tensors: dict) -> dict:
    key = next(iter(tensors))
    out = dict(tensors)
    out[key.replace("to_q", "to_qq").replace("to_k", "to_kk")] = out.pop(key)
    return out


def _reshape_first(tensors: dict) -> dict:
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    out = dict(tensors)
    out[key] = torch.zeros(out[key].shape[0], out[key].shape[1] + 1)
    return out


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_rename_first, "no Linear or Conv2d layer of that name"),
        (_reshape_first, "do not fit the base layer"),
        (lambda t: {k: v for i, (k, v) in enumerate(t.items()) if i != 1}, "not both lora_A and lora_B"),
        (lambda t: {**t, "text_encoder.foo.lora_A.weight": torch.zeros(1)}, "not a UNet LoRA key"),
        (lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()}, "NaN"),
        (lambda t: {}, "no tensors"),
    ],
)
def test_validate_tensors_refuses_a_mismatched_file(trained, fresh_pipe, corrupt, message: str) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    LoRA.validate_tensors(fresh_pipe, tensors, metadata)  # the real file is fine
    bad = corrupt(tensors)
    with pytest.raises(ValueError, match=message):
        LoRA.validate_tensors(fresh_pipe, bad, metadata)
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh_pipe, bad, metadata, "bad")
    assert not getattr(fresh_pipe.unet, "peft_config", {})  # nothing was applied


def test_load_adapter_refuses_unknown_methods(trained, fresh_pipe) -> None:
    tensors, metadata = load_safetensors(trained["path"])
    with pytest.raises(ValueError, match="unknown method 'dora'; known: .*lora"):
        load_adapter(fresh_pipe, tensors, {**metadata, "lorastudio.method": "dora"}, "x")
    with pytest.raises(ValueError, match="no 'lorastudio.method'"):
        load_adapter(fresh_pipe, tensors, {}, "x")


def test_adapter_file_metadata_is_all_strings(tmp_path: Path) -> None:
    cfg = lora_config(rank=4)
    meta = adapter_file_metadata("lora", cfg, "builtin:tiny-sd", "abc", ["sks", "ohwx"], "subject", 200,
                                 method_metadata={"lora_adapter_metadata": "{}"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["format"] == "pt" and meta["lorastudio.method"] == "lora" and meta["lorastudio.steps"] == "200"
    assert meta["lorastudio.rank"] == "4" and meta["lorastudio.trigger_words"] == '["sks", "ohwx"]'
    assert meta["lorastudio.base_model"] == "builtin:tiny-sd" and meta["lorastudio.kind"] == "subject"
    assert "lora_adapter_metadata" in meta
    with pytest.raises(KeyError, match="unknown method"):
        adapter_file_metadata("nope", cfg, "b", "h", [], "style", 1)
    with pytest.raises(ValueError, match="overwrite"):
        adapter_file_metadata("lora", cfg, "b", "h", [], "style", 1, method_metadata={"lorastudio.method": "x"})
