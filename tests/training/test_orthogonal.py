"""Orthogonal adaptation: the shared basis, frozen lora_A, orthogonality of concepts trained apart, the merged sum,
and the saved file (peft format + basis header)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import training.methods.orthogonal  # noqa: F401  (registers "orthogonal")
from core.io import load_safetensors
from tests.training.conftest import FAST, Recorder, save_trained, unet_inputs, write_images
from training.artifact import load_adapter
from training.base import METHODS, LoRAFactors
from training.data import ImageCaptionDataset
from training.methods.lora import TRAIN_ADAPTER
from training.methods.orthogonal import (
    DEFAULT_BASIS_SEED,
    META_SEED,
    META_SLOT,
    OrthogonalAdaptation,
    OrthogonalConfig,
    adapted_input_sizes,
    orthogonal_basis,
    slot_count,
    slot_rows,
    unet_skeleton,
)
from training.trainer import Trainer

PATH = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
TOL = 1e-5


def ortho_config(**overrides) -> OrthogonalConfig:
    return OrthogonalConfig.from_dict({**FAST, **overrides})


def _attention_inputs(unet) -> list[int]:
    return [m.in_features for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]


# the basis --------------------------------------------------------------------------------------------------


def test_basis_is_deterministic_orthogonal_and_keyed_by_seed_and_path() -> None:
    basis = orthogonal_basis(7, PATH, 48)
    assert basis.shape == (48, 48) and basis.dtype == torch.float64
    assert torch.equal(basis, orthogonal_basis(7, PATH, 48))
    torch.testing.assert_close(basis @ basis.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.allclose(basis, orthogonal_basis(8, PATH, 48))
    assert not torch.allclose(basis, orthogonal_basis(7, PATH.replace("to_q", "to_k"), 48))
    # a slot's rows are the same rows of the full basis, although only the leading columns are factorised
    torch.testing.assert_close(slot_rows(7, PATH, 48, 4, 3), basis[12:16], rtol=0, atol=1e-12)
    torch.testing.assert_close(orthogonal_basis(7, PATH, 48, 5), basis[:5], rtol=0, atol=1e-12)


def test_basis_values_are_pinned() -> None:
    """Changing how the basis is drawn would make new adapters non-orthogonal to every adapter already trained."""
    got = orthogonal_basis(DEFAULT_BASIS_SEED, PATH, 8)[:2, :3]
    want = torch.tensor([[0.28738936887511457, 0.17881233428720966, 0.008311877897630549],
                         [-0.25196192393444217, -0.26479075778137157, 0.13001931661058508]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_config_defaults_and_bounds() -> None:
    cfg = OrthogonalConfig()
    assert cfg.rank == 4 and cfg.effective_alpha == 4.0  # scale 1: the reference's plain sum
    assert cfg.basis_slot == -1 and cfg.slot == 0 and cfg.basis_seed == DEFAULT_BASIS_SEED
    assert OrthogonalConfig.from_dict({"basis_slot": 3}).slot == 3
    with pytest.raises(ValueError, match="basis_slot must be >= -1"):
        OrthogonalConfig.from_dict({"basis_slot": -2})
    assert METHODS.get("orthogonal") is OrthogonalAdaptation


# injection --------------------------------------------------------------------------------------------------


def test_inject_sets_frozen_basis_rows_and_trains_only_lora_b(pipe) -> None:
    unet = pipe.unet
    unet.requires_grad_(False)
    n_layers = len(_attention_inputs(unet))
    method = OrthogonalAdaptation(ortho_config(basis_slot=2))
    params = method.inject(unet)
    try:
        layers = {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and TRAIN_ADAPTER in m.lora_A}
        assert len(params) == len(layers) == n_layers > 0
        assert all(p.requires_grad and not p.any() for p in params)  # lora_B, all zero
        assert {id(p) for p in params} == {id(m.lora_B[TRAIN_ADAPTER].weight) for m in layers.values()}
        for path, layer in layers.items():
            down = layer.lora_A[TRAIN_ADAPTER].weight
            assert not down.requires_grad
            want = slot_rows(DEFAULT_BASIS_SEED, path, down.shape[1], 4, 2).float()
            assert torch.equal(down, want), path
        latents, timesteps, embeds = unet_inputs(pipe)
        unet(latents, timesteps, embeds, return_dict=False)[0].square().mean().backward()
        layer = layers[PATH]
        assert layer.lora_A[TRAIN_ADAPTER].weight.grad is None
        assert layer.lora_B[TRAIN_ADAPTER].weight.grad is not None
    finally:
        method.remove()
        unet.zero_grad(set_to_none=True)
    assert not getattr(unet, "peft_config", {})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"basis_slot": 999}, r"basis_slot 999 is out of range: rank 4 on this UNet allows slots 0 to \d+"),
        ({"rank": 1024}, "rank 1024 is larger than the smallest adapted layer's input size"),
        ({"target_modules": ["to_q", "nope"]}, "nope match no UNet layer"),
    ],
)
def test_inject_refuses_a_slot_that_does_not_fit(pipe, settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OrthogonalAdaptation(ortho_config(**settings)).inject(pipe.unet)
    assert not getattr(pipe.unet, "peft_config", {})  # nothing was added


def test_slot_count_is_min_input_over_rank_and_the_skeleton_agrees(pipe, tmp_path: Path) -> None:
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    sizes = adapted_input_sizes(pipe.unet, targets)
    inputs = _attention_inputs(pipe.unet)
    assert len(sizes) == len(inputs) and min(sizes.values()) == min(inputs)
    assert slot_count(sizes, 4) == min(inputs) // 4 and slot_count(sizes, min(inputs) + 1) == 0
    pipe.unet.save_config(tmp_path)
    skeleton = unet_skeleton(tmp_path)
    assert next(skeleton.parameters()).device.type == "meta"
    assert adapted_input_sizes(skeleton, targets) == sizes


# concepts trained apart -------------------------------------------------------------------------------------


def _train(pipe, folder: Path, image_seed: int, slot: int) -> dict:
    cfg = ortho_config(basis_slot=slot, learning_rate=1e-2, max_steps=3)
    dataset = ImageCaptionDataset(write_images(folder, seed=image_seed), 64)
    result = Trainer(OrthogonalAdaptation(cfg), pipe, dataset, cfg, "sks", Recorder()).run()
    path = folder / "adapter.safetensors"
    metadata = save_trained(path, "orthogonal", cfg, result)
    return {"path": path, "tensors": result.tensors, "metadata": metadata, "slot": slot}


@pytest.fixture(scope="module")
def concepts(pipe, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Concept a in slot 0, concept b (other images) in slot 1, and b's images again in slot 0 as c."""
    root = tmp_path_factory.mktemp("ortho")
    return {"a": _train(pipe, root / "a", 0, 0), "b": _train(pipe, root / "b", 1, 1),
            "c": _train(pipe, root / "c", 1, 0)}


def _deltas(concept: dict) -> dict[str, torch.Tensor]:
    factors: dict[str, LoRAFactors] = OrthogonalAdaptation.export_lora(concept["tensors"], concept["metadata"])
    return {path: f.scale * f.up.double().flatten(1) @ f.down.double().flatten(1) for path, f in factors.items()}


def test_training_leaves_lora_a_on_the_basis_and_moves_lora_b(concepts) -> None:
    for concept in concepts.values():
        tensors = concept["tensors"]
        downs = {k: v for k, v in tensors.items() if k.endswith("lora_A.weight")}
        ups = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
        assert len(downs) == len(ups) > 0
        for key, down in downs.items():
            path = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            want = slot_rows(DEFAULT_BASIS_SEED, path, down.shape[1], 4, concept["slot"]).float()
            assert torch.equal(down, want), key
        assert sum(float(u.abs().sum()) for u in ups) > 0  # lora_B was trained away from zero
        assert concept["metadata"][META_SLOT] == str(concept["slot"])
        assert concept["metadata"][META_SEED] == str(DEFAULT_BASIS_SEED)


def _relative_overlaps(first: dict, second: dict) -> tuple[float, float]:
    """Worst layer of |⟨ΔW_i, ΔW_j⟩_F| and ‖ΔW_i·ΔW_jᵀ‖_F, each divided by ‖ΔW_i‖_F·‖ΔW_j‖_F."""
    da, db = _deltas(first), _deltas(second)
    assert da.keys() == db.keys()
    inner, cross = 0.0, 0.0
    for path in da:
        norms = float(da[path].norm() * db[path].norm())
        assert norms > 0, path
        inner = max(inner, abs(float((da[path] * db[path]).sum())) / norms)
        cross = max(cross, float((da[path] @ db[path].T).norm()) / norms)
    return inner, cross


def test_concepts_in_different_slots_are_orthogonal(concepts) -> None:
    inner, cross = _relative_overlaps(concepts["a"], concepts["b"])
    assert inner < TOL and cross < TOL


def test_concepts_in_the_same_slot_are_not(concepts) -> None:
    inner, cross = _relative_overlaps(concepts["a"], concepts["c"])
    assert cross > 1e-2


# loading back -----------------------------------------------------------------------------------------------


@pytest.fixture()
def fresh_pipe(_second_pipe):
    yield _second_pipe
    _second_pipe.unload_lora_weights()
    assert not any("lora" in n for n, _ in _second_pipe.unet.named_parameters())


@torch.no_grad()
def _folded_output(unet: torch.nn.Module, deltas: list[dict[str, torch.Tensor]], inputs) -> torch.Tensor:
    """The output of a copy of ``unet`` whose weights have every ΔW added in."""
    folded = copy.deepcopy(unet)
    for delta in deltas:
        for path, value in delta.items():
            weight = folded.get_submodule(path).weight
            weight += value.reshape(weight.shape).to(weight.dtype)
    return folded(*inputs, return_dict=False)[0]


@torch.no_grad()
def _out(pipe, inputs) -> torch.Tensor:
    return pipe.unet(*inputs, return_dict=False)[0]


def test_merged_adapters_equal_the_summed_weights(concepts, fresh_pipe) -> None:
    inputs = unet_inputs(fresh_pipe)
    base = _out(fresh_pipe, inputs)
    want = _folded_output(fresh_pipe.unet, [_deltas(concepts["a"]), _deltas(concepts["b"])], inputs)
    for name in ("a", "b"):
        tensors, metadata = load_safetensors(concepts[name]["path"])
        load_adapter(fresh_pipe, tensors, metadata, name)
    fresh_pipe.set_adapters(["a", "b"], [1.0, 1.0])
    got = _out(fresh_pipe, inputs)
    assert (got - base).abs().max() > 1e-4  # the adapters do something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_diffusers_loads_the_saved_file(concepts, fresh_pipe) -> None:
    inputs = unet_inputs(fresh_pipe)
    want = _folded_output(fresh_pipe.unet, [_deltas(concepts["b"])], inputs)
    fresh_pipe.load_lora_weights(str(concepts["b"]["path"]), adapter_name="from_file")
    torch.testing.assert_close(_out(fresh_pipe, inputs), want, rtol=1e-4, atol=1e-5)


def _bend_first_basis(tensors: dict) -> dict:
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    return {**tensors, key: tensors[key] * 1.5}


@pytest.mark.parametrize(
    ("corrupt_tensors", "corrupt_header", "message"),
    [
        (None, lambda m: {k: v for k, v in m.items() if k != META_SLOT}, "lacks 'lorastudio.ortho.slot'"),
        (None, lambda m: {**m, META_SEED: "abc"}, "basis_seed' must be an integer"),
        (None, lambda m: {**m, "lorastudio.ortho.rank": "2"}, "lora_A has rank 4, the header says 2"),
        (None, lambda m: {**m, META_SLOT: "100000"}, "does not fit input size"),
        (_bend_first_basis, None, "rows are not orthonormal"),
    ],
)
def test_validate_refuses_a_bad_basis_or_header(concepts, fresh_pipe, corrupt_tensors, corrupt_header,
                                                message: str) -> None:
    tensors, metadata = load_safetensors(concepts["a"]["path"])
    OrthogonalAdaptation.validate_tensors(fresh_pipe, tensors, metadata)  # the real file is fine
    bad_tensors = corrupt_tensors(tensors) if corrupt_tensors else tensors
    bad_header = corrupt_header(metadata) if corrupt_header else metadata
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh_pipe, bad_tensors, bad_header, "bad")
    assert not getattr(fresh_pipe.unet, "peft_config", {})  # nothing was applied
