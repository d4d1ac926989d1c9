"""The generation runtime holding a peft LoRA and an SCEdit (hook) adapter together: switching, routing, eviction.

Expected outputs come from the training-time method objects on a private copy of the same base model; the
runtime side goes through the production path (files on disk, ``load_adapter``, ``ResidentAdapterSet``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.methods.scedit  # noqa: F401  (registers "scedit")
from core.devices import DevicePlacement
from core.io import save_safetensors, sha256_file
from services import runtime as runtime_module
from services.runtime import ModelRuntime, PeftAdapterSet, ResidentAdapterSet
from tests.training.conftest import lora_config, unet_inputs, unet_out
from training.artifact import adapter_file_metadata
from training.base import Method
from training.methods.lora import LoRA
from training.methods.scedit import TUNERS_ATTR, SCEdit, SCEditConfig, skip_tuner_host

BASE = "builtin:tiny-sd"
LORA, SCE = "lora-1", "sce-1"
CPU = DevicePlacement(torch.device("cpu"), torch.float32)


def _save(folder: Path, name: str, method: Method, tensors: dict[str, torch.Tensor]) -> tuple[Path, str]:
    metadata = adapter_file_metadata(method.registry_name, method.config, BASE, "0" * 16, [], "style", 1,
                                     method_metadata=method.adapter_metadata())
    path = folder / f"{name}.safetensors"
    save_safetensors(path, tensors, metadata)
    return path, sha256_file(path)


def _randomize(params: list[torch.nn.Parameter], seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Adapter files (a random LoRA, a random SCEdit and the SCEdit at half strength) and reference outputs."""
    root = tmp_path_factory.mktemp("runtime")
    models = root / "models"
    pipe = ModelRuntime(models, CPU).fresh_pipeline(BASE)
    inputs = unet_inputs(pipe)
    base = unet_out(pipe, inputs)
    lora = LoRA(lora_config(rank=4))
    _randomize(lora.inject(pipe.unet), seed=1, scale=0.1)
    sce = SCEdit(SCEditConfig())
    _randomize(sce.inject(pipe.unet), seed=2, scale=0.05)
    files = {"lora": _save(root, "lora", lora, lora.adapter_state_dict())}
    sce_tensors = sce.adapter_state_dict()
    files["sce"] = _save(root, "sce", sce, sce_tensors)
    half = {k: v * 0.5 if k.endswith((".w2", ".b2")) else v for k, v in sce_tensors.items()}
    files["sce_half"] = _save(root, "sce_half", sce, half)
    refs = {"both": unet_out(pipe, inputs)}
    sce.remove()
    refs["lora"] = unet_out(pipe, inputs)
    lora.remove()
    assert torch.equal(unet_out(pipe, inputs), base)
    sce = SCEdit(SCEditConfig())
    params = sce.inject(pipe.unet)
    with torch.no_grad():
        for p, value in zip(params, half.values()):
            p.copy_(value)
    refs["sce_half"] = unet_out(pipe, inputs)
    sce.remove()
    refs["base"] = base
    return {"models": models, "files": files, "inputs": inputs, "refs": refs}


def _entries(world: dict, *pairs: tuple[str, str]) -> list[tuple[str, str, Path]]:
    files = world["files"]
    return [(adapter_id, files[key][1], files[key][0]) for adapter_id, key in pairs]


def _pre_hooks(pipe) -> int:
    return sum(len(m._forward_pre_hooks) for m in pipe.unet.modules())


def _close(pipe, world: dict, ref: str) -> None:
    torch.testing.assert_close(unet_out(pipe, world["inputs"]), world["refs"][ref], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def _shared_runtime(world: dict):
    rt = ModelRuntime(world["models"], CPU)
    yield rt
    rt.release()


@pytest.fixture()
def runtime(_shared_runtime: ModelRuntime):
    """The shared runtime; after each test every adapter is evicted through the runtime's own path."""
    yield _shared_runtime
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime_module, "MAX_RESIDENT_ADAPTERS", 0)
        _shared_runtime.adapter_set(BASE, [])
    pipe = _shared_runtime.pipeline(BASE)
    assert _pre_hooks(pipe) == 0 and not getattr(pipe.unet, "peft_config", None)


def test_lora_and_scedit_resident_together(world: dict, runtime: ModelRuntime) -> None:
    adapters = runtime.adapter_set(BASE, _entries(world, (LORA, "lora"), (SCE, "sce")))
    pipe = runtime.pipeline(BASE)
    assert isinstance(adapters, ResidentAdapterSet) and PeftAdapterSet is ResidentAdapterSet
    assert adapters.names() == [LORA, SCE] and set(pipe.unet.peft_config) == {LORA}
    assert not torch.allclose(world["refs"]["both"], world["refs"]["lora"], atol=1e-4)
    adapters.apply({LORA: 1.0, SCE: 1.0})
    _close(pipe, world, "both")
    adapters.apply({SCE: 0.5})
    _close(pipe, world, "sce_half")
    adapters.apply({})
    assert torch.equal(unet_out(pipe, world["inputs"]), world["refs"]["base"])
    adapters.apply({LORA: 1.0})
    _close(pipe, world, "lora")
    with pytest.raises(KeyError, match="not loaded: other"):
        adapters.apply({"other": 1.0})


def test_routing_mixes_lora_and_scedit_in_one_batch(world: dict, runtime: ModelRuntime) -> None:
    adapters = runtime.adapter_set(BASE, _entries(world, (LORA, "lora"), (SCE, "sce")))
    pipe = runtime.pipeline(BASE)
    assert adapters.can_route([LORA, SCE]) and adapters.can_route([SCE]) and adapters.can_route([])
    adapters.apply({LORA: 1.0, SCE: 1.0})  # routing ignores what is applied
    groups = [{LORA: 1.0, SCE: 1.0}, {SCE: 0.5}, {}, {LORA: 1.0}]
    latents, timesteps, embeds = world["inputs"]
    n = len(groups)
    with adapters.route(groups):
        routed = unet_out(pipe, (latents.repeat(n, 1, 1, 1), timesteps.repeat(n), embeds.repeat(n, 1, 1)))
    for got, ref in zip(routed.chunk(n), ["both", "sce_half", "base", "lora"]):
        torch.testing.assert_close(got, world["refs"][ref], rtol=1e-5, atol=1e-5, msg=ref)
    _close(pipe, world, "both")  # the applied mix is back after the block
    with pytest.raises(KeyError, match="not loaded"):
        adapters.route([{"other": 1.0}])


def test_unlisted_resident_scedit_is_off(world: dict, runtime: ModelRuntime) -> None:
    runtime.adapter_set(BASE, _entries(world, (LORA, "lora"), (SCE, "sce"))).apply({SCE: 1.0})
    only_lora = runtime.adapter_set(BASE, _entries(world, (LORA, "lora")))
    pipe = runtime.pipeline(BASE)
    assert only_lora.names() == [LORA] and skip_tuner_host(pipe.unet, create=False) is not None  # still resident
    only_lora.apply({LORA: 1.0})
    _close(pipe, world, "lora")
    groups = [{LORA: 1.0}, {}]
    latents, timesteps, embeds = world["inputs"]
    with only_lora.route(groups):
        routed = unet_out(pipe, (latents.repeat(2, 1, 1, 1), timesteps.repeat(2), embeds.repeat(2, 1, 1)))
    torch.testing.assert_close(routed.chunk(2)[1], world["refs"]["base"], rtol=1e-5, atol=1e-5)


def test_reload_and_eviction_of_a_hook_adapter(world: dict, runtime: ModelRuntime,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runtime.adapter_set(BASE, _entries(world, (LORA, "lora"), (SCE, "sce")))
    pipe = runtime.pipeline(BASE)
    hooks = _pre_hooks(pipe)
    assert hooks == 6  # one per decoder resnet of the tiny UNet
    reloaded = runtime.adapter_set(BASE, _entries(world, (SCE, "sce_half")))  # same id, new file: replaced
    assert _pre_hooks(pipe) == hooks and skip_tuner_host(pipe.unet).names() == [SCE]
    reloaded.apply({SCE: 1.0})
    _close(pipe, world, "sce_half")
    monkeypatch.setattr(runtime_module, "MAX_RESIDENT_ADAPTERS", 1)
    adapters = runtime.adapter_set(BASE, _entries(world, (LORA, "lora")))  # evicts the SCEdit adapter
    assert _pre_hooks(pipe) == 0 and skip_tuner_host(pipe.unet, create=False) is None
    assert not any(hasattr(m, TUNERS_ATTR) for m in pipe.unet.modules())
    adapters.apply({LORA: 1.0})
    _close(pipe, world, "lora")
    adapters = runtime.adapter_set(BASE, _entries(world, (SCE, "sce")))  # evicts the LoRA (peft delete)
    assert LORA not in (getattr(pipe.unet, "peft_config", None) or {}) and _pre_hooks(pipe) == hooks
    adapters.apply({})
    torch.testing.assert_close(unet_out(pipe, world["inputs"]), world["refs"]["base"], rtol=1e-6, atol=1e-6)
