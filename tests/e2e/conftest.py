"""End-to-end fixtures: the real ``lorastudio serve`` process and a headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import Server, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_LOG_SECTION = "lorastudio serve log"
_timings: list[tuple[str, float]] = []
_servers: list[Server] = []


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``lorastudio serve`` on a free port and a fresh data dir, reusing the session's built-in model."""
    root = tmp_path_factory.mktemp("e2e-server")
    srv = start_server(root / "data", models_dir, root / "serve.log")
    try:
        ready = srv.wait_ready()
    except RuntimeError as exc:
        srv.stop()
        pytest.fail(str(exc), pytrace=False)
    _servers.append(srv)
    _timings.append(("lorastudio serve → first HTTP 200 of the page", ready))
    print(f"\nlorastudio serve answered {srv.url} after {ready:.1f} s")
    try:
        yield srv
    finally:
        code = srv.stop()
        _servers.remove(srv)
        if code not in (0, 130, -2):
            print(f"lorastudio serve exited with {code}; log:\n{srv.log()}")


@pytest.fixture(scope="session")
def server_url(server: Server) -> str:
    return server.url


def _install_chromium() -> str | None:
    """Install Debian's Chromium with apt-get when running as root (as scripts/test.sh does)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.STDOUT, "timeout": 600}
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, **quiet).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, **quiet)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, **quiet)
    return shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)


def chromium_path() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found:
        return found
    found = _install_chromium()
    if not found:
        pytest.fail("Chromium is missing: the browser tests need Debian's chromium at /usr/bin/chromium "
                    "(install it with `sudo apt-get install chromium`, or run `bash scripts/test.sh` as root); "
                    "`playwright install` downloads are not used", pytrace=False)
    return found


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory):
    """One headless Chromium for the session, on a fresh profile directory."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000}, accept_downloads=True)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture()
def page(browser_context, server_url: str):
    """A new tab on the app's page, closed after the test."""
    tab = browser_context.new_page()
    tab.set_default_timeout(30_000)
    tab.goto(server_url, wait_until="domcontentloaded")
    try:
        yield tab
    finally:
        tab.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("LORASTUDIO_E2E_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _servers:
        for srv in _servers:
            report.sections.append((f"{SERVER_LOG_SECTION} ({srv.url})", srv.log()))


def pytest_terminal_summary(terminalreporter) -> None:
    for label, seconds in _timings:
        terminalreporter.write_line(f"{label}: {seconds:.1f} s")
