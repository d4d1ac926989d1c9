"""kohya export and kohya/diffusers/peft import, checked against diffusers' own loader on the tiny pipeline."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from tests.training.conftest import lora_config, unet_inputs, unet_out
from training.artifact import adapter_file_metadata
from training.base import METHODS, LoRAFactors
from training.interchange import (
    TEXT_ENCODER_REFUSAL,
    ExportInfo,
    architecture,
    detect_format,
    header_hints,
    import_lora,
    kohya_file_bytes,
    kohya_name,
    kohya_tensors,
)
from training.methods.lora import DIFFUSERS_METADATA_KEY, LoRA

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
INFO = ExportInfo(title="disc", method="lora", base_model="builtin:tiny-sd", trigger_words=("sks",), steps=7,
                  created_at=datetime(2026, 1, 2, tzinfo=timezone.utc), resolution=64, num_train_images=3)
SOME = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.proj_in", "mid_block.resnets.0.conv1", "up_blocks.0.resnets.1.time_emb_proj",
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2"]


@pytest.fixture(scope="module")
def source(pipe):
    """Our LoRA (rank 4, alpha 6: scale 1.5) on attention, feed-forward, conv and time layers, random factors."""
    method = LoRA(lora_config(rank=4, alpha=6, target_modules=TARGETS))
    params = method.inject(pipe.unet)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    inputs = unet_inputs(pipe)
    reference = unet_out(pipe, inputs)
    tensors, method_metadata = method.adapter_state_dict(), method.adapter_metadata()
    method.remove()
    metadata = adapter_file_metadata("lora", method.config, "builtin:tiny-sd", "0" * 16, ["sks"], "subject", 7,
                                     method_metadata=method_metadata)
    return {"tensors": tensors, "metadata": metadata, "inputs": inputs, "reference": reference,
            "base": unet_out(pipe, inputs), "layers": LoRA.export_lora(tensors, metadata)}


@pytest.fixture(scope="module")
def _other_pipe():
    from core.builtin import build_pipeline

    return build_pipeline()


@pytest.fixture()
def fresh(_other_pipe):
    """A second tiny pipeline (same weights); every LoRA layer is unloaded after each test."""
    yield _other_pipe
    _other_pipe.unload_lora_weights()
    assert not any("lora" in n for n, _ in _other_pipe.unet.named_parameters())


def _lora_layer_count(module: nn.Module, adapter: str) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in module.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A)


def _random_layers(pipe, paths: list[str], ranks: list[int], alphas: list[float], seed: int = 0,
                   std: float = 0.05) -> dict[str, LoRAFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, rank, alpha in zip(paths, ranks, alphas, strict=True):
        layer = pipe.unet.get_submodule(path)
        if isinstance(layer, nn.Linear):
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        else:
            down, up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
        out[path] = LoRAFactors(torch.randn(down, generator=g) * std, torch.randn(up, generator=g) * std,
                                alpha / rank)
    return out


@torch.no_grad()
def _merged_out(pipe, layers: dict[str, LoRAFactors], inputs) -> torch.Tensor:
    """The oracle: the UNet output with each ΔW = scale · up @ down added to its base weight (then taken out)."""
    saved = {}
    for path, f in layers.items():
        weight = pipe.unet.get_submodule(path).weight
        saved[path] = weight.clone()
        up = f.up.reshape(f.up.shape[0], f.rank)
        weight += f.scale * (up @ f.down.reshape(f.rank, -1)).reshape(weight.shape)
    try:
        return unet_out(pipe, inputs)
    finally:
        for path, weight in saved.items():
            pipe.unet.get_submodule(path).weight.copy_(weight)


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _attach_imported(pipe, imported, name: str = "imported") -> None:
    LoRA.attach(pipe, imported.tensors, imported.metadata, name)


# export ---------------------------------------------------------------------------------------------------------


def test_kohya_names_follow_sd_scripts() -> None:
    assert kohya_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya_name("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") == \
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"


def test_fp32_export_loads_in_diffusers_exactly(source, fresh, tmp_path: Path) -> None:
    layers = source["layers"]
    targeted = [n for n, m in fresh.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
                and any(n == t or n.endswith(f".{t}") for t in TARGETS)]
    assert sorted(layers) == sorted(targeted) and len(layers) == 92
    path = tmp_path / "disc.safetensors"
    path.write_bytes(kohya_file_bytes(layers, INFO, source["metadata"], precision="fp32"))
    fresh.load_lora_weights(str(path), adapter_name="kohya")
    assert _lora_layer_count(fresh.unet, "kohya") == len(layers)  # no layer silently dropped
    assert _lora_layer_count(fresh.text_encoder, "kohya") == 0
    out = unet_out(fresh, source["inputs"])
    torch.testing.assert_close(out, source["reference"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, source["base"], atol=1e-3)


def test_fp16_export_is_close(source, fresh) -> None:
    blob = kohya_file_bytes(source["layers"], INFO, source["metadata"])
    tensors = load_bytes(blob)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    fresh.load_lora_weights(tensors, adapter_name="kohya16")
    assert _lora_layer_count(fresh.unet, "kohya16") == len(source["layers"])
    out = unet_out(fresh, source["inputs"])
    effect = (source["reference"] - source["base"]).abs().max()
    assert (out - source["reference"]).abs().max() < 0.01 * effect


def test_export_header(source) -> None:
    blob = kohya_file_bytes(source["layers"], INFO, source["metadata"])
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    meta = header.pop("__metadata__")
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in header)
    digest = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    assert meta["sshs_model_hash"] == digest and meta["modelspec.hash_sha256"] == f"0x{digest}"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6")
    assert meta["ss_base_model_version"] == "tiny-sd"
    assert meta["modelspec.architecture"] == "lorastudio-tiny-sd/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "disc"
    assert meta["modelspec.resolution"] == "64x64" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.date"].startswith("2026-01-02") and meta["ss_num_train_images"] == "3"
    assert meta["ss_steps"] == "7" and meta["ss_output_name"] == "disc"
    assert meta["lorastudio.method"] == "lora" and meta["lorastudio.trigger_words"] == '["sks"]'
    assert DIFFUSERS_METADATA_KEY not in meta  # diffusers refuses network alphas plus a LoraConfig header
    alpha = load_bytes(blob)[kohya_name(SOME[0]) + ".alpha"]
    assert alpha.ndim == 0 and alpha.item() == 6.0


def test_architecture_from_cross_attention_width() -> None:
    def with_width(width: int) -> dict[str, LoRAFactors]:
        return {"mid_block.attentions.0.transformer_blocks.0.attn2.to_k": LoRAFactors(
            torch.zeros(4, width), torch.zeros(320, 4), 1.0)}

    assert architecture(with_width(768), "runwayml/sd15")[:2] == ("sd_v1", "stable-diffusion-v1/lora")
    assert architecture(with_width(1024), "x/sd2")[0] == "sd_v2"
    assert architecture(with_width(2048), "x/sdxl")[:2] == ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")
    assert architecture(with_width(64), "x/other")[0] == "unknown"


def test_export_refuses_values_fp16_cannot_hold(pipe) -> None:
    layers = _random_layers(pipe, SOME[:1], [2], [2.0])
    big = {p: LoRAFactors(f.down * 1e6, f.up, f.scale) for p, f in layers.items()}
    with pytest.raises(ValueError, match="do not fit fp16"):
        kohya_tensors(big, "fp16")
    assert kohya_tensors(big, "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        kohya_tensors(layers, "int8")


# import ---------------------------------------------------------------------------------------------------------


def test_kohya_round_trip_reproduces_our_lora(source, fresh) -> None:
    exported = load_bytes(kohya_file_bytes(source["layers"], INFO, source["metadata"], precision="fp32"))
    imported = import_lora(exported, {}, fresh)
    assert (imported.format, imported.rank, imported.alpha, imported.folded) == ("kohya", 4, 6.0, False)
    assert imported.layers == len(source["layers"])
    assert imported.tensors.keys() == source["tensors"].keys()
    assert all(torch.equal(imported.tensors[k], source["tensors"][k]) for k in source["tensors"])
    _attach_imported(fresh, imported)
    torch.testing.assert_close(unet_out(fresh, source["inputs"]), source["reference"], rtol=1e-5, atol=1e-6)


def _kohya_by_hand(layers: dict[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """A kohya state dict with each layer's own alpha (``kohya_tensors`` would give them all one alpha)."""
    state = {}
    for path, f in layers.items():
        name = kohya_name(path)
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = f.down, f.up
        state[f"{name}.alpha"] = torch.tensor(f.alpha)
    return state


def test_kohya_per_layer_alphas_and_ranks_are_folded(pipe, fresh) -> None:
    layers = _random_layers(pipe, SOME, [2, 4, 4, 8, 4, 2], [1.0, 4.0, 2.0, 16.0, 0.5, 2.0], seed=1, std=0.2)
    state = _kohya_by_hand(layers)
    inputs = unet_inputs(fresh)
    oracle = _merged_out(fresh, layers, inputs)
    imported = import_lora(state, {}, fresh)
    assert imported.folded and imported.alpha is None and imported.rank == 8
    _attach_imported(fresh, imported)
    out = unet_out(fresh, inputs)
    torch.testing.assert_close(out, oracle, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, unet_out(pipe, inputs), atol=1e-4)


def test_kohya_uniform_rank_mixed_alpha_folds_to_one_alpha(pipe, fresh) -> None:
    layers = _random_layers(pipe, SOME[:3], [4, 4, 4], [1.0, 8.0, 4.0], seed=2, std=0.2)
    state = _kohya_by_hand(layers)
    inputs = unet_inputs(fresh)
    oracle = _merged_out(fresh, layers, inputs)
    imported = import_lora(state, {}, fresh)
    assert (imported.rank, imported.alpha, imported.folded) == (4, 4.0, True)
    _attach_imported(fresh, imported)
    torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)


def test_export_with_per_layer_ranks_and_alphas_loads_in_diffusers(pipe, fresh) -> None:
    """Such layers come from methods other than plain LoRA; the file gets one alpha so every loader agrees."""
    layers = _random_layers(pipe, SOME, [2, 4, 4, 8, 4, 2], [1.0, 4.0, 2.0, 16.0, 4.0, 2.0], seed=6, std=0.2)
    state = kohya_tensors(layers, "fp32")
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {4.0}
    inputs = unet_inputs(fresh)
    oracle = _merged_out(fresh, layers, inputs)
    fresh.load_lora_weights(dict(state), adapter_name="kohya")
    assert _lora_layer_count(fresh.unet, "kohya") == len(SOME)
    torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)
    fresh.unload_lora_weights()
    _attach_imported(fresh, import_lora(state, {}, fresh))
    torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)


def _diffusers_state(layers: dict[str, LoRAFactors], spelling: str) -> dict[str, torch.Tensor]:
    out = {}
    for path, f in layers.items():
        if spelling == "peft":
            out[f"unet.{path}.lora_A.weight"], out[f"unet.{path}.lora_B.weight"] = f.down, f.up
        else:  # the older diffusers spelling
            out[f"unet.{path}.lora.down.weight"], out[f"unet.{path}.lora.up.weight"] = f.down, f.up
    return out


@pytest.mark.parametrize("spelling", ["peft", "old"])
def test_diffusers_file_imports_like_diffusers_loads_it(pipe, fresh, tmp_path: Path, spelling: str) -> None:
    layers = _random_layers(pipe, SOME, [4] * len(SOME), [2.0] * len(SOME), seed=4, std=0.2)
    header = {DIFFUSERS_METADATA_KEY: json.dumps({"unet.r": 4, "unet.lora_alpha": 2.0,
                                                  "unet.target_modules": sorted(layers)})}
    path = _write(tmp_path / "pytorch_lora_weights.safetensors", _diffusers_state(layers, spelling), header)
    inputs = unet_inputs(fresh)
    oracle = _merged_out(fresh, layers, inputs)
    if spelling == "peft":  # diffusers' own loader agrees
        fresh.load_lora_weights(str(path), adapter_name="diffusers")
        assert _lora_layer_count(fresh.unet, "diffusers") == len(SOME)
        torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)
        fresh.unload_lora_weights()
    from core.io import load_safetensors

    imported = import_lora(*load_safetensors(path), fresh)
    assert (imported.format, imported.rank, imported.alpha, imported.layers) == ("diffusers", 4, 2.0, len(SOME))
    _attach_imported(fresh, imported)
    torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)


def test_peft_file_with_given_alpha(pipe, fresh) -> None:
    layers = _random_layers(pipe, SOME, [4] * len(SOME), [3.0] * len(SOME), seed=5, std=0.2)
    peft_state = {f"base_model.model.{p}.lora_{ab}.weight": t for p, f in layers.items()
                  for ab, t in (("A", f.down), ("B", f.up))}
    inputs = unet_inputs(fresh)
    oracle = _merged_out(fresh, layers, inputs)
    imported = import_lora(peft_state, {}, fresh, alpha=3.0)
    assert (imported.format, imported.alpha, imported.layers) == ("peft", 3.0, len(SOME))
    _attach_imported(fresh, imported)
    torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)
    fresh.unload_lora_weights()
    assert import_lora(peft_state, {}, fresh).alpha == 4.0  # no alpha anywhere: alpha = rank, scale 1


def _kohya_of(pipe, paths: list[str]) -> dict[str, torch.Tensor]:
    return kohya_tensors(_random_layers(pipe, paths, [2] * len(paths), [2.0] * len(paths)), "fp32")


def _te_key(state: dict) -> dict:
    return {**state, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 64),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(64, 2)}


def _rename(state: dict, old: str, new: str) -> dict:
    return {k.replace(old, new): v for k, v in state.items()}


def _reshape(state: dict) -> dict:
    key = next(k for k in state if k.endswith("lora_down.weight"))
    return {**state, key: torch.zeros(2, 7)}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: _rename(s, "to_q", "to_qq"), "to_qq"),
        (lambda s: _rename(s, "down_blocks_1", "down_blocks_9"), "not a Linear or Conv2d layer"),
        (_reshape, "do not fit the base layer"),
        (_te_key, TEXT_ENCODER_REFUSAL),
        (lambda s: _te_key({}), TEXT_ENCODER_REFUSAL),
        (lambda s: {**s, next(iter(s)).split(".")[0] + ".dora_scale": torch.ones(1)}, "DoRA"),
        (lambda s: {**s, "lora_unet_mid_block_resnets_0_conv1.hada_w1_a": torch.ones(1)}, "LyCORIS"),
        (lambda s: {k: v for k, v in s.items() if "lora_up" not in k or "attn1" not in k}, "needs both"),
        (lambda s: {k: torch.full_like(v, float("nan")) if "lora_up" in k else v for k, v in s.items()}, "NaN"),
        (lambda s: {k: torch.tensor(-1.0) if k.endswith(".alpha") else v for k, v in s.items()}, ">= 0"),
        (lambda s: {**s, "model.diffusion_model.out.2.weight": torch.zeros(1)}, "mixes kohya keys"),
        (lambda s: {"model.diffusion_model.out.2.weight": torch.zeros(1)}, "not a LoRA file"),
        (lambda s: {}, "no tensors"),
    ],
    ids=["unknown-module", "unknown-block", "wrong-shape", "mixed-text-encoder", "text-encoder-only", "dora",
         "lycoris", "half-pair", "nan", "negative-alpha", "mixed-keys", "checkpoint", "empty"],
)
def test_import_refuses_whole_files(pipe, fresh, corrupt, message: str) -> None:
    state = _kohya_of(pipe, SOME[:3])
    import_lora(state, {}, fresh)  # the untouched file is fine
    with pytest.raises(ValueError, match=message):
        import_lora(corrupt(state), {}, fresh)


@pytest.mark.parametrize(
    ("state", "metadata", "message"),
    [
        ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}, {},
         TEXT_ENCODER_REFUSAL),
        ({"base_model.model.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64)}, {},
         TEXT_ENCODER_REFUSAL),
        ({"unet.mid_block.attentions.0.proj_in.lora_magnitude_vector": torch.zeros(64)}, {}, "DoRA"),
        ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 64, 1, 1)}, {"lora_adapter_metadata":
                                                                                          "{"}, "unreadable"),
        ({"unet.up_blocks.0.resnets.0.sc.w1": torch.zeros(8, 128)}, {"lorastudio.method": "scedit"},
         "LoRA Studio scedit adapter file"),
    ],
    ids=["diffusers-text-encoder", "peft-text-encoder", "diffusers-dora", "bad-header", "scedit-native"],
)
def test_import_refuses_diffusers_and_peft_files(fresh, state, metadata, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        import_lora(state, metadata, fresh)


def test_alpha_argument_only_for_files_without_one(pipe, fresh) -> None:
    with pytest.raises(ValueError, match="kohya files carry their own alpha"):
        import_lora(_kohya_of(pipe, SOME[:1]), {}, fresh, alpha=2.0)
    layers = _random_layers(pipe, SOME[:1], [2], [2.0])
    header = {DIFFUSERS_METADATA_KEY: json.dumps({"unet.lora_alpha": 1.0})}
    with pytest.raises(ValueError, match="gives its own alpha"):
        import_lora(_diffusers_state(layers, "peft"), header, fresh, alpha=2.0)
    with pytest.raises(ValueError, match="alpha must be a number > 0"):
        import_lora(_diffusers_state(layers, "peft"), {}, fresh, alpha=0.0)


def test_detect_format_and_header_hints() -> None:
    assert detect_format(["lora_unet_x.alpha"]) == "kohya"
    assert detect_format(["base_model.model.x.lora_A.weight"]) == "peft"
    assert detect_format(["unet.x.lora_A.weight"]) == "diffusers"
    assert detect_format(["down_blocks.0.attentions.0.proj_in.lora.down.weight"]) == "diffusers"
    hints = header_hints({"lorastudio.trigger_words": '["sks"]', "lorastudio.kind": "subject", "ss_steps": "12",
                          "lorastudio.base_model": "builtin:tiny-sd"})
    assert hints == {"trigger_words": ["sks"], "kind": "subject", "steps": 12, "base_model": "builtin:tiny-sd"}
    assert header_hints({"modelspec.trigger_phrase": "ohwx, in the style"}) == {
        "trigger_words": ["ohwx", "in the style"]}
    assert header_hints({}) == {}


@pytest.mark.parametrize("name", sorted(n for n in METHODS.names()  # video methods: test_motion_director
                                     if getattr(METHODS.get(n), "base_kind", "image") == "image"))
def test_every_exportable_method_loads_in_diffusers_as_exported(name: str, pipe, fresh) -> None:
    """Whatever ``export_lora`` says a method's update is, diffusers gets exactly that from the kohya file."""
    cls = METHODS.get(name)
    method = cls(cls.config_cls.from_dict({}))
    params = method.inject(pipe.unet)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    try:
        tensors, metadata = method.adapter_state_dict(), method.adapter_metadata()
    finally:
        method.remove()
    try:
        layers = cls.export_lora(tensors, metadata)
    except ValueError:
        pytest.skip(f"{name} adapters are not plain low-rank updates (exported in the native format)")
    inputs = unet_inputs(fresh)
    oracle = _merged_out(fresh, layers, inputs)
    fresh.load_lora_weights(load_bytes(kohya_file_bytes(layers, INFO, metadata, "fp32")), adapter_name=name)
    assert _lora_layer_count(fresh.unet, name) == len(layers)
    torch.testing.assert_close(unet_out(fresh, inputs), oracle, rtol=1e-5, atol=1e-6)
