"""The PostgreSQL server of the test run: the one at ``LORASTUDIO_TEST_PG_URL`` or 127.0.0.1:5432, else a private one.

When no server answers on the default address and PostgreSQL's ``initdb``/``pg_ctl`` are installed, the test setup
creates a throwaway cluster in a temp folder (trust auth, loopback only, a free port), starts it for the run and
stops and deletes it at exit. An explicit ``LORASTUDIO_TEST_PG_URL`` is used as given, never replaced.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from sqlalchemy import make_url

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
_admin_url: str | None = None


def reachable(admin_url: str) -> bool:
    url = make_url(admin_url)
    try:
        with psycopg.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                             dbname=url.database or "postgres", connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster owned by this process."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _binary("initdb"), _binary("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise RuntimeError("PostgreSQL's initdb/pg_ctl are not installed")
        self.root = Path(tempfile.mkdtemp(prefix="lorastudio-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        self.started = False

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stderr.strip() or done.stdout.strip()}")

    def start(self) -> str:
        """Create and start the cluster; return its admin URL."""
        if self._as_postgres:
            shutil.chown(self.root, "postgres")
        self._run(self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        self.started = True
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.started:
            try:
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


def admin_url() -> str:
    """The admin URL of the run's server, starting a private one when needed (once per process)."""
    global _admin_url
    if _admin_url is not None:
        return _admin_url
    explicit = os.environ.get("LORASTUDIO_TEST_PG_URL")
    if explicit or reachable(DEFAULT_ADMIN_URL):
        _admin_url = explicit or DEFAULT_ADMIN_URL
        return _admin_url
    try:
        server = PrivatePostgres()
        url = server.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        _admin_url = DEFAULT_ADMIN_URL  # let the tests fail with the "not reachable" message
        return _admin_url
    atexit.register(server.stop)
    os.environ["LORASTUDIO_TEST_PG_URL"] = url  # worker subprocesses of the tests find the same server
    _admin_url = url
    return url
