"""DeepCache-style partial UNet passes on a stock diffusers ``UNet2DConditionModel``.

A full pass can hand out the deep feature entering the last up block (``capture_deep_feature``); a shallow pass
(``shallow_forward``) then recomputes only the time embedding, ``conv_in``, the resnet/attention pairs of the
first down block (their outputs are the last up block's skips) and the last up block plus the output head,
taking the deep feature from the cache. With a feature from the same inputs it equals the full pass.

The shallow pass runs the UNet's forward pre-hooks first, with the arguments a full call ``unet(sample, timestep,
encoder_hidden_states=...)`` would give them, since adapters may learn the step from such a hook (T-LoRA's rank
mask reads the timestep there); without it they would keep the timestep of the last full pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules import module as torch_module


def cache_unsupported_reason(unet: nn.Module) -> str | None:
    """Why ``shallow_forward`` cannot serve this UNet, or ``None``."""
    config = unet.config
    if config.time_cond_proj_dim is not None:
        return "the UNet takes a guidance embedding (time_cond_proj_dim)"
    if getattr(unet, "class_embedding", None) is not None or getattr(unet, "add_embedding", None) is not None:
        return "the UNet takes class or added-condition embeddings"
    if config.center_input_sample:
        return "the UNet centres its input sample"
    if not hasattr(unet, "up_blocks") or len(unet.down_blocks) < 1:
        return "not a UNet2DConditionModel"
    if len(unet.up_blocks[-1].resnets) != len(unet.down_blocks[0].resnets) + 1:
        return "the last up block does not consume exactly conv_in and the first down block's outputs"
    return None


@contextmanager
def capture_deep_feature(unet: nn.Module, into: list[Tensor]) -> Iterator[None]:
    """While open, each UNet forward appends the hidden state entering ``up_blocks[-1]`` to ``into``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        into.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_forward_pre_hooks(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Call ``module``'s forward pre-hooks (global ones first) as ``module(*args, **kwargs)`` would, in the same
    order and with the same rules for hooks that replace the arguments; returns the arguments after them."""
    hooks = [*torch_module._global_forward_pre_hooks.items(), *module._forward_pre_hooks.items()]
    for hook_id, hook in hooks:
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"forward pre-hook must return None or (args, kwargs), got {type(result)}")
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    return args, kwargs


def shallow_forward(unet: nn.Module, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                    deep_feature: Tensor) -> Tensor:
    """The UNet output with everything between the first down block and the last up block taken from cache."""
    args, kwargs = run_forward_pre_hooks(unet, (sample, timestep), {"encoder_hidden_states": encoder_hidden_states})
    sample = args[0]
    timestep = args[1] if len(args) > 1 else kwargs.get("timestep", timestep)
    encoder_hidden_states = kwargs.get("encoder_hidden_states", encoder_hidden_states)
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    skips = [hidden]
    first = unet.down_blocks[0]
    attentions = getattr(first, "attentions", None) if getattr(first, "has_cross_attention", False) else None
    for i, resnet in enumerate(first.resnets):
        hidden = resnet(hidden, emb)
        if attentions is not None:
            hidden = attentions[i](hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        skips.append(hidden)
    last = unet.up_blocks[-1]
    kwargs = {"encoder_hidden_states": encoder_hidden_states} if getattr(last, "has_cross_attention", False) else {}
    hidden = last(hidden_states=deep_feature, res_hidden_states_tuple=tuple(skips), temb=emb, **kwargs)
    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)
