"""Storage fixtures: a fresh SQLite file per test, and a throwaway PostgreSQL database per session.

PostgreSQL tests are marked ``postgres``. They use the server of ``tests.pg`` (``LORASTUDIO_TEST_PG_URL``, else
127.0.0.1:5432, else a private server the setup starts); when none can be had they fail with a message saying so;
deselect them with ``-m 'not postgres'``.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from storage.db import Base, make_engine, make_session_factory, upgrade_database
from tests.pg import admin_url


class PostgresUnavailable(RuntimeError):
    pass


def _connect(url: URL) -> psycopg.Connection:
    return psycopg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        dbname=url.database or "postgres",
        autocommit=True,
        connect_timeout=5,
    )


def create_pg_database(admin_url: str) -> str:
    """Create ``lorastudio_test_<random>`` and return its SQLAlchemy URL."""
    url = make_url(admin_url)
    name = f"lorastudio_test_{secrets.token_hex(6)}"
    try:
        with _connect(url) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.OperationalError as exc:
        where = url.render_as_string(hide_password=True)
        raise PostgresUnavailable(
            f"PostgreSQL is not reachable at {where} ({' '.join(str(exc).split())}). Start the server, point "
            "LORASTUDIO_TEST_PG_URL at one, or deselect these tests with -m 'not postgres'."
        ) from None
    return url.set(database=name).render_as_string(hide_password=False)


def drop_pg_database(admin_url: str, url: str) -> None:
    name = make_url(url).database
    with _connect(make_url(admin_url)) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    problem = None
    try:
        url = create_pg_database(admin_url())
    except PostgresUnavailable as exc:
        problem = str(exc)
    if problem:
        pytest.fail(problem, pytrace=False)
    try:
        yield url
    finally:
        drop_pg_database(admin_url(), url)


@pytest.fixture(scope="session")
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url)
    upgrade_database(engine)
    yield engine
    engine.dispose()


def _empty_all_tables(engine: Engine) -> None:
    with engine.begin() as conn:  # DELETE, not TRUNCATE: much faster on tables this small
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database file upgraded once by the migrations; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "catalog.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade_database(engine)
    engine.dispose()  # checkpoints the WAL into the main file
    return path


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "db" / "catalog.db"
    path.parent.mkdir()
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """An upgraded, empty database: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_engine")
        return
    pg = request.getfixturevalue("pg_engine")
    _empty_all_tables(pg)
    yield pg


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)
