"""A real PostgreSQL server for tests: its own cluster in a temp dir, on a free loopback port.

The fleet controller's database code runs against SQLite *and* PostgreSQL, and the two differ
exactly where tests must look (locking, upserts, JSON, integer widths), so the PostgreSQL
variant of a test talks to a real server rather than a mock. :class:`PostgresServer` runs
``initdb`` and ``pg_ctl`` from Debian's ``postgresql`` package (``/usr/lib/postgresql/*/bin``,
or whatever is on ``PATH``) with durability switched off (``--no-sync``, ``fsync=off``):
these clusters live for one test session.

PostgreSQL refuses to run as root. As root, the cluster belongs to the ``postgres`` user that
the Debian package creates (or ``nobody``), and the server runs as that user
(``subprocess``'s ``user=``/``group=``); the data directory is created for it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from support.mosquitto import free_port

__all__ = ["PG_MISSING", "PostgresServer", "find_pg_bindir", "running_postgres"]

#: The skip message when the server binaries are not installed.
PG_MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's 'postgresql' "
    "package (.ci/setup.sh does) to run the PostgreSQL variants"
)


def find_pg_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest Debian version first)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as, or None to run as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' user")


class PostgresServer:
    """One cluster; :meth:`create_database` gives each test a fresh, empty database."""

    def __init__(self, bindir: Path, *, user: str = "edgekit") -> None:
        self.bindir = bindir
        self.user = user
        self.port = free_port()
        self.host = "127.0.0.1"
        self.root = Path(tempfile.mkdtemp(prefix="edgekit-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self._owner = _run_as()
        self._counter = 0
        if self._owner is not None:
            os.chown(self.root, *self._owner)

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._owner is not None:
            kwargs.update(user=self._owner[0], group=self._owner[1], extra_groups=[])
        result: subprocess.CompletedProcess[str] = subprocess.run(
            list(args),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        return result

    def start(self) -> None:
        init = self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stdout}{init.stderr}")
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.root}",
                f"-c listen_addresses={self.host}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        started = self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        if started.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {started.stdout}{started.stderr}{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def url(self, database: str) -> str:
        """A SQLAlchemy URL (``postgresql://`` is read as psycopg 3 by the controller)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, prefix: str = "test") -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, stopped and deleted on exit; raises if the binaries are missing."""
    bindir = find_pg_bindir()
    if bindir is None:
        raise FileNotFoundError(PG_MISSING)
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
