"""Engine, session factory, declarative base and schema upgrades.

SQLite and PostgreSQL are both supported. On SQLite every connection enforces foreign keys, uses WAL and waits
for locks instead of failing at once. SQLAlchemy (not the sqlite3 driver) emits ``BEGIN``, so a write
transaction can take its lock up front with :func:`begin_immediate`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from sqlalchemy import JSON, URL, DateTime, Engine, MetaData, String, create_engine, event, make_url, text
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Execution option read by the SQLite "begin" listener: "DEFERRED" (default), "IMMEDIATE" or "EXCLUSIVE".
SQLITE_BEGIN = "lorastudio_sqlite_begin"
_MIGRATION_LOCK_KEY = 0x4C6F5261  # pg_advisory_xact_lock key serialising concurrent upgrades


def new_id() -> str:
    """A fresh primary key: uuid4 as 32 hex characters."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    Naive datetimes are refused on write. SQLite stores no offset, so values are stored as UTC and given
    ``tzinfo=UTC`` again on read; PostgreSQL values are converted to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


str_pk = Annotated[str, mapped_column(String(32), primary_key=True, default=new_id)]
created_ts = Annotated[datetime, mapped_column(UTCDateTime(), default=utcnow)]
updated_ts = Annotated[datetime, mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)]
json_dict = Annotated[dict[str, Any], mapped_column(JSON(), default=dict)]
json_list = Annotated[list[Any], mapped_column(JSON(), default=list)]


def _is_sqlite_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:")


def _install_sqlite_hooks(engine: Engine, *, wal: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 driver; the "begin" listener below emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.execute("PRAGMA foreign_keys=ON")
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            raise ValueError(f"{SQLITE_BEGIN} must be DEFERRED, IMMEDIATE or EXCLUSIVE, got {mode!r}")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _json_dumps(obj: Any) -> str:
    # NaN/Infinity are not JSON and PostgreSQL refuses them: fail the same way on every backend.
    return json.dumps(obj, allow_nan=False, ensure_ascii=False)


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """Create an engine; SQLite gets foreign keys, WAL, a 10 s busy timeout and SQLAlchemy-controlled BEGIN.

    A SQLite file's parent folder is created. ``sqlite://`` (in memory) shares one connection across threads.
    """
    url = make_url(url)
    kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _json_dumps}
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    memory = _is_sqlite_memory(url)
    if memory:
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif not url.database.startswith("file:"):
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, **kwargs)
    _install_sqlite_hooks(engine, wal=not memory)
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows stay readable once the transaction ends)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def begin_immediate(session: Session) -> None:
    """Start the session's transaction holding the SQLite write lock (``BEGIN IMMEDIATE``); no-op elsewhere.

    Call it before the first statement of a transaction that reads and then writes: under a deferred BEGIN,
    SQLite fails such a transaction with "database is locked" if another writer commits in between.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})


@contextmanager
def writing(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction that will write: takes the write lock up front on SQLite, commits on success."""
    with sessions.begin() as session:
        begin_immediate(session)
        yield session


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the migration scripts shipped in this package."""
    from alembic.config import Config  # imported here: only schema upgrades need Alembic

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade_database(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent); concurrent callers are serialised."""
    from alembic import command

    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with connection.begin():
            if engine.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            command.upgrade(alembic_config(connection), revision)


def open_database(url: str | URL, *, echo: bool = False) -> tuple[Engine, sessionmaker[Session]]:
    """Engine + session factory for ``url``, with the schema upgraded to the latest revision."""
    engine = make_engine(url, echo=echo)
    upgrade_database(engine)
    return engine, make_session_factory(engine)
