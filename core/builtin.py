"""The built-in default base model: a tiny Stable-Diffusion-architecture pipeline built from configs.

No weights can be downloaded, so the project creates its own: a UNet2DConditionModel, an AutoencoderKL, a
CLIPTextModel and a CLIPTokenizer whose BPE vocabulary is trained here on the words of the project's world.
It is built once, seeded, and saved in diffusers format; every later load goes through ``from_pretrained``
like any other local model. Until a trained world model ships, its images are untrained noise patterns.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
DEFAULT_BUILTIN = "tiny-sd"
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
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


def is_builtin(ref: str) -> bool:
    return ref.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return [DEFAULT_BUILTIN]


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


def build_pipeline(seed: int = 0):
    """Construct the tiny pipeline in memory, deterministically from ``seed``."""
    tokenizer = build_tokenizer()
    with _BUILD_LOCK:
        return _build_pipeline_locked(seed, tokenizer)


def _build_pipeline_locked(seed: int, tokenizer):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT_CONFIG,
        )
        text_encoder = CLIPTextModel(text_config)
    finally:
        torch.random.set_rng_state(generator_state)
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def ensure_builtin(models_dir: str | os.PathLike[str], name: str = DEFAULT_BUILTIN) -> Path:
    """Return the diffusers folder of built-in model ``name``, building and saving it on first use.

    The folder is written to a temp dir and renamed into place, so concurrent starts and crashes never leave
    a half-saved model behind.
    """
    if name not in builtin_names():
        raise ValueError(f"unknown built-in model {name!r}; available: {', '.join(builtin_names())}")
    target = Path(models_dir) / f"{name}-v{BUILTIN_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_pipeline().save_pretrained(tmp, safe_serialization=True)
        (tmp / "lorastudio_builtin.json").write_text(json.dumps({"name": name, "version": BUILTIN_VERSION}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():  # somebody else won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
