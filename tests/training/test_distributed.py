"""Data-parallel training of one job: ``torchrun`` starts two CPU processes (gloo) running ``training.launch``.

Two processes with ``batch_size`` 1 must train the same adapter as one process with ``batch_size`` 2 and the same
seed: both draw the same global batch, timesteps and noise, and DDP's averaged gradient is the gradient of the
batch mean. They agree up to float summation order (the batch sum inside one GEMM against a sum of per-process
sums), which AdamW's per-element normalisation amplifies in entries whose gradient is near zero; so the adapters
are compared by the relative norm of their difference (measured about 5e-5; a one-process run with a different
thread count differs from itself by as much) and the per-step losses to the printed 6 decimals. Processes that
took the same samples instead of disjoint shares differ by a relative 0.77.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from core.io import load_safetensors
from tests.training.conftest import write_images
from training import launch
from training.trainer import CHECKPOINT_DIR

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300
SETTINGS = {"max_steps": 4, "seed": 3, "learning_rate": 1e-3, "preview_every": 0, "checkpoint_every": 0}
REL_TOLERANCE = 1e-3  # relative norm of the adapter difference; measured ~5e-5, wrong sharding gives ~0.77
LOSS_TOLERANCE = 2e-6  # losses are printed with 6 decimals
_STEP = re.compile(r"^step (\d+)/(\d+) loss ([0-9.]+)", re.M)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from core.builtin import ensure_builtin

    root = tmp_path_factory.mktemp("distributed")
    images = root / "images"
    for path, caption in write_images(images, count=3):
        path.with_suffix(".txt").write_text(caption)
    return {"base": ensure_builtin(root / "models"), "images": images}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(inputs: dict[str, Path], out: Path, work_dir: Path | None = None, **settings) -> list[str]:
    argv = ["--base", str(inputs["base"]), "--images", str(inputs["images"]), "--method", "lora", "--trigger",
            "sks", "--out", str(out), "--config", json.dumps({**SETTINGS, **settings})]
    return argv + (["--work-dir", str(work_dir)] if work_dir is not None else [])


def _torchrun(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "training.launch", *argv]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def _run_two(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_torchrun(argv), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _losses(output: str) -> list[float]:
    return [float(m[3]) for m in _STEP.finditer(output)]


def _relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``‖b − a‖ / ‖a‖`` over the ``lora_B`` factors, which start at zero: the trained update itself."""
    keys = [k for k in a if "lora_B" in k]
    diff = sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in keys)
    return (diff / sum(float(a[k].double().pow(2).sum()) for k in keys)) ** 0.5


def test_two_processes_train_like_one_with_the_global_batch(inputs, tmp_path: Path, capsys) -> None:
    one_out = tmp_path / "one" / "adapter.safetensors"
    assert launch.main(_argv(inputs, one_out, batch_size=2)) == 0
    one_losses = _losses(capsys.readouterr().out)

    out_dir, work = tmp_path / "two", tmp_path / "two-work"
    two_out = out_dir / "adapter.safetensors"
    done = _run_two(_argv(inputs, two_out, work, batch_size=1, checkpoint_every=2))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout
    assert "2 process(es) (DistributedType.MULTI_CPU); global batch 2" in log
    assert len(_STEP.findall(log)) == 4 and log.count("wrote ") == 1  # only the main process reports and writes
    assert [p.name for p in out_dir.iterdir()] == ["adapter.safetensors"]
    assert [p.name for p in (work / CHECKPOINT_DIR).iterdir()] == ["step-000002"]
    assert json.loads((work / CHECKPOINT_DIR / "step-000002" / "state.json").read_text())["num_processes"] == 2

    assert _losses(log) == pytest.approx(one_losses, abs=LOSS_TOLERANCE)
    one, _ = load_safetensors(one_out)
    two, meta = load_safetensors(two_out)
    assert meta["lorastudio.method"] == "lora" and meta["lorastudio.steps"] == "4"
    assert two.keys() == one.keys()
    assert _relative_difference(one, two) < REL_TOLERANCE
    assert max(float((two[k] - one[k]).abs().max()) for k in one) < 0.1 * SETTINGS["learning_rate"]

    # every process resumes from the same checkpoint and finishes exactly like the uninterrupted run
    resumed_work = tmp_path / "resumed-work"
    shutil.copytree(work, resumed_work)
    resumed_out = tmp_path / "resumed" / "adapter.safetensors"
    again = _run_two(_argv(inputs, resumed_out, resumed_work, batch_size=1, checkpoint_every=2))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout and [int(m[1]) for m in _STEP.finditer(again.stdout)] == [3, 4]
    resumed, _ = load_safetensors(resumed_out)
    assert all(torch.equal(resumed[k], two[k]) for k in two)

    # a checkpoint of two processes is not resumed by one: the global batch would change
    assert launch.main(_argv(inputs, tmp_path / "x.safetensors", resumed_work, batch_size=1,
                             checkpoint_every=2)) == launch.EXIT_BAD_INPUT
    assert "resume it with 2 process(es)" in capsys.readouterr().err


def test_stop_file_stops_every_process_at_the_same_step(inputs, tmp_path: Path) -> None:
    stop, out, work = tmp_path / "stop", tmp_path / "adapter.safetensors", tmp_path / "work"
    argv = _argv(inputs, out, work, batch_size=1, max_steps=500, checkpoint_every=1) + ["--stop-file", str(stop)]
    proc = subprocess.Popen(_torchrun(argv), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.1))) is not None:
            output.append(line)
            if line.startswith("step 2/500"):
                stop.touch()  # seen by the main process only; the others learn it from its broadcast
        proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(output)
    stopped = dict(re.findall(r"process (\d): training stopped at step (\d+) of 500", text))
    assert set(stopped) == {"0", "1"}, text[-3000:]
    assert len(set(stopped.values())) == 1 and 2 <= int(stopped["0"]) < 500
    assert proc.returncode != 0 and not out.exists()
    assert not (work / CHECKPOINT_DIR).exists()  # the main process removed the run's checkpoints
