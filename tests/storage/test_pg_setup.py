"""The test setup can start its own PostgreSQL when none is running: a real initdb + pg_ctl cluster."""

from __future__ import annotations

import pytest

from storage.db import make_engine, upgrade_database
from tests.pg import PrivatePostgres, _binary, reachable
from tests.storage.conftest import create_pg_database, drop_pg_database

pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(_binary("initdb") is None, reason="PostgreSQL server binaries not installed")]


def test_private_server_starts_serves_migrations_and_stops() -> None:
    server = PrivatePostgres()
    try:
        admin = server.start()
        assert reachable(admin)
        url = create_pg_database(admin)
        engine = make_engine(url)
        try:
            upgrade_database(engine)
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 0
        finally:
            engine.dispose()
            drop_pg_database(admin, url)
    finally:
        server.stop()
    assert not reachable(admin)
    assert not server.root.exists()
