"""Start ``lorastudio serve`` as a real subprocess and wait for its page; shared by the e2e and security tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


def lorastudio_executable() -> Path:
    """The ``lorastudio`` console script of the interpreter running the tests (``.venv/bin/lorastudio``)."""
    script = Path(sys.executable).parent / "lorastudio"
    if not script.exists():
        raise RuntimeError(f"{script} is missing: install the project with `pip install -e .[test]`")
    return script


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(models_dir: Path, **extra: str) -> dict[str, str]:
    """The test environment with the shared built-in model, offline hub, and no inherited LoRA Studio settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASTUDIO_")}
    env.update(LORASTUDIO_MODELS=str(models_dir), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """The HTTP status of a GET, or ``None`` when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


@dataclass
class Server:
    """One ``lorastudio serve`` process, its log file and how long it took to answer its page."""

    process: subprocess.Popen
    url: str
    port: int
    data_dir: Path
    log_path: Path
    started_at: float
    ready_s: float | None = None
    extra: dict = field(default_factory=dict)

    def log(self, tail: int = 12000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-tail:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, expect: tuple[int, ...] = (200,)) -> float:
        """Poll the page until it answers with one of ``expect``; returns seconds since the process started."""
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lorastudio serve exited with code {self.process.returncode} before its page "
                                   f"answered; log:\n{self.log()}")
            status = http_status(self.url + "/")
            if status in expect:
                self.ready_s = time.monotonic() - self.started_at
                return self.ready_s
            time.sleep(0.2)
        raise RuntimeError(f"lorastudio serve did not answer {self.url} with {expect} within {timeout:.0f} s; "
                           f"log:\n{self.log()}")

    def stop(self) -> int:
        """SIGINT (the way Ctrl+C stops it), then SIGKILL if it lingers; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(data_dir: Path, models_dir: Path, log_path: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None) -> Server:
    """Launch ``lorastudio serve --port P --data-dir D [args]`` with its output going to ``log_path``."""
    port = port or free_port()
    command = [str(lorastudio_executable()), "serve", "--port", str(port), "--data-dir", str(data_dir), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env or server_env(models_dir), cwd=data_dir.parent)
    return Server(process, f"http://127.0.0.1:{port}", port, data_dir, log_path, started)


def run_cli(*args: str, models_dir: Path, cwd: Path, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the ``lorastudio`` console script to completion and capture its output."""
    return subprocess.run([str(lorastudio_executable()), *args], capture_output=True, text=True, timeout=timeout,
                          env=env or server_env(models_dir), cwd=cwd, stdin=subprocess.DEVNULL)
