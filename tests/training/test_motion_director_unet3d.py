"""MotionDirector on the built-in tiny-video3d model (ModelScope/ZeroScope: ``UNet3DConditionModel`` in a
``TextToVideoSDPipeline``): the bypass that makes it an image model, the two paths touching only their own LoRAs
(``transformer_in`` included), training → file → attach, the diffusers-format export, and the model built through
the public loader."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.io import load_safetensors, save_safetensors
from core.pipelines import peft_ready
from tests.training.test_motion_director import FRAMES, PROMPT, RES, config, trainer, unet_out, unet_state
from training.artifact import adapter_file_metadata, load_adapter
from training.methods.motion_director import (
    SPATIAL_SCALE_KEY,
    MotionDirector,
    diffusers_lora_file,
    motion_modules,
    temporal_bypassed,
)
from training.video import ClipDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = "builtin:tiny-video3d"


@pytest.fixture(scope="module")
def video3d_pipe():
    from core.builtin import build_video3d_pipeline

    pipe = build_video3d_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def random_clip() -> ClipDataset:
    """One clip of random pixels (6 frames, resampled to FRAMES)."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, RES, RES, 3), dtype=np.uint8)
    return ClipDataset([pixels], ["a red circle moving on a blue plain background"], FRAMES, RES)


@pytest.fixture(scope="module")
def trained(video3d_pipe, random_clip):
    """A 3-step run (hflip on, spatial never skipped, LoRA scale alpha/r = 2) and its saved-file header."""
    cfg = config(hflip_prob=0.5, spatial_skip_prob=0.0, alpha=8.0)
    result = trainer(video3d_pipe, random_clip, cfg).run()
    header = adapter_file_metadata("motion_director", cfg, BASE, "0" * 16, [], "motion", result.steps_done,
                                   method_metadata=result.metadata)
    return result, header


def clip_inputs(pipe, frames: int = FRAMES, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet3D inputs: two clips and one text embedding per clip (UNet3D repeats it per frame itself)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, frames, RES // 4, RES // 4, generator=g)
    embeds = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([50, 700]), embeds


def temporal_layer_paths(names) -> set[str]:
    return {n for n in names if n.startswith("transformer_in.") or ".temp_attentions." in n}


@torch.no_grad()
def forward(unet, inputs) -> torch.Tensor:
    return unet(*inputs, return_dict=False)[0]


# ------------------------------------------------------------------------------------------------- model --

def test_tiny_video3d_loads_through_the_public_loader(models_dir: Path, video3d_pipe) -> None:
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    from core.builtin import TINY_VIDEO3D, builtin_names
    from core.pipelines import load_pipeline, resolve_base

    assert TINY_VIDEO3D in builtin_names()
    pipe = load_pipeline(resolve_base(BASE, models_dir))
    assert type(pipe) is TextToVideoSDPipeline and isinstance(pipe.unet, UNet3DConditionModel)
    assert type(pipe.unet).__name__ == "UNet3DConditionModel" and hasattr(pipe.unet, "load_lora_adapter")
    assert pipe.unet.config.sample_size == 16 and pipe.unet.config.cross_attention_dim == 64
    assert 10_000 < sum(p.numel() for p in pipe.unet.parameters()) < 200_000
    built = video3d_pipe.unet.state_dict()
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
    assert "transformer_in" in motion_modules(pipe.unet)


def test_an_image_lora_attaches_to_a_loaded_unet3d(models_dir: Path) -> None:
    """The loader gives UNet3D diffusers' peft methods, so a subject LoRA (spatial attention) loads on it."""
    from core.pipelines import load_pipeline, resolve_base
    from training.methods.lora import LoRA

    pipe = load_pipeline(resolve_base(BASE, models_dir))
    inputs = clip_inputs(pipe)
    before = unet_out(pipe, inputs)
    path = next(n for n, _ in pipe.unet.named_modules() if ".attentions." in n and n.endswith("attn2.to_k"))
    layer = pipe.unet.get_submodule(path)
    g = torch.Generator().manual_seed(0)
    tensors = {f"unet.{path}.lora_A.weight": torch.randn(4, layer.in_features, generator=g),
               f"unet.{path}.lora_B.weight": torch.randn(layer.out_features, 4, generator=g)}
    attached = LoRA.attach(pipe, tensors, {}, "subject")
    assert not torch.allclose(unet_out(pipe, inputs), before, atol=1e-4)
    attached.remove()
    torch.testing.assert_close(unet_out(pipe, inputs), before)


# ------------------------------------------------------------------------------------------------- paths --

def test_bypass_removes_every_temporal_module(video3d_pipe) -> None:
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

    unet = copy.deepcopy(video3d_pipe.unet).eval()
    temporal = motion_modules(unet)
    kinds = {n.split(".")[-2] if "." in n else n for n in temporal}
    assert kinds == {"transformer_in", "temp_convs", "temp_attentions"}
    one_frame, clip = clip_inputs(video3d_pipe, frames=1), clip_inputs(video3d_pipe, frames=3)
    with temporal_bypassed(unet):
        bypassed = [forward(unet, x) for x in (one_frame, clip)]
        h = torch.randn(3, unet.config.block_out_channels[0], 4, 4)
        as_tuple = unet.transformer_in(h, num_frames=3, return_dict=False)  # what UNet3D asks for, then takes [0]
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and as_tuple[0] is h
        output = unet.mid_block.temp_attentions[0](h, num_frames=3)
        assert isinstance(output, TransformerTemporalModelOutput) and output.sample is h
        assert unet.down_blocks[0].temp_convs[0](h, num_frames=3) is h
    plain = [forward(unet, x) for x in (one_frame, clip)]

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight of every temporal module (conv4 of each temp_conv is zero at init)
        for p in (p for m in temporal.values() for p in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    with temporal_bypassed(unet):
        again = [forward(unet, x) for x in (one_frame, clip)]
    changed = [forward(unet, x) for x in (one_frame, clip)]
    for before, after in zip(bypassed, again):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    for before, after in zip(plain, changed):  # without the bypass the temporal modules act, on 1 frame too
        assert (after - before).abs().max() > 1e-3
    assert all("forward" not in m.__dict__ for m in temporal.values())


def test_each_path_updates_only_its_own_loras(video3d_pipe, random_clip) -> None:
    from diffusers import UNet3DConditionModel

    run = trainer(video3d_pipe, random_clip, config(spatial_skip_prob=0.0))
    method = run.method
    with run._pipeline_borrowed():
        run._seed_everything()
        run._setup()
        spatial, temporal = run.spatial_params, run.temporal_params
        assert spatial and temporal and not {id(p) for p in spatial} & {id(p) for p in temporal}
        assert all(".attentions." in n and "temp_" not in n for n in method.spatial_layers)
        assert temporal_layer_paths(method.temporal_layers) == set(method.temporal_layers)
        assert not any("temp_convs" in n for n in method.spatial_layers | method.temporal_layers)
        transformer_in = [p for n, p in video3d_pipe.unet.named_parameters()
                          if n.startswith("transformer_in.") and "lora_" in n]
        assert transformer_in and {id(p) for p in transformer_in} <= {id(p) for p in temporal}
        ran: set[str] = set()  # temporal modules whose insides ran (hooks on a bypassed module itself still fire)
        temporal_modules = motion_modules(video3d_pipe.unet)
        handles = [child.register_forward_hook(lambda *_, name=n: ran.add(name))
                   for n, m in temporal_modules.items() for child in m.children()]
        try:
            latents = run.latents[:, :1]
            embeds = run.embeddings[run.prompt_index[:1]]
            draw = run._draw()
            before = [p.detach().clone() for p in spatial + temporal]
            run.spatial_step(latents, draw, embeds)
            assert not ran, f"the spatial path ran {sorted(ran)}"
            assert all(p.grad is None for p in temporal), "the spatial path gave a temporal LoRA a gradient"
            assert all(torch.equal(b, p) for b, p in zip(before[len(spatial):], temporal))
            assert any(not torch.equal(b, p) for b, p in zip(before, spatial))

            before_in = [p.detach().clone() for p in transformer_in]
            before = [p.detach().clone() for p in spatial + temporal]
            run.temporal_step(latents[0], draw, embeds)
            assert ran == set(temporal_modules)
            assert all(p.grad is None for p in spatial), "the temporal path gave a spatial LoRA a gradient"
            assert all(torch.equal(b, p) for b, p in zip(before, spatial))
            assert any(not torch.equal(b, p) for b, p in zip(before[len(spatial):], temporal))
            assert any(not torch.equal(b, p) for b, p in zip(before_in, transformer_in))
        finally:
            for handle in handles:
                handle.remove()
    assert type(video3d_pipe.unet) is UNet3DConditionModel and not getattr(video3d_pipe.unet, "peft_config", None)


# --------------------------------------------------------------------------------------- train and attach --

def _sample(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_frames=FRAMES, num_inference_steps=2, height=RES, width=RES, output_type="np",
                generator=generator).frames


def test_training_runs_and_the_file_round_trips(video3d_pipe, trained, tmp_path: Path) -> None:
    from diffusers import UNet3DConditionModel

    from core.builtin import build_video_pipeline

    result, header = trained
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    paths = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in result.tensors}
    assert any(p.startswith("transformer_in.") for p in paths) and any(".temp_attentions." in p for p in paths)
    assert any(".attentions." in p and "temp_" not in p for p in paths)
    assert not any("temp_convs" in p for p in paths)
    unet = video3d_pipe.unet  # left as found: no adapter, its own class, no hooks
    assert type(unet) is UNet3DConditionModel and not getattr(unet, "peft_config", None)
    assert not unet._forward_pre_hooks

    save_safetensors(tmp_path / "motion.safetensors", result.tensors, header)
    tensors, metadata = load_safetensors(tmp_path / "motion.safetensors")
    MotionDirector.validate_tensors(video3d_pipe, tensors, metadata)
    key = next(k for k in tensors if k.startswith("unet.transformer_in.") and k.endswith("lora_A.weight"))
    with pytest.raises(ValueError, match="shapes"):
        MotionDirector.validate_tensors(video3d_pipe, {**tensors, key: torch.zeros(4, 3)}, metadata)
    with pytest.raises(ValueError, match="does not match the base model"):  # AnimateDiff has no such layers
        MotionDirector.validate_tensors(build_video_pipeline(), tensors, metadata)

    fresh = copy.deepcopy(video3d_pipe)
    reference = _sample(fresh)
    attached = load_adapter(fresh, tensors, metadata, "wiggle")
    loaded = {n for n, m in fresh.unet.named_modules() if "wiggle" in getattr(m, "lora_A", {})}
    assert loaded and temporal_layer_paths(loaded) == loaded  # spatial LoRAs off at sampling by default
    video = _sample(fresh)
    assert video.shape == (1, FRAMES, RES, RES, 3) and np.isfinite(video).all()
    assert not np.allclose(video, reference, atol=1e-4)
    attached.set_scale(0.0)
    np.testing.assert_allclose(_sample(fresh), reference, atol=1e-5)  # float rounding of the peft path only
    attached.remove()
    assert not getattr(fresh.unet, "peft_config", None)


# ---------------------------------------------------------------------------------------------- export --

def test_diffusers_export_loads_with_load_lora_weights_as_attached(video3d_pipe, trained, tmp_path: Path) -> None:
    result, header = trained
    inputs = clip_inputs(video3d_pipe)
    stock = copy.deepcopy(video3d_pipe)
    state, file_header = diffusers_lora_file(result.tensors, header)
    save_safetensors(tmp_path / "stock.safetensors", state, file_header)
    with pytest.raises(AttributeError, match="load_lora_adapter"):  # diffusers' UNet3D has no peft methods
        stock.load_lora_weights(str(tmp_path), weight_name="stock.safetensors", adapter_name="theirs")
    outputs = {}
    for spatial_scale in ("0.0", "0.5"):
        metadata = {**header, SPATIAL_SCALE_KEY: spatial_scale}
        layers = MotionDirector.export_lora(result.tensors, metadata)
        state, file_header = diffusers_lora_file(result.tensors, metadata)
        path = tmp_path / f"motion-{spatial_scale}.safetensors"
        save_safetensors(path, state, file_header)

        ours = copy.deepcopy(video3d_pipe)
        MotionDirector.attach(ours, dict(result.tensors), metadata, "ours")
        theirs = copy.deepcopy(video3d_pipe)
        assert peft_ready(theirs.unet) is not None and peft_ready(theirs.unet) is None
        theirs.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="theirs")
        n_theirs = sum(1 for m in theirs.unet.modules() if "theirs" in getattr(m, "lora_A", {}))
        assert n_theirs == len(layers)
        outputs[spatial_scale] = unet_out(ours, inputs)
        torch.testing.assert_close(unet_out(theirs, inputs), outputs[spatial_scale], rtol=0, atol=1e-5)
    assert temporal_layer_paths(MotionDirector.export_lora(result.tensors, header)) == set(
        MotionDirector.export_lora(result.tensors, header))  # spatial scale 0: the temporal layers alone
    assert not torch.allclose(outputs["0.0"], outputs["0.5"], atol=1e-5)  # the spatial part joins at scale 0.5
    assert not torch.allclose(outputs["0.0"], unet_out(video3d_pipe, inputs), atol=1e-5)


def test_a_refused_file_leaves_the_unet3d_untouched(video3d_pipe, trained) -> None:
    from diffusers import UNet3DConditionModel

    result, header = trained
    pipe = copy.deepcopy(video3d_pipe)
    before = unet_state(pipe)
    key = next(k for k in result.tensors if ".temp_attentions." in k and k.endswith("lora_B.weight"))
    with pytest.raises(ValueError, match="NaN"):
        load_adapter(pipe, {**result.tensors, key: torch.full_like(result.tensors[key], float("nan"))}, header, "x")
    assert type(pipe.unet) is UNet3DConditionModel and not getattr(pipe.unet, "peft_config", None)
    after = unet_state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
