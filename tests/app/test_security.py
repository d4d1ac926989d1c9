"""Exposure rules of ``lorastudio serve``: no listening beyond localhost without a login, and the login holds."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from app import cli
from tests.e2e.server import free_port, lorastudio_executable, port_is_open, server_env, start_server

REFUSAL_TIMEOUT_S = 60.0


def wait_for_refusal(process, port: int, timeout: float = REFUSAL_TIMEOUT_S) -> bool:
    """Wait for the process to exit; returns whether its port was ever open meanwhile."""
    opened = False
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        opened = opened or port_is_open(port) or port_is_open(port, "0.0.0.0")
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
        process.wait(10)
        raise AssertionError(f"serve did not exit within {timeout:.0f} s")
    return opened


@pytest.mark.parametrize("exposure", [["--host", "0.0.0.0"], ["--share"]], ids=["host-0.0.0.0", "share"])
def test_exposed_serve_without_auth_refuses_to_start(exposure: list[str], models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    process = subprocess.Popen(
        [str(lorastudio_executable()), "serve", "--port", str(port), "--data-dir", str(data), *exposure],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env(models_dir), cwd=tmp_path)
    opened = wait_for_refusal(process, port)
    out, err = process.communicate()
    assert process.returncode != 0, f"serve {' '.join(exposure)} without auth started; output:\n{out}\n{err}"
    assert "--auth" in err, err
    assert not opened, "the port was opened before the refusal"
    assert "Running on" not in out + err


@pytest.mark.parametrize("auth", ["nocolon", "user:", ":secret"])
def test_malformed_auth_is_rejected(auth: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    launched = []
    monkeypatch.setattr("app.main.launch", lambda *a, **k: launched.append((a, k)) or 0)
    code = cli.main(["serve", "--auth", auth, "--data-dir", str(tmp_path / "data")])
    assert code != 0
    assert "user:password" in capsys.readouterr().err
    assert not launched


@pytest.mark.parametrize("exposure", [["--host", "0.0.0.0"], ["--share"], ["--host", "192.168.1.5"]])
def test_refusal_happens_before_launch(exposure: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LORASTUDIO_AUTH", raising=False)
    launched = []
    monkeypatch.setattr("app.main.launch", lambda *a, **k: launched.append((a, k)) or 0)
    code = cli.main(["serve", *exposure, "--data-dir", str(tmp_path / "data")])
    assert code != 0
    assert "--auth" in capsys.readouterr().err
    assert not launched


def test_auth_from_environment_allows_exposure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORASTUDIO_AUTH", "admin:s3cret")
    launched = []
    monkeypatch.setattr("app.main.launch", lambda settings, **k: launched.append(settings) or 0)
    assert cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "data")]) == 0
    assert launched and launched[0].host == "0.0.0.0" and launched[0].auth == "admin:s3cret"


def http(method: str, url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_login_protects_the_api(models_dir: Path, tmp_path: Path) -> None:
    srv = start_server(tmp_path / "data", models_dir, tmp_path / "serve.log", "--auth", "alice:wonder-land")
    try:
        try:
            srv.wait_ready()
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        try:
            assert http("GET", f"{srv.url}/config") == 401
            call = json.dumps({"data": []}).encode()
            assert http("POST", f"{srv.url}/gradio_api/call/adapter_choices", call) == 401
            with pytest.raises(AuthenticationError, match="credentials were not provided"):
                Client(srv.url, verbose=False, analytics_enabled=False)
            with pytest.raises(ValueError, match="Could not login"):
                Client(srv.url, auth=("alice", "wrong"), verbose=False, analytics_enabled=False)

            client = Client(srv.url, auth=("alice", "wonder-land"), verbose=False, analytics_enabled=False,
                            download_files=str(tmp_path / "downloads"))
            assert "/generate" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
            pickers = client.predict(api_name="/adapter_choices")
            assert pickers[0]["choices"] == []
        except BaseException:
            print(f"serve log:\n{srv.log()}")
            raise
    finally:
        srv.stop()
