"""The database fixtures the fleet suites share: one PostgreSQL server per test session, and
``db_url`` parametrized over SQLite and PostgreSQL so each test runs on both engines.

Import them into a ``conftest.py`` (``from support.db_fixtures import db_url, pg_server``) to
make them available there; a missing PostgreSQL skips only the PostgreSQL variants.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.postgres import PG_MISSING, PostgresServer, find_pg_bindir

__all__ = ["db_url", "pg_server"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bindir = find_pg_bindir()
    if bindir is None:
        pytest.skip(PG_MISSING)
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database()
