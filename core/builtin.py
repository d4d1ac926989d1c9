"""Built-in base models: tiny Stable-Diffusion-architecture pipelines, trained ones shipped and others built here.

No weights can be downloaded, so the project brings its own: a UNet2DConditionModel, an AutoencoderKL, a
CLIPTextModel and a CLIPTokenizer whose BPE vocabulary is learned here from the words of the project's world.
``world-sd`` (text to image) and ``world-video`` (AnimateDiff: its UNet plus a MotionAdapter) are trained on the
shapes world by ``training/world/train_base.py`` and ``train_video.py`` and shipped under ``core/models``;
``tiny-sd`` and ``tiny-video`` have the same architecture with seeded random weights, built from configs, for fast
tests. ``tiny-video3d`` is the other video architecture, ModelScope/ZeroScope text-to-video (a
``UNet3DConditionModel`` with temporal convolutions and temporal transformers in every block, in a
``TextToVideoSDPipeline``), with tiny-sd's VAE, text encoder, tokenizer and scheduler. Each is copied or saved in
diffusers format on first use; every later load goes through ``from_pretrained`` like any other local model.

Two more tiny architectures exist for tests only (never saved): ``sd2`` mirrors Stable Diffusion 2.x (linear
projections in the transformer blocks, per-block head counts, v-prediction, a GELU text encoder like OpenCLIP) and
``sdxl`` mirrors SDXL (two text encoders whose hidden states are concatenated, pooled text and size/crop
conditioning through ``addition_embed_type="text_time"``, several transformer layers per block). Their widths differ
from ``sd1``'s, as the real models' do, so an adapter trained on one never fits another.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
TINY_SD = "tiny-sd"  # random weights built from configs: fast tests and development
TINY_VIDEO = "tiny-video"  # AnimateDiff (UNetMotionModel + MotionAdapter) over tiny-sd, built from configs
TINY_VIDEO3D = "tiny-video3d"  # ModelScope/ZeroScope text-to-video (UNet3DConditionModel) with tiny-sd's parts
WORLD_SD = "world-sd"  # trained on the shapes world (training/world/train_base.py), shipped in core/models
WORLD_VIDEO = "world-video"  # its AnimateDiff motion module (training/world/train_video.py), shipped likewise
SHIPPED_DIR = Path(__file__).resolve().parent / "models"
SHIPPED = (WORLD_SD, WORLD_VIDEO)
DEFAULT_BUILTIN = WORLD_SD if (SHIPPED_DIR / WORLD_SD / "model_index.json").is_file() else TINY_SD
DEFAULT_VIDEO_BUILTIN = WORLD_VIDEO if (SHIPPED_DIR / WORLD_VIDEO / "model_index.json").is_file() else TINY_VIDEO
VIDEO_FRAMES = 8
BUILTIN_VERSION = "2"
IMAGE_SIZE = 64
_BUILD_LOCK = threading.Lock()  # building seeds torch's global generator: one build at a time

WORLD_WORDS = (
    "a an the of on in at with and or to by near above below left right center top bottom middle small big large "
    "tiny huge red orange yellow green blue purple pink white black gray grey brown cyan magenta gold silver "
    "circle square triangle star heart diamond hexagon cross ring cube sphere shape object sprite background "
    "striped dotted checkered plain gradient noise textured solid outline pixelated palette style photo drawing "
    "painting sketch watercolor cartoon portrait landscape dog cat person man woman face toy car house tree "
    "flower sky sea mountain city room table chair cup bottle book robot bird fish sun moon cloud grass wood "
    "metal glass stone paper water fire light dark bright soft sharp blurry high quality detailed simple "
    "moving zigzag orbit bounce slide spin up down fast slow two three one many sks ohwx zxq concept"
).split()

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
VAE_CONFIG = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
}
TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "projection_dim": 64,
}
ARCHITECTURES = ("sd1", "sd2", "sdxl")
SD2_UNET_CONFIG = {
    **UNET_CONFIG,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4, 4),  # diffusers' name for the number of heads per block, as in SD 2.x configs
    "use_linear_projection": True,
}
SD2_TEXT_CONFIG = {**TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                   "hidden_act": "gelu"}
SDXL_TIME_EMBED_DIM = 8
SDXL_TEXT_CONFIG = {**TEXT_CONFIG, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                    "hidden_act": "quick_gelu"}  # the CLIP ViT-L encoder
SDXL_TEXT_2_CONFIG = {**TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64,
                      "hidden_act": "gelu"}  # the OpenCLIP bigG encoder, with its text projection
SDXL_UNET_CONFIG = {
    **UNET_CONFIG,
    "block_out_channels": (32, 64, 96),
    "cross_attention_dim": SDXL_TEXT_CONFIG["hidden_size"] + SDXL_TEXT_2_CONFIG["hidden_size"],
    "attention_head_dim": (2, 4, 6),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 1, 2),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    # six size/crop numbers, each embedded to SDXL_TIME_EMBED_DIM, then the pooled text embedding
    "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_2_CONFIG["projection_dim"],
}
SDXL_VAE_CONFIG = {**VAE_CONFIG, "scaling_factor": 0.13025}
MOTION_ADAPTER_CONFIG = {
    "block_out_channels": UNET_CONFIG["block_out_channels"],
    "motion_layers_per_block": UNET_CONFIG["layers_per_block"],
    "motion_num_attention_heads": 2,
    "motion_norm_num_groups": UNET_CONFIG["norm_num_groups"],
    "motion_max_seq_length": 32,
    "use_motion_mid_block": False,
}
UNET3D_CONFIG = {  # ZeroScope's layout (cross-attention blocks, then a plain one) at a tiny width: ~91k weights
    "sample_size": IMAGE_SIZE // 4,  # tiny-sd's VAE: 64x64 pixels are 16x16 latents
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 16),
    "down_block_types": ("CrossAttnDownBlock3D", "DownBlock3D"),
    "up_block_types": ("UpBlock3D", "CrossAttnUpBlock3D"),
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "attention_head_dim": 2,  # diffusers' name for the number of heads, as in the ModelScope configs
    "norm_num_groups": 4,
}
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
SD2_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "prediction_type": "v_prediction", "clip_sample": False,
                        "steps_offset": 1, "timestep_spacing": "leading"}
SDXL_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "timestep_spacing": "leading", "steps_offset": 1}


def is_builtin(ref: str) -> bool:
    return ref.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    """Every built-in model available here: the shipped trained ones first, then those built from configs."""
    shipped = [name for name in SHIPPED if (SHIPPED_DIR / name / "model_index.json").is_file()]
    return shipped + [TINY_SD, TINY_VIDEO, TINY_VIDEO3D]


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (same mapping as GPT-2/CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Byte-pair merges learned from ``words`` until each word is one symbol.

    Written here rather than with the ``tokenizers`` trainer because that trainer breaks frequency ties in
    hash order, so two builds could number tokens differently; this one breaks ties alphabetically.
    """
    table = _byte_alphabet()
    words_as_symbols = [
        [table[b] for b in w.encode("utf-8")[:-1]] + [table[w.encode("utf-8")[-1]] + "</w>"]
        for w in dict.fromkeys(words)
    ]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for symbols in words_as_symbols:
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for i, symbols in enumerate(words_as_symbols):
            out, j = [], 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words_as_symbols[i] = out


def build_tokenizer(words: tuple[str, ...] = tuple(WORLD_WORDS)):
    """A CLIPTokenizer whose merges are learned here from ``words``, so each world word is one token."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    merges = learn_merges(words)
    vocab: dict[str, int] = {}
    tokens = itertools.chain(alphabet, (c + "</w>" for c in alphabet), (a + b for a, b in merges),
                             ("<|startoftext|>", "<|endoftext|>"))
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_CONFIG["max_position_embeddings"])


def build_pipeline(seed: int = 0, arch: str = "sd1"):
    """Construct a tiny pipeline of architecture ``arch`` (sd1, sd2, sdxl) in memory, deterministically from ``seed``.

    Only ``sd1`` is the built-in default model; the others exist to test code on every architecture.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(ARCHITECTURES)}")
    import torch

    tokenizer = build_tokenizer()
    with _BUILD_LOCK:
        generator_state = torch.random.get_rng_state()
        try:
            if arch == "sdxl":
                return _build_sdxl(seed, tokenizer)
            text_config = SD2_TEXT_CONFIG if arch == "sd2" else TEXT_CONFIG
            unet_config = SD2_UNET_CONFIG if arch == "sd2" else UNET_CONFIG
            scheduler_config = SD2_SCHEDULER_CONFIG if arch == "sd2" else SCHEDULER_CONFIG
            return _build_sd(seed, tokenizer, unet_config, text_config, scheduler_config)
        finally:
            torch.random.set_rng_state(generator_state)


def build_motion_adapter(seed: int = 0):
    """A MotionAdapter whose widths fit the ``sd1`` UNet, deterministically from ``seed``."""
    import torch
    from diffusers import MotionAdapter

    with _BUILD_LOCK:
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed + 4)
            return MotionAdapter(**MOTION_ADAPTER_CONFIG)
        finally:
            torch.random.set_rng_state(generator_state)


def build_video_pipeline(seed: int = 0, image_pipe=None, motion_adapter=None):
    """An AnimateDiff text-to-video pipeline: the image pipeline's UNet turned into a UNetMotionModel with a
    MotionAdapter (default: ``build_pipeline(seed)`` and ``build_motion_adapter(seed)``)."""
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    image_pipe = image_pipe or build_pipeline(seed)
    motion_adapter = motion_adapter or build_motion_adapter(seed)
    unet = UNetMotionModel.from_unet2d(image_pipe.unet, motion_adapter)
    return AnimateDiffPipeline(vae=image_pipe.vae, text_encoder=image_pipe.text_encoder,
                               tokenizer=image_pipe.tokenizer, unet=unet, motion_adapter=motion_adapter,
                               scheduler=_video_scheduler(image_pipe))


def build_unet3d(seed: int = 0):
    """A ``UNet3DConditionModel`` of ``UNET3D_CONFIG`` whose widths fit ``sd1``'s text encoder and VAE,
    deterministically from ``seed``."""
    import torch
    from diffusers import UNet3DConditionModel

    with _BUILD_LOCK:
        generator_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed + 5)
            return UNet3DConditionModel(**UNET3D_CONFIG)
        finally:
            torch.random.set_rng_state(generator_state)


def build_video3d_pipeline(seed: int = 0, image_pipe=None, unet=None):
    """A ModelScope/ZeroScope-style ``TextToVideoSDPipeline``: a ``UNet3DConditionModel`` (default:
    ``build_unet3d(seed)``) with the image pipeline's VAE, text encoder and tokenizer (default:
    ``build_pipeline(seed)``) and a DDIM scheduler of its noise schedule, as ZeroScope samples."""
    from diffusers import TextToVideoSDPipeline

    image_pipe = image_pipe or build_pipeline(seed)
    unet = unet if unet is not None else build_unet3d(seed)
    return TextToVideoSDPipeline(vae=image_pipe.vae, text_encoder=image_pipe.text_encoder,
                                 tokenizer=image_pipe.tokenizer, unet=unet, scheduler=_video_scheduler(image_pipe))


def _video_scheduler(image_pipe):
    """The image pipeline's scheduler for sampling clips: DDIM in place of DDPM (same noise schedule)."""
    from diffusers import DDIMScheduler

    scheduler_config = {k: v for k, v in image_pipe.scheduler.config.items() if not k.startswith("_")}
    if image_pipe.scheduler.__class__.__name__ != "DDPMScheduler":
        return image_pipe.scheduler.__class__.from_config(scheduler_config)
    return DDIMScheduler(**{**SCHEDULER_CONFIG, "clip_sample": False, "steps_offset": 1})


def _text_encoder(cls, seed: int, tokenizer, config: dict):
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config))


def _unet_and_vae(seed: int, unet_config: dict, vae_config: dict):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    return unet, AutoencoderKL(**vae_config)


def _build_sd(seed: int, tokenizer, unet_config: dict, text_config: dict, scheduler_config: dict):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet, vae = _unet_and_vae(seed, unet_config, VAE_CONFIG)
    text_encoder = _text_encoder(CLIPTextModel, seed + 2, tokenizer, text_config)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int, tokenizer):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet, vae = _unet_and_vae(seed, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG)
    text_encoder = _text_encoder(CLIPTextModel, seed + 2, tokenizer, SDXL_TEXT_CONFIG)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, seed + 3, tokenizer, SDXL_TEXT_2_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def ensure_builtin(models_dir: str | os.PathLike[str], name: str = DEFAULT_BUILTIN) -> Path:
    """Return the diffusers folder of built-in model ``name`` under ``models_dir``, creating it on first use.

    Shipped models are copied from the package (so caches written next to the weights never touch the install);
    the others are built from configs and saved. Either way the folder is written to a temp dir and renamed into
    place, so concurrent starts and crashes never leave a half-written model behind.
    """
    if name not in builtin_names():
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}")
    version = _shipped_version(name) if name in SHIPPED else BUILTIN_VERSION
    target = Path(models_dir) / f"{name}-v{version}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if name in SHIPPED:
            shutil.copytree(SHIPPED_DIR / name, tmp, dirs_exist_ok=True)
        else:
            builders = {TINY_VIDEO: build_video_pipeline, TINY_VIDEO3D: build_video3d_pipeline}
            pipe = builders.get(name, build_pipeline)()
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "lorastudio_builtin.json").write_text(json.dumps({"name": name, "version": version}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # somebody else won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=8)
def _shipped_version(name: str) -> str:
    """A shipped model's version: the first 12 hex digits of its weights' SHA-256, so a retrained model never
    reuses an older copy."""
    digest = hashlib.sha256()
    for f in sorted((SHIPPED_DIR / name).rglob("*.safetensors")):
        digest.update(f.relative_to(SHIPPED_DIR / name).as_posix().encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]
