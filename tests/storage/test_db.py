from __future__ import annotations

from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, delete, event, inspect, select, text
from sqlalchemy.exc import IntegrityError

from storage import catalog, jobs
from storage.db import (
    MIGRATIONS_DIR,
    Base,
    begin_immediate,
    make_engine,
    make_session_factory,
    open_database,
    upgrade_database,
)
from storage.models import AdapterPreviewRow, AdapterRow, DatasetImageRow, DatasetRow, GeneratedImageRow, JobRow
from tests.storage.conftest import PostgresUnavailable, create_pg_database


def _adapter(session, name="a", **kw) -> AdapterRow:
    fields = dict(
        name=name,
        method="lora",
        kind="style",
        base_model="tiny",
        sha256="0" * 64,
        file_size=1,
        file_path=f"adapters/{name}/adapter.safetensors",
    )
    fields.update(kw)
    return catalog.add_adapter(session, **fields)


def test_migrations_match_models(engine: Engine) -> None:
    upgrade_database(engine)  # a second upgrade is a no-op
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == "0002"
        names = set(inspect(conn).get_table_names())
    assert names == set(Base.metadata.tables) | {"alembic_version"}


def test_migration_scripts_live_in_the_package() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "versions" / "0001_initial.py").is_file()


def test_open_database_from_another_cwd(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine, sessions = open_database(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'x.db'}")
    with sessions.begin() as session:
        assert jobs.list_jobs(session) == []
    engine.dispose()
    assert (tmp_path / "nested" / "dir" / "x.db").is_file()


def test_sqlite_pragmas(sqlite_engine: Engine) -> None:
    for _ in range(2):  # every pooled connection, not just the first
        with sqlite_engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_sqlite_in_memory_is_shared_and_enforces_foreign_keys() -> None:
    engine, sessions = open_database("sqlite://")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(
            DatasetImageRow(dataset_id="missing", position=0, filename="x", path="x", width=1, height=1, sha256="0")
        )
    engine.dispose()


def test_sqlite_begin_is_emitted_by_sqlalchemy(sqlite_engine: Engine) -> None:
    statements: list[str] = []

    @event.listens_for(sqlite_engine, "before_cursor_execute")
    def _log(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    sessions = make_session_factory(sqlite_engine)
    with sessions.begin() as session:
        begin_immediate(session)
        session.execute(text("SELECT 1"))
    with sessions.begin() as session:
        session.execute(text("SELECT 1"))
    assert statements == ["BEGIN IMMEDIATE", "SELECT 1", "BEGIN DEFERRED", "SELECT 1"]


def test_sqlite_transactions_are_real(sqlite_engine: Engine) -> None:
    """DDL and writes roll back together (the driver's legacy autocommit is off)."""
    with pytest.raises(RuntimeError), sqlite_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE scratch (x INTEGER)")
        raise RuntimeError
    assert "scratch" not in inspect(sqlite_engine).get_table_names()


def test_timestamps_are_utc_aware(sessions) -> None:
    with sessions.begin() as session:
        job_id = jobs.enqueue(session, "train", {}, "t").id
    with sessions() as session:
        row = session.get(JobRow, job_id)
        assert row.created_at.tzinfo is timezone.utc
        info = jobs.job_info(row)
        assert info.created_at.utcoffset().total_seconds() == 0


def test_naive_datetimes_are_refused(sessions) -> None:
    with sessions() as session:
        row = _adapter(session)
        row.deleted_at = datetime(2024, 1, 1)
        with pytest.raises(Exception, match="naive datetime"):
            session.flush()


def test_foreign_keys_cascade_and_set_null(sessions) -> None:
    with sessions.begin() as session:
        dataset = catalog.add_dataset(session, "d")
        catalog.add_dataset_image(
            session,
            dataset.id,
            position=0,
            filename="a.png",
            path="datasets/x/0000.png",
            width=8,
            height=8,
            sha256="0" * 64,
        )
        job = jobs.enqueue(session, "train", {}, "t")
        adapter = _adapter(session, dataset_id=dataset.id, job_id=job.id, previews=["p/0.png"], tags=["x"])
        image = catalog.add_image(session, path="images/x.png", prompt="p", seed=1, sha256="0", job_id=job.id)
        ids = dataset.id, job.id, adapter.id, image.id
    dataset_id, job_id, adapter_id, image_id = ids
    with sessions.begin() as session:  # Core deletes: the database enforces these, not the ORM
        session.execute(delete(DatasetRow).where(DatasetRow.id == dataset_id))
        session.execute(delete(JobRow).where(JobRow.id == job_id))
    with sessions.begin() as session:
        assert session.scalars(select(DatasetImageRow)).all() == []
        adapter = session.get(AdapterRow, adapter_id)
        assert adapter.dataset_id is None and adapter.job_id is None
        assert session.get(GeneratedImageRow, image_id).job_id is None
        session.execute(delete(AdapterRow).where(AdapterRow.id == adapter_id))
    with sessions.begin() as session:
        assert session.scalars(select(AdapterPreviewRow)).all() == []
        assert session.execute(text("SELECT count(*) FROM adapter_tags")).scalar() == 0


def test_foreign_key_violation_is_refused(sessions) -> None:
    with pytest.raises(IntegrityError), sessions.begin() as session:
        _adapter(session, dataset_id="0" * 32)


def test_job_status_is_checked(sessions) -> None:
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(JobRow(kind="train", status="bogus", payload={}, title="x"))


def test_make_engine_creates_parent_folder(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'c.db'}")
    with engine.connect():
        pass
    engine.dispose()
    assert (tmp_path / "a" / "b" / "c.db").exists()


def test_unreachable_postgres_fails_with_a_clear_message() -> None:
    with pytest.raises(PostgresUnavailable, match="PostgreSQL is not reachable at .*-m 'not postgres'"):
        create_pg_database("postgresql+psycopg://postgres@127.0.0.1:1/postgres")
