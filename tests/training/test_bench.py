"""The training benchmark: its loops measure and leave the pipeline untouched, the memory meter counts what autograd
really keeps, and the quick suite and ``lorastudio bench training`` produce sane figures. Speed targets are
reported by the benchmark, not asserted here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from app import cli
from training import bench
from training.base import METHODS, MethodConfig
from training.bench import (
    BENCH_SETTINGS,
    StepMeter,
    baseline_steps_per_s,
    bench_config,
    make_images,
    measure_memory,
    run_training_suite,
    trainer_steps_per_s,
)
from training.data import ImageCaptionDataset


@pytest.fixture()
def dataset(tmp_path: Path) -> ImageCaptionDataset:
    return ImageCaptionDataset(make_images(tmp_path), 64)


def _lora_params(pipe, rank: int = 8) -> int:
    """r·(d_in + d_out) summed over the attention projections LoRA targets by default."""
    targets = MethodConfig().target_modules
    return sum(rank * (m.in_features + m.out_features) for n, m in pipe.unet.named_modules()
               if isinstance(m, nn.Linear) and any(n.endswith(f".{t}") for t in targets))


def test_bench_functions_measure_and_restore(pipe, records) -> None:
    keys = set(pipe.unet.state_dict())
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    dataset = ImageCaptionDataset(records, 64)
    assert baseline_steps_per_s(pipe, dataset, MethodConfig(), steps=2, warmup=1, threads=1) > 0
    assert trainer_steps_per_s(pipe, dataset, MethodConfig(), steps=2, warmup=1, threads=1) > 0
    assert set(pipe.unet.state_dict()) == keys
    assert not getattr(pipe.unet, "peft_config", {})
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks


def test_meter_counts_unique_saved_storages_and_not_parameters() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(5, 16)
    meter = StepMeter(model, at_call=1)
    try:
        model(x).sum().backward()  # call 0: not armed
        assert not meter.saved
        model(x).sum().backward()
    finally:
        meter.close()
    assert meter.fired
    # the first Linear keeps its input (5x16), ReLU its output (5x32), which is also the second Linear's input;
    # the weights are parameters, not activations
    assert meter.activation_bytes(set()) == 5 * 16 * 4 + 5 * 32 * 4
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_bench_config_shares_the_fixed_settings_for_every_method() -> None:
    for name in METHODS.names():
        method_cls = METHODS.get(name)
        config = bench_config(method_cls, max_steps=7)
        config.validate()
        assert (config.batch_size, config.resolution, config.seed) == (2, 64, 0), name
        assert config.learning_rate == BENCH_SETTINGS["learning_rate"], name
        assert (config.max_steps, config.preview_every, config.checkpoint_every) == (7, 0, 0), name
        if getattr(method_cls, "uses_rank", True):
            assert config.rank == 8, name


def test_saved_activations_grow_with_the_batch(pipe, dataset) -> None:
    settings4 = {**BENCH_SETTINGS, "batch_size": 4}
    keys = set(pipe.unet.state_dict())
    for method in (None, "lora"):
        two = measure_memory(pipe, dataset, method, threads=1)
        four = measure_memory(pipe, dataset, method, settings4, threads=1)
        assert two["saved_activation_bytes"] > 0 and two["train_state_bytes"] > 0, method
        assert four["saved_activation_bytes"] > 1.5 * two["saved_activation_bytes"], (method, two, four)
        assert four["train_state_bytes"] == two["train_state_bytes"], method
        # parameters, gradients and AdamW's two moments, all float32 (plus one step counter per tensor)
        assert two["train_state_bytes"] == pytest.approx(4 * 4 * two["trainable_params"], rel=0.01), method
        assert set(pipe.unet.state_dict()) == keys, method  # the UNet is unwrapped again after each loop


def test_quick_suite_for_lora(pipe) -> None:
    keys = set(pipe.unet.state_dict())
    results = run_training_suite(["lora"], quick=True, pipe=pipe)
    json.dumps(results)
    base, lora = results["baseline"], results["methods"]["lora"]
    assert "error" not in base and "error" not in lora, results
    for entry in (base, lora):
        assert entry["steps_per_s"] > 0
        assert entry["trainable_params"] == _lora_params(pipe)
        assert entry["saved_activation_bytes"] > 0 and entry["train_state_bytes"] > 0
        assert entry["peak_bytes"] >= entry["saved_activation_bytes"] + entry["train_state_bytes"] or \
            results["machine"]["device"] == "cuda"
    assert lora["ratio_vs_baseline"] == pytest.approx(lora["steps_per_s"] / base["steps_per_s"])
    assert lora["peak_vs_lora"] == 1.0
    assert set(results["targets"]["speed_met"]) == {"lora"}
    assert results["settings"]["rank"] == 8 and results["settings"]["batch_size"] == 2
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch"] == torch.__version__
    assert set(pipe.unet.state_dict()) == keys and not getattr(pipe.unet, "peft_config", {})
    table = bench.format_table(results)
    assert "lora" in table and "diffusers+peft loop" in table


def test_methods_on_another_base_are_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "BASE_BUILDERS", {})
    run, skipped = bench._select(["lora"])
    assert run == [] and "'image' base model" in skipped["lora"]
    with pytest.raises(KeyError, match="no_such_method"):
        bench._select(["no_such_method"])


def test_cli_bench_training_quick_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench" / "training.json"
    code = cli.main(["bench", "training", "--quick", "--methods", "lora", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    data = json.loads(out.read_text())
    assert set(data) >= {"settings", "machine", "baseline", "methods", "targets"}
    assert data["methods"]["lora"]["steps_per_s"] > 0 and data["baseline"]["peak_bytes"] > 0
    assert data["settings"]["quick"] is True
    assert "steps/s" in printed and "lora" in printed

