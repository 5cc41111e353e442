"""``edgekit fleet serve``: the parts of the controller wired together in one process.

Threads, each with one job:

* paho's network thread (``ControllerLink``) receives device messages and queues them;
* the ingest writer (``Ingest``) writes them to the registry in batches;
* the engine thread waits for the broker, reconciles the retained ``desired`` messages with
  the database, lets the ingest catch up with the retained state, and only then starts ticking
  the rollout state machines and publishing what they decide. That order is what makes a
  restart safe: no tick ever judges a device on state older than what the broker holds, so a
  restarted controller neither times out a device that finished while it was away nor sends it
  the same rollout again;
* uvicorn serves the REST API, the artifact downloads and the dashboard.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.fleet.api import ApiContext, create_app
from edgekit.fleet.artifacts import ArtifactStore
from edgekit.fleet.auth import TokenRing
from edgekit.fleet.db import Database
from edgekit.fleet.ingest import Ingest
from edgekit.fleet.mqtt import BrokerAddress, ControllerLink
from edgekit.fleet.publisher import Publisher, ReconcileReport
from edgekit.fleet.registry import Registry
from edgekit.fleet.rollouts import RolloutEngine

__all__ = ["Controller", "ServeConfig", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    broker: str
    db_url: str
    artifacts: Path
    tokens: TokenRing
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    """Base URL devices download bundles from (default: http://HOST:PORT)."""
    fleet: str | None = None
    """Ingest only this fleet (default: every fleet under ``edgekit/v1``)."""
    client_id: str = "edgekit-controller"
    share_group: str | None = None
    session_expiry_s: int = 3600
    ca_file: str | None = None
    tick_s: float = 1.0
    stale_after_s: float = 120.0
    history_interval_s: float = 60.0
    dashboard_refresh_s: int = 5
    log_level: str = "info"

    def resolved_public_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Controller:
    """Everything but the HTTP server; usable in-process (tests) or by :func:`serve`."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.address = BrokerAddress.parse(config.broker)
        self.db = Database(config.db_url)
        self.db.create_all()
        self.artifacts = ArtifactStore(
            config.artifacts, self.db, public_url=config.resolved_public_url()
        )
        self.artifacts.import_dir()
        self.registry = Registry(self.db, stale_after_s=config.stale_after_s)
        self.engine = RolloutEngine(self.db, url_for=self.artifacts.url_for, tick_s=config.tick_s)
        self.ingest = Ingest(self.db, history_interval_s=config.history_interval_s)
        self.link = ControllerLink(
            self.address,
            client_id=config.client_id,
            fleet=config.fleet,
            share_group=config.share_group,
            session_expiry_s=config.session_expiry_s,
            on_message=self.ingest.submit,
            ca_file=config.ca_file,
        )
        self.publisher = Publisher(self.db, self.link)
        self.reconciled: ReconcileReport | None = None
        self.ready = threading.Event()
        """Set when the engine runs (after reconciliation and catching up)."""
        self._stop = threading.Event()
        self._engine_thread: threading.Thread | None = None

    def start(self) -> None:
        self.ingest.start()
        self.link.start()
        self._engine_thread = threading.Thread(
            target=self._run_engine, name="edgekit-engine", daemon=True
        )
        self._engine_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.engine.wake()
        if self._engine_thread is not None:
            self._engine_thread.join(15)
        self.link.stop()
        self.ingest.stop()
        self.db.dispose()

    def _run_engine(self) -> None:
        while not self._stop.is_set():
            if not self.link.subscribed.wait(0.5):
                continue
            try:
                self.reconciled = self.publisher.reconcile(
                    self.address, fleet=self.config.fleet, ca_file=self.config.ca_file
                )
            except Exception as exc:
                log.warning("reconciling with the broker failed (%s); retrying", exc)
                self._stop.wait(2.0)
                continue
            break
        if self._stop.is_set():
            return
        self.ingest.drain(timeout=30.0)  # the retained status/reported arrived meanwhile
        self.ready.set()
        log.info("controller ready")
        self.engine.run(self._stop, after_tick=self.publisher.flush)

    def stats(self) -> dict[str, Any]:
        return {
            "uptime_s": time.time() - self.started_at,
            "ready": self.ready.is_set(),
            "rss_bytes": _rss_bytes(),
            "pid": os.getpid(),
            "mqtt": {
                "broker": str(self.address),
                "connected": self.link.connected.is_set(),
                "connects": self.link.connects,
            },
            "ingest": self.ingest.stats.to_dict(),
            "engine": {"ticks": self.engine.ticks, "errors": self.engine.errors},
            "publisher": {
                "desired": self.publisher.published_desired,
                "commands": self.publisher.published_commands,
            },
            "reconcile": None if self.reconciled is None else self.reconciled.to_dict(),
        }

    def api_context(self) -> ApiContext:
        return ApiContext(
            registry=self.registry,
            engine=self.engine,
            artifacts=self.artifacts,
            tokens=self.config.tokens,
            stats=self.stats,
            default_fleet=self.config.fleet,
            dashboard_refresh_s=self.config.dashboard_refresh_s,
        )


def serve(config: ServeConfig) -> None:
    """Run until SIGINT/SIGTERM (uvicorn handles the signals), then stop the threads."""
    import uvicorn

    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    controller = Controller(config)
    controller.start()
    try:
        app = create_app(controller.api_context())
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level=config.log_level.lower(),
                access_log=False,
                lifespan="off",
            )
        )
        server.run()
    finally:
        controller.stop()
