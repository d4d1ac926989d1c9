"""Device and dtype choice: hardware defaults, honoured overrides, clear errors."""

from __future__ import annotations

import pytest
import torch

from core.devices import DevicePlacement, choose_placement, parse_dtype

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@needs_no_cuda
@pytest.mark.parametrize("device, dtype", [(None, None), ("auto", "auto"), ("", ""), ("AUTO", " Auto ")])
def test_default_on_this_machine_is_cpu_float32(device: str | None, dtype: str | None) -> None:
    placement = choose_placement(device, dtype)
    assert placement == DevicePlacement(torch.device("cpu"), torch.float32)
    assert str(placement) == "cpu / float32"


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("fp16", torch.float16), ("FP32", torch.float32),
                                             ("float32", torch.float32)])
def test_overrides_are_honoured(dtype: str, expected: torch.dtype) -> None:
    placement = choose_placement("cpu", dtype)
    assert placement.device == torch.device("cpu") and placement.dtype == expected


def test_cpu_bf16_runs_a_layer() -> None:
    placement = choose_placement("cpu", "bf16")
    layer = torch.nn.Linear(4, 4).to(placement.device, placement.dtype)
    assert layer(torch.ones(1, 4, dtype=placement.dtype)).dtype == torch.bfloat16


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA"])
def test_cuda_without_cuda_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available") as err:
        choose_placement(device)
    assert "'cpu' or 'auto'" in str(err.value)


@pytest.mark.parametrize("dtype", ["int8", "float64", "half-ish"])
def test_unknown_dtype_lists_the_choices(dtype: str) -> None:
    with pytest.raises(ValueError, match=f"unknown dtype '{dtype}'") as err:
        choose_placement("cpu", dtype)
    for choice in ("auto", "bf16", "bfloat16", "float16", "float32", "fp16", "fp32"):
        assert choice in str(err.value)
    with pytest.raises(ValueError, match="bf16, bfloat16, float16, float32, fp16, fp32"):
        parse_dtype(dtype)


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", "meta"])
def test_unknown_device_is_a_value_error(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        choose_placement(device)


def test_auto_with_cuda_picks_bf16_or_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_placement() == DevicePlacement(torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_placement("cuda:0") == DevicePlacement(torch.device("cuda:0"), torch.float16)
    assert choose_placement("cuda", "fp32").dtype == torch.float32
    assert choose_placement("cpu").dtype == torch.float32
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        choose_placement("cuda:3")


def test_dtype_object_is_accepted() -> None:
    assert choose_placement("cpu", torch.bfloat16) == DevicePlacement(torch.device("cpu"), torch.bfloat16)
