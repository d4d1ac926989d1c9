"""The ``lorastudio`` command line, as a console script in a subprocess and in-process through ``app.cli.main``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from app import cli
from services.container import build_services
from services.settings import Settings
from tests.conftest import write_images
from tests.e2e.server import run_cli

ADAPTER = "cli-disc"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class CliHome:
    root: Path
    data: Path
    images: Path


@pytest.fixture(autouse=True)
def cli_env(monkeypatch: pytest.MonkeyPatch, models_dir: Path) -> None:
    """In-process runs see the shared built-in model and no LoRA Studio settings from the outer environment."""
    for key in [k for k in os.environ if k.startswith("LORASTUDIO_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LORASTUDIO_MODELS", str(models_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> CliHome:
    """A data dir with ``cli-disc`` trained by the console script: ``lorastudio train ... --steps 4 --rank 4``."""
    root = tmp_path_factory.mktemp("cli")
    images = root / "images"
    write_images(images, 3)
    data = root / "data"
    result = run_cli("train", "--images", str(images), "--name", ADAPTER, "--steps", "4", "--rank", "4",
                     "--data-dir", str(data), models_dir=models_dir, cwd=root, timeout=300)
    assert result.returncode == 0, f"lorastudio train failed:\n{result.stdout}\n{result.stderr}"
    assert f"dataset {ADAPTER}: 3 image(s)" in result.stdout
    assert f"adapter {ADAPTER} (" in result.stdout
    return CliHome(root, data, images)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def listed(home: CliHome, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict]:
    code, out, err = run_main(["adapters", "list", "--json", "--data-dir", str(home.data), *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_console_script_trains_and_lists(home: CliHome, models_dir: Path) -> None:
    result = run_cli("adapters", "list", "--data-dir", str(home.data), models_dir=models_dir, cwd=home.root)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(ADAPTER))
    assert "lora" in line and "subject" in line and "rank   4" in line and "steps     4" in line


def test_adapters_list_in_process(home: CliHome, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["adapters", "list", "--data-dir", str(home.data)], capsys)
    assert code == 0, err
    assert ADAPTER in out

    code, out, _ = run_main(["adapters", "list", "--search", "no-such-thing", "--data-dir", str(home.data)], capsys)
    assert code == 0
    assert "no adapters yet" in out


def test_adapters_list_json(home: CliHome, capsys: pytest.CaptureFixture[str]) -> None:
    entries = listed(home, capsys)
    assert [e["name"] for e in entries] == [ADAPTER]
    entry = entries[0]
    assert entry["method"] == "lora" and entry["kind"] == "subject"
    assert entry["rank"] == 4 and entry["steps"] == 4
    assert entry["trigger_words"] == ["sks"]
    assert len(entry["sha256"]) == 64 and len(entry["id"]) == 32
    assert listed(home, capsys, "--search", "CLI-D")[0]["id"] == entry["id"]


def test_generate_with_adapter_writes_png(home: CliHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "nested" / "x.png"
    code, out, err = run_main(["generate", "--prompt", "a photo of sks disc", "--adapter", f"{ADAPTER}:0.8",
                               "--steps", "2", "--out", str(out_file), "--data-dir", str(home.data)], capsys)
    assert code == 0, err
    assert f"wrote {out_file}" in out
    assert out_file.read_bytes()[:8] == PNG_MAGIC
    with Image.open(out_file) as image:
        assert image.format == "PNG" and image.size == (64, 64)


def test_train_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    write_images(images, 2, seed=5)
    data = tmp_path / "data"
    code, out, err = run_main(["train", "--images", str(images), "--name", "inproc", "--steps", "4", "--rank", "4",
                               "--kind", "style", "--data-dir", str(data)], capsys)
    assert code == 0, err
    assert "adapter inproc (" in out
    entries = listed(CliHome(tmp_path, data, images), capsys)
    assert [(e["name"], e["kind"], e["rank"], e["steps"], e["trigger_words"]) for e in entries] == [
        ("inproc", "style", 4, 4, [])]


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 1, size=32)
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "{missing}", "--name", "x"], "no such file or folder"),
        (["--images", "{empty}", "--name", "x"], "no .png/.jpg/.webp/.zip files"),
        (["--images", "{images}", "--name", "x", "--method", "nope"], "method 'nope'; known: lora"),
        (["--images", "{images}", "--name", "x", "--set", "learning_rate"], "--set expects KEY=VALUE"),
        (["--images", "{images}", "--name", "x", "--set", "bogus=1"], "unknown setting(s) bogus"),
        (["--images", "{images}", "--name", "x", "--steps", "0"], "max_steps"),
        (["--images", "{images}", "--name", "x", "--rank", "0"], "rank"),
        (["--images", "{images}", "--name", "bad/name"], "adapter name"),
    ],
    ids=["missing-folder", "empty-folder", "unknown-method", "bad-set-syntax", "unknown-setting", "steps-0",
         "rank-0", "bad-name"],
)
def test_train_errors(args: list[str], message: str, images: Path, tmp_path: Path, models_dir: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "images": images}
    argv = ["train", *[a.format(**paths) for a in args], "--data-dir", str(tmp_path / "data")]
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    if (tmp_path / "data").exists():  # a refused submission stores no dataset and queues no job
        services = build_services(Settings(data_dir=tmp_path / "data", models_path=models_dir))
        try:
            assert services.jobs.list_jobs() == []
            assert services.datasets.list_datasets() == []
        finally:
            services.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "a disc", "--adapter", "ghost:0.5"], "no adapter with id or name 'ghost'"),
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt", "a disc", "--steps", "0"], "steps must be between 1 and 200"),
        (["--prompt", "a disc", "--composer", "nope"], "nope"),
    ],
    ids=["unknown-adapter", "empty-prompt", "steps-0", "unknown-composer"],
)
def test_generate_errors(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "x.png"
    code, _, err = run_main(["generate", *args, "--out", str(out_file), "--data-dir", str(tmp_path / "data")],
                            capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert not out_file.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--images", "x"], "the following arguments are required: --name"),
        (["train", "--images", "x", "--name", "y", "--kind", "bogus"], "invalid choice: 'bogus'"),
        (["train", "--images", "x", "--name", "y", "--steps", "many"], "invalid int value: 'many'"),
        (["generate", "--prompt", "x"], "the following arguments are required: --out"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
    ids=["no-name", "bad-kind", "steps-not-int", "no-out", "unknown-command"],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_error_exit_code(tmp_path: Path, models_dir: Path) -> None:
    result = run_cli("train", "--images", str(tmp_path / "missing"), "--name", "x", "--data-dir",
                     str(tmp_path / "data"), models_dir=models_dir, cwd=tmp_path)
    assert result.returncode == 2
    assert "error:" in result.stderr and "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_jobs_commands_and_device_workers(tmp_path: Path, models_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from core.types import GenerationRequest

    data = tmp_path / "queue-data"
    services = build_services(Settings(data_dir=data, models_path=models_dir))
    try:
        first, second = (services.generation.submit(GenerationRequest(prompt="a disc", seed=s, steps=2)).id
                         for s in (1, 2))
    finally:
        services.close()
    home = ["--data-dir", str(data)]
    code, out, _ = run_main(["jobs", "top", second, *home], capsys)
    assert code == 0 and out.strip() == f"{second}: priority 2"  # generation jobs start at priority 1
    assert run_main(["jobs", "cancel", first, *home], capsys)[1].strip() == f"{first}: cancelled"
    assert run_main(["jobs", "retry", first, *home], capsys)[1].strip() == f"{first}: queued"
    code, out, _ = run_main(["jobs", "log", first, *home], capsys)
    assert "cancelled before it started" in out and out.rstrip().endswith("queued again (retry)")
    code, out, err = run_main(["jobs", "retry", second, *home], capsys)
    assert code == 2 and "cannot retry" in err
    assert run_main(["worker", "--once", "--devices", "cpu,cpu", *home], capsys)[0] == 0
    code, out, _ = run_main(["jobs", "list", "--json", *home], capsys)
    listing = {j["id"]: j for j in json.loads(out)}
    assert {j["status"] for j in listing.values()} == {"succeeded"}
    assert all(j["worker_id"] is None or "/" in j["worker_id"] for j in listing.values())
    code, out, _ = run_main(["jobs", "list", *home], capsys)
    assert code == 0 and first in out and "succeeded" in out


def test_adapters_export_and_import(home: CliHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import torch

    from core.io import load_safetensors

    data = tmp_path / "home"
    shutil.copytree(home.data, data)  # the module's data dir stays as the other tests expect it
    monkeypatch.setenv("LORASTUDIO_HOME", str(data))
    out = tmp_path / "out" / "disc.safetensors"
    code, stdout, err = run_main(["adapters", "export", ADAPTER, str(out)], capsys)
    assert code == 0, err
    assert f"wrote {out} (kohya, 56 layers)" in stdout
    tensors, header = load_safetensors(out)
    assert all(k.startswith("lora_unet_") for k in tensors) and len(tensors) == 3 * 56
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert header["ss_network_dim"] == "4" and header["ss_output_name"] == ADAPTER

    code, stdout, err = run_main(["adapters", "import", str(out), "--name", "disc back"], capsys)
    assert code == 0, err
    assert "imported disc back (" in stdout and "kohya LoRA, 56 layers, rank 4" in stdout
    entries = {e["name"]: e for e in json.loads(run_main(["adapters", "list", "--json"], capsys)[1])}
    assert entries["disc back"]["method"] == "lora" and entries["disc back"]["trigger_words"] == ["sks"]

    native = tmp_path / "native.safetensors"
    assert run_main(["adapters", "export", "disc back", str(native), "--format", "native"], capsys)[0] == 0
    assert load_safetensors(native)[1]["lorastudio.method"] == "lora"

    pickle = tmp_path / "lora.ckpt"
    torch.save({"x": torch.zeros(1)}, pickle)
    code, _, err = run_main(["adapters", "import", str(pickle), "--name", "p"], capsys)
    assert code == 2 and "pickles, which can run code" in err and "Traceback" not in err
    code, _, err = run_main(["adapters", "import", str(out), "--name", "disc back"], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_main(["adapters", "export", "ghost", str(native)], capsys)
    assert code == 2 and "no adapter with id or name 'ghost'" in err
