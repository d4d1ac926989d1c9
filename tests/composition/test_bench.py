"""The composition benchmark runs every composer plus the naive composite and reports ratios; the CLI knows it."""

from __future__ import annotations

from app.cli import build_parser
from composition.base import COMPOSERS
from composition.bench import NaiveComposite, analytic_floor, attach_random_loras, run_compose_benchmark
from composition.sampler import SampleRequest, sample
from core.builtin import build_pipeline
from services.runtime import PeftAdapterSet
from tests.composition.conftest import max_diff, quiet


def test_compose_benchmark_structure() -> None:
    pipe = quiet(build_pipeline())
    results = run_compose_benchmark(pipe, lambda n: PeftAdapterSet(pipe, attach_random_loras(pipe, n)),
                                    n_values=(2,), steps=2, repeats=1, base_pipe=quiet(build_pipeline()))
    row = results["n"]["2"]
    assert set(row) == {"base", "naive_composite", *COMPOSERS.names()}
    for name in ("merge", "switch", "composite", "cmlora", "clora", "naive_composite"):
        assert row[name]["seconds"] > 0 and row[name]["vs_base"] > 0 and "vs_floor" in row[name], name
    assert row["composite"]["floor_passes"] == 2 and "speedup_vs_naive" in row["composite"]
    assert len(pipe.unet.peft_config) == 2  # exactly N adapters attached
    assert analytic_floor("cmlora", 3, {"cache_interval": 2}) < analytic_floor("composite", 3, {})


def test_naive_composite_matches_ours(lora_pipe, lora_adapters) -> None:
    request = SampleRequest("a sks dog near a tree", seed=5, steps=3)
    weights = {"a": 1.0, "b": 0.5}
    naive = sample(lora_pipe, NaiveComposite(), lora_adapters, weights, request)
    ours = sample(lora_pipe, COMPOSERS.get("composite")(), lora_adapters, weights, request)
    assert max_diff(naive, ours) <= 1
    lora_adapters.apply({})


def test_cli_has_compose_suite() -> None:
    parser = build_parser()
    assert parser.parse_args(["bench", "compose", "--json", "out.json"]).suite == "compose"
    assert parser.parse_args(["bench", "loop"]).suite == "loop"
