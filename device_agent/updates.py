"""The model update state machine: the one place that decides what the device serves.

An update goes through these phases; each transition is written to ``state.json`` (atomically)
*before* the agent acts on it, then appended to the event log::

    obtain ──> staging ──> selftest ──> health ──> committed
    (download)  verify +    golden set   serving on     state.json: active = new,
                extract     on this      probation      previous = old, floor = version
                            runtime         │
                   │            │           └──> rolled back (errors, p95, manual, crash)
                   └────────────┴──> refused: nothing the device serves changed

Rules (docs/agent.md has the operator's version):

* **Refusal** (download, verification, disk full, load or self-test failure) happens before the
  candidate serves a single request; its slot is deleted and ``state.json`` returns to exactly
  the bytes it had.
* **Activation** is a hot swap: the pointer to the serving model is replaced under a lock;
  requests already running finish on the old model, which is only closed when the last of them
  returns (see :class:`device_agent.agent.Agent`). The old model stays loaded, off duty, until
  the update commits, so a rollback is instant and cannot fail to load.
* **Health window**: after activation, ``min_inferences`` real requests or ``max_seconds``,
  whichever comes first; the error rate and p95 latency of the *new* model's requests must be
  within bounds, else automatic rollback with the reason recorded.
* **Commit** raises the anti-rollback floor to the bundle's version; the floor never decreases.

Crash recovery (:func:`recovered_state`), by the phase found in ``state.json`` at start-up:

========================  ====================================================================
phase at the crash        what the restart does
========================  ====================================================================
download                  abandon the update (a partial download is kept for a retry)
staging, selftest         abandon: delete the half-made or untested slot; the old model serves
health (crash)            roll back to the restore point: health was not proven
health (clean stop)       ``resume`` was set by the shutdown: continue with a fresh window
none                      serve ``active``; if it fails to load, serve ``previous`` (recorded)
========================  ====================================================================

A kill between any two steps lands on one of these rows, so every restart after a crash ends
with exactly one committed model (or none, on a device that never committed one) and no update
in flight.
"""

from __future__ import annotations

import errno
import itertools
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from device_agent.config import AgentConfig, HealthConfig
from device_agent.errors import (
    AgentError,
    ModelLoadError,
    NothingToRollBack,
    SelfTestFailed,
    StateError,
    UpdateInProgress,
    UpdateRefused,
)
from device_agent.events import EventLog, EventType
from device_agent.metrics import Metrics
from device_agent.runtime.base import Runtime
from device_agent.selftest import SelfTestReport, run_selftest
from device_agent.store import Pending, Phase, State, Store
from edgekit._version import __version__
from edgekit.bundle import GOLDEN_NAME
from edgekit.errors import VerificationError
from edgekit.manifest import Manifest
from edgekit.trust import load_trust
from edgekit.verify import DeviceProfile, verify_bundle

__all__ = [
    "HealthReport",
    "HealthWindow",
    "ModelHandle",
    "ModelHost",
    "Outcome",
    "UpdateManager",
    "UpdateResult",
    "device_profile",
    "recovered_state",
]

logger = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class Outcome(str, Enum):
    """How an update ended (or where it waits)."""

    COMMITTED = "committed"
    PENDING = "health-check"  # serving; the health window is still open
    REFUSED = "refused"  # never served; nothing changed
    ROLLED_BACK = "rolled-back"  # served, then replaced by the model from before


@dataclass(frozen=True)
class HealthReport:
    """What the health window saw of the new model."""

    inferences: int
    errors: int
    rejected: int
    p95_ms: float | None
    seconds: float
    passed: bool
    reason: str | None = None
    message: str = ""

    @property
    def error_rate(self) -> float:
        return self.errors / self.inferences if self.inferences else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "inferences": self.inferences,
            "errors": self.errors,
            "rejected": self.rejected,
            "error_rate": round(self.error_rate, 6),
            "p95_ms": None if self.p95_ms is None else round(self.p95_ms, 3),
            "seconds": round(self.seconds, 3),
            "passed": self.passed,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass(frozen=True)
class UpdateResult:
    """The answer to an install, a health evaluation or a rollback."""

    outcome: Outcome
    message: str
    name: str | None = None
    version: int | None = None
    slot: str | None = None
    reason: str | None = None
    stage: str | None = None
    selftest: SelfTestReport | None = None
    health: HealthReport | None = None

    @property
    def ok(self) -> bool:
        """True when the new model serves (committed, or on probation)."""
        return self.outcome in (Outcome.COMMITTED, Outcome.PENDING)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome.value,
            "ok": self.ok,
            "message": self.message,
            "name": self.name,
            "version": self.version,
            "slot": self.slot,
            "reason": self.reason,
            "stage": self.stage,
            "selftest": None if self.selftest is None else self.selftest.to_dict(),
            "health": None if self.health is None else self.health.to_dict(),
        }


class HealthWindow:
    """Counts the new model's requests after activation and judges them.

    Its own :class:`Metrics` (not the agent's cumulative ones) so that the old model's
    traffic, and requests still finishing on the old model after the swap, do not count.
    """

    def __init__(
        self, config: HealthConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.metrics = Metrics()
        self._clock = clock
        self.started = clock()
        self._full = threading.Event()  # min_inferences reached
        self._wake = threading.Event()  # full, or cancelled: wakes a waiter
        self._cancelled = False
        self._count = itertools.count(1)

    def observe(self, seconds: float, *, ok: bool) -> None:
        self.metrics.observe(seconds, ok=ok)
        # itertools.count is atomic under the GIL: no second lock on the request path.
        if next(self._count) >= self.config.min_inferences:
            self._full.set()
            self._wake.set()

    def reject(self) -> None:
        self.metrics.reject()

    @property
    def elapsed(self) -> float:
        return self._clock() - self.started

    @property
    def remaining(self) -> float:
        return max(0.0, self.config.max_seconds - self.elapsed)

    def decided(self) -> bool:
        return self._full.is_set() or self.remaining <= 0

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the window can be judged (or ``timeout``, or :meth:`cancel`)."""
        limit = self.remaining if timeout is None else min(timeout, self.remaining)
        self._wake.wait(limit)
        return self.decided() and not self._cancelled

    def cancel(self) -> None:
        """Wake a waiter (the agent is shutting down)."""
        self._cancelled = True
        self._wake.set()

    def judge(self, *, final: bool = False) -> HealthReport | None:
        """The verdict once the window is full or expired (or now, if ``final``)."""
        if not (final or self.decided()):
            return None
        snap = self.metrics.snapshot()
        cfg = self.config
        elapsed = self.elapsed

        def verdict(passed: bool, message: str, reason: str | None = None) -> HealthReport:
            return HealthReport(
                inferences=snap.inferences,
                errors=snap.errors,
                rejected=snap.rejected_inputs,
                p95_ms=snap.p95_ms,
                seconds=elapsed,
                passed=passed,
                reason=reason,
                message=message,
            )

        if snap.inferences == 0:
            if cfg.on_timeout == "rollback":
                return verdict(
                    False,
                    f"no inference reached the new model in {elapsed:.0f} s "
                    "(health.on_timeout = rollback)",
                    "health-no-traffic",
                )
            return verdict(True, "no traffic in the window; committed on timeout")
        if snap.error_rate > cfg.max_error_rate:
            return verdict(
                False,
                f"{snap.errors} of {snap.inferences} inferences failed "
                f"(error rate {snap.error_rate:.3f} > {cfg.max_error_rate:g})",
                "health-errors",
            )
        if cfg.max_p95_ms is not None and snap.p95_ms is not None and snap.p95_ms > cfg.max_p95_ms:
            return verdict(
                False,
                f"p95 latency {snap.p95_ms:.3g} ms > {cfg.max_p95_ms:g} ms over "
                f"{snap.inferences} inferences",
                "health-latency",
            )
        p95 = "n/a" if snap.p95_ms is None else f"{snap.p95_ms:.3g} ms"
        return verdict(True, f"{snap.inferences} inferences, {snap.errors} errors, p95 {p95}")


class ModelHandle(Protocol):
    """A loaded model as the serving side holds it."""

    slot: str
    manifest: Manifest
    runtime: Runtime
    window: HealthWindow | None


class ModelHost(Protocol):
    """What the update machine needs from the serving side (the :class:`Agent`)."""

    def load(self, slot: str, manifest: Manifest) -> ModelHandle:
        """Open the slot's model (not serving yet); raise an AgentError if it cannot."""
        ...

    def serve(
        self, handle: ModelHandle | None, *, window: HealthWindow | None = None
    ) -> ModelHandle | None:
        """Atomically make ``handle`` the serving model; return the one it replaced."""
        ...

    def release(self, handle: ModelHandle | None) -> None:
        """Close ``handle`` once no request uses it any more."""
        ...

    @property
    def serving(self) -> ModelHandle | None: ...


def recovered_state(state: State) -> tuple[State, str | None]:
    """The state a restart moves to from ``state``, and what it did (None: nothing).

    Pure, so that read-only users (``edgekit-agent predict``) serve exactly what the service
    would after a crash, without writing anything.
    """
    pending = state.pending
    if pending is None:
        return state, None
    if pending.phase is Phase.HEALTH and pending.resume:
        return state, None  # the health window continues (see UpdateManager.boot)
    if pending.phase is Phase.HEALTH:
        restored = replace(
            state,
            active=pending.restore_active,
            previous=pending.restore_previous,
            pending=None,
        )
        return restored, "rolled-back"
    return replace(state, pending=None), "abandoned"


class _RuntimeVersions(Mapping[str, str]):
    """Runtime name → library version, probed only for the runtime a bundle asks for.

    A device with only ``tensorflow`` as its TFLite library would otherwise import it (seconds,
    hundreds of MB) to install an ONNX bundle.
    """

    _NAMES = ("onnxruntime", "tflite")

    def __getitem__(self, name: str) -> str:
        version = _probe_runtime(name) if name in self._NAMES else None
        if version is None:
            raise KeyError(name)
        return version

    def __iter__(self) -> Iterator[str]:
        return iter([name for name in self._NAMES if _probe_runtime(name) is not None])

    def __len__(self) -> int:
        return len(list(iter(self)))


@cache
def _probe_runtime(name: str) -> str | None:
    try:
        if name == "onnxruntime":
            import onnxruntime

            return str(onnxruntime.__version__)
        from device_agent.runtime.tflite import interpreter_classes

        for _cls, _library, version in interpreter_classes():
            return version
    except Exception as exc:  # a broken install is "not available", with the reason logged
        logger.warning("runtime %s is not usable: %s", name, exc)
    return None


def device_profile(config: AgentConfig) -> DeviceProfile:
    """What this device offers to the bundle compatibility check."""
    return DeviceProfile(
        architecture=config.architecture or platform.machine(),
        agent_version=__version__,
        runtimes=_RuntimeVersions(),
    )


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class UpdateManager:
    """Owns the persisted state and every transition of it.

    All transitions happen under one lock; :meth:`install` additionally holds the update lock
    for its whole run, so there is at most one update at a time. ``events`` None means
    read-only: nothing is written (``edgekit-agent predict`` next to a stopped service).
    """

    def __init__(
        self,
        *,
        store: Store,
        config: AgentConfig,
        host: ModelHost,
        events: EventLog | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.config = config
        self.host = host
        self.events = events
        self._clock = clock
        self._lock = threading.RLock()
        self._update_lock = threading.Lock()
        self._state = store.load()
        self._window: HealthWindow | None = None
        self._retained: ModelHandle | None = None  # the pre-update model, kept warm
        self._selftest: SelfTestReport | None = None  # of the update in its health window
        self._closing = False
        #: Why the device is not serving its active slot (boot fallback), or None.
        self.fallback: dict[str, Any] | None = None
        self.last_result: UpdateResult | None = None

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        return self._state

    @property
    def window(self) -> HealthWindow | None:
        return self._window

    @property
    def readonly(self) -> bool:
        return self.events is None

    def _save(self, state: State) -> None:
        if self.readonly:
            raise StateError("this agent was opened read-only")
        self.store.save(state)
        self._state = state

    def _event(self, kind: EventType, **fields: Any) -> None:
        if self.events is not None:
            self.events.append(kind, **fields)

    def _collect(self) -> None:
        for slot in self.store.collect_garbage(self._state):
            self._event(EventType.SLOT_REMOVED, slot=slot)

    # ------------------------------------------------------------------ start-up

    def recover(self) -> None:
        """Resolve an update a crash left unfinished (the table in the module docstring)."""
        with self._lock:
            before = self._state
            after, action = recovered_state(before)
            pending = before.pending
            if action is None or pending is None:
                if not self.readonly:
                    self._collect()
                return
            if self.readonly:
                self._state = after
                return
            self._save(after)
            if action == "rolled-back":
                self._event(
                    EventType.ROLLED_BACK,
                    bundle=pending.name,
                    version=pending.version,
                    slot=pending.slot,
                    reason="interrupted",
                    message="the agent stopped without a clean shutdown during the health "
                    "window; health was not proven",
                )
            else:
                self._event(
                    EventType.RECOVERED,
                    bundle=pending.name,
                    version=pending.version,
                    slot=pending.slot,
                    reason="interrupted",
                    phase=pending.phase.value,
                    message=f"the agent stopped during the {pending.phase.value} phase; the "
                    "update was abandoned",
                )
            self._collect()

    def boot(self) -> None:
        """Load and serve the committed model (or continue a handed-over health window)."""
        with self._lock:
            pending = self._state.pending
            if pending is not None and pending.phase is Phase.HEALTH and pending.resume:
                self._resume(pending)
                return
            self._boot_committed()

    def _resume(self, pending: Pending) -> None:
        try:
            handle = self._open(pending.slot)
        except (AgentError, VerificationError) as exc:
            reason = getattr(exc, "reason", "model-load")
            restored = replace(
                self._state,
                active=pending.restore_active,
                previous=pending.restore_previous,
                pending=None,
            )
            if self.readonly:
                self._state = restored
                self._boot_committed()
                return
            self._save(restored)
            self._event(
                EventType.ROLLED_BACK,
                bundle=pending.name,
                version=pending.version,
                slot=pending.slot,
                reason=reason,
                message=f"the new model failed to load at restart: {exc}",
            )
            self._collect()
            self._boot_committed()
            return
        if self.readonly:
            self.host.serve(handle)
            return
        window = HealthWindow(self.config.health, clock=self._clock)
        self._save(replace(self._state, pending=replace(pending, resume=False)))
        self._window = window
        self.host.serve(handle, window=window)
        self._event(
            EventType.HEALTH_RESUMED,
            bundle=pending.name,
            version=pending.version,
            slot=pending.slot,
            message="a clean restart continues the health window from the start",
        )

    def _open(self, slot: str) -> ModelHandle:
        manifest = self.store.read_manifest(slot)
        if self.config.verify_on_boot:
            self.store.check_files(slot, manifest)
        return self.host.load(slot, manifest)

    def _boot_committed(self) -> None:
        state = self._state
        candidates = [s for s in dict.fromkeys((state.active, state.previous)) if s is not None]
        failures: list[tuple[str, str, str]] = []
        for slot in candidates:
            try:
                handle = self._open(slot)
            except (AgentError, VerificationError, OSError) as exc:
                reason = str(getattr(exc, "reason", "io-error"))
                failures.append((slot, reason, str(exc)))
                logger.error("cannot serve slot %s: %s", slot, exc)
                continue
            self.host.serve(handle)
            if failures:
                failed, reason, message = failures[0]
                self.fallback = {"slot": failed, "reason": reason, "message": message}
                self._event(
                    EventType.BOOT_FALLBACK,
                    bundle=handle.manifest.name,
                    version=handle.manifest.version,
                    slot=slot,
                    failed_slot=failed,
                    reason=reason,
                    message=f"active slot {failed} cannot be served ({message}); serving "
                    f"the previous model",
                )
            return
        if failures:
            failed, reason, message = failures[0]
            self.fallback = {"slot": failed, "reason": reason, "message": message}
            self._event(
                EventType.BOOT_FAILED,
                slot=failed,
                reason=reason,
                message=f"no installed model can be served: {'; '.join(f[2] for f in failures)}",
            )

    # ------------------------------------------------------------------ install

    def install(
        self,
        source: str | Path,
        *,
        wait_for_health: bool = True,
        timeout: float | None = None,
        sha256: str | None = None,
        size: int | None = None,
    ) -> UpdateResult:
        """Run an update from a bundle file or URL; see the module docstring.

        Returns an :class:`UpdateResult` for every outcome of the update itself; raises
        :class:`UpdateInProgress` when another update runs or waits for its health window.
        With ``wait_for_health`` the call returns when the window is decided (or ``timeout``);
        otherwise it returns :attr:`Outcome.PENDING` right after activation and
        :meth:`evaluate` decides later.
        """
        if self.readonly:
            raise StateError("this agent was opened read-only; it cannot install")
        if not self._update_lock.acquire(blocking=False):
            raise UpdateInProgress("another update is running")
        try:
            with self._lock:
                pending = self._state.pending
                if pending is not None:
                    raise UpdateInProgress(
                        f"the update to {pending.name} v{pending.version} is in its "
                        f"{pending.phase.value} phase; wait for it to commit or roll it back"
                    )
                if self._closing:
                    raise UpdateInProgress("the agent is shutting down")
            result = self._run_update(str(source), sha256=sha256, size=size)
            if result.outcome is Outcome.PENDING and wait_for_health:
                result = self.wait_for_health(timeout)
            return result
        finally:
            self._update_lock.release()

    def _run_update(self, source: str, *, sha256: str | None, size: int | None) -> UpdateResult:
        slot = self.store.new_slot_id()
        pending = Pending(phase=Phase.STAGING, slot=slot, source=source, started=_now())
        with self._lock:
            if _is_url(source):
                pending = replace(pending, phase=Phase.DOWNLOAD)
            self._save(replace(self._state, pending=pending))
        self._event(EventType.UPDATE_STARTED, slot=slot, source=source)
        downloaded: Path | None = None
        try:
            if _is_url(source):
                try:
                    downloaded = self._download(source, sha256=sha256, size=size)
                except UpdateRefused as exc:
                    return self._refuse(pending, stage="download", error=exc)
                with self._lock:
                    pending = replace(pending, phase=Phase.STAGING)
                    self._save(replace(self._state, pending=pending))
            return self._stage(pending, downloaded or Path(source))
        except StateError as exc:  # state.json cannot be written (disk full, read-only fs)
            return self._refuse(pending, stage="state", error=exc)
        finally:
            if downloaded is not None:
                self.store.clear_downloads()

    def _download(self, url: str, *, sha256: str | None, size: int | None) -> Path:
        try:
            from device_agent.download import download
        except ImportError:
            raise UpdateRefused(
                "this agent has no downloader (device_agent.download); copy the bundle to the "
                "device and install the file",
                reason="no-downloader",
            ) from None
        if sha256 is None or size is None:
            # The download is checked against them before the verifier reads a byte: without
            # them a hostile server could stream endless data into the state directory.
            raise UpdateRefused(
                "installing from a URL needs the bundle's sha256 and size", reason="bad-request"
            )
        # Named by digest: a retry of the same bundle resumes the partial file.
        dest = self.store.downloads_dir / f"{sha256.lower()[:32]}.ekb"
        try:
            download(url, dest, sha256=sha256, size=size, timeout=60.0)
        except AgentError as exc:
            raise UpdateRefused(exc.message, reason=exc.reason) from None
        except ValueError as exc:
            raise UpdateRefused(str(exc), reason="bad-request") from None
        except OSError as exc:
            raise UpdateRefused(f"download failed: {exc}", reason=_io_reason(exc)) from None
        return dest

    def _stage(self, pending: Pending, bundle: Path) -> UpdateResult:
        slot = pending.slot
        try:
            trust = load_trust(self.config.trust_path).policy
            verified = verify_bundle(
                bundle,
                trust,
                installed_version=self._state.installed_version,
                device=device_profile(self.config),
                install_to=self.store.slot_dir(slot),
            )
        except VerificationError as exc:
            return self._refuse(pending, stage="verify", error=exc)
        except OSError as exc:
            refused = UpdateRefused(
                f"cannot stage the bundle: {exc.strerror or exc}", reason=_io_reason(exc)
            )
            return self._refuse(pending, stage="staging", error=refused)
        manifest = verified.manifest
        with self._lock:
            pending = replace(
                pending, phase=Phase.SELFTEST, name=manifest.name, version=manifest.version
            )
            self._save(replace(self._state, pending=pending))
        self._event(
            EventType.STAGED,
            bundle=manifest.name,
            version=manifest.version,
            slot=slot,
            signed_by=list(verified.signed_by),
        )
        try:
            handle = self.host.load(slot, manifest)
        except AgentError as exc:
            return self._refuse(pending, stage="load", error=exc)
        except Exception as exc:  # an adapter bug must not leave the update half-done
            broken = ModelLoadError(f"loading the model failed: {type(exc).__name__}: {exc}")
            return self._refuse(pending, stage="load", error=broken)
        try:
            golden = self.store.slot_dir(slot) / GOLDEN_NAME
            report = run_selftest(
                handle.runtime,
                golden if GOLDEN_NAME in manifest.files else None,
                require=self.config.require_golden,
            )
        except (SelfTestFailed, AgentError) as exc:
            self.host.release(handle)
            return self._refuse(pending, stage="selftest", error=exc)
        except Exception as exc:  # a runtime that breaks in an unforeseen way is refused too
            self.host.release(handle)
            failed = SelfTestFailed(f"self-test crashed: {type(exc).__name__}: {exc}")
            return self._refuse(pending, stage="selftest", error=failed)
        self._event(
            EventType.SELFTEST_SKIPPED if report.skipped else EventType.SELFTEST_PASSED,
            bundle=manifest.name,
            version=manifest.version,
            slot=slot,
            message=report.summary(),
        )
        return self._activate(pending, handle, report)

    def _refuse(self, pending: Pending, *, stage: str, error: Exception) -> UpdateResult:
        reason = str(getattr(error, "reason", "error"))
        message = str(error)
        with self._lock:
            cleared = replace(self._state, pending=None)
            try:
                self._save(cleared)
            except StateError as exc:
                # state.json still names the unfinished update: the next start abandons it,
                # which is where this process is going too.
                logger.error("cannot record the refused update: %s", exc)
                self._state = cleared
            self.store.remove_slot(pending.slot)
        self._event(
            EventType.UPDATE_REFUSED,
            bundle=pending.name,
            version=pending.version,
            slot=pending.slot,
            reason=reason,
            message=message,
            stage=stage,
        )
        result = UpdateResult(
            outcome=Outcome.REFUSED,
            message=message,
            name=pending.name,
            version=pending.version,
            reason=reason,
            stage=stage,
        )
        with self._lock:
            self.last_result = result
        return result

    def _activate(
        self, pending: Pending, handle: ModelHandle, report: SelfTestReport
    ) -> UpdateResult:
        with self._lock:
            state = self._state
            serving = self.host.serving
            from_slot = serving.slot if serving is not None else None
            pending = replace(
                pending,
                phase=Phase.HEALTH,
                restore_active=state.active,
                restore_previous=state.previous,
                from_slot=from_slot,
            )
            try:
                self._save(replace(state, active=pending.slot, previous=from_slot, pending=pending))
            except StateError:
                self.host.release(handle)
                raise
            window = HealthWindow(self.config.health, clock=self._clock)
            self._window = window
            self._selftest = report
            result = UpdateResult(
                outcome=Outcome.PENDING,
                message=f"{pending.name} v{pending.version} is serving; health window open",
                name=pending.name,
                version=pending.version,
                slot=pending.slot,
                selftest=report,
            )
            self.last_result = result
            self._retained = self.host.serve(handle, window=window)
        self._event(
            EventType.ACTIVATED,
            bundle=pending.name,
            version=pending.version,
            slot=pending.slot,
            replaced=from_slot,
            message=f"serving; health window: {self.config.health.min_inferences} inferences "
            f"or {self.config.health.max_seconds:g} s",
        )
        return result

    # ------------------------------------------------------------------ health window

    def wait_for_health(self, timeout: float | None = None) -> UpdateResult:
        """Block until the open health window is decided, then commit or roll back."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            window = self._window
            if window is None:
                break
            left = None if deadline is None else deadline - self._clock()
            if left is not None and left <= 0:
                break
            if window.wait(left) or self._closing:
                break
        result = self.evaluate()
        if result is not None:
            return result
        with self._lock:
            pending, last = self._state.pending, self.last_result
        if pending is None and last is not None:
            return last  # another thread (the service loop, a rollback) decided it first
        return UpdateResult(
            outcome=Outcome.PENDING,
            message="the health window is still open",
            name=pending.name if pending else None,
            version=pending.version if pending else None,
            slot=pending.slot if pending else None,
        )

    def evaluate(self, *, final: bool = False) -> UpdateResult | None:
        """Commit or roll back if the health window is decided (now, with ``final``).

        Returns None while the window is still open or when no update is pending. Safe to
        call from any thread and repeatedly (the service loop polls it).
        """
        with self._lock:
            pending, window = self._state.pending, self._window
            if pending is None or pending.phase is not Phase.HEALTH or window is None:
                return None
            report = window.judge(final=final)
            if report is None:
                return None
            if report.passed:
                result = self._commit(pending, report)
            else:
                assert report.reason is not None
                result = self._roll_back_update(pending, report.reason, report.message, report)
            # Under the lock: a waiting install() reads it as soon as it can take the lock.
            self.last_result = result
        return result

    def _commit(self, pending: Pending, report: HealthReport) -> UpdateResult:
        assert pending.version is not None
        state = replace(
            self._state, active=pending.slot, previous=pending.from_slot, pending=None
        ).with_floor(pending.version)
        self._save(state)
        self._end_window()
        self.fallback = None  # the active slot serves again
        retained, self._retained = self._retained, None
        self.host.release(retained)
        self._event(
            EventType.COMMITTED,
            bundle=pending.name,
            version=pending.version,
            slot=pending.slot,
            message=report.message,
            health=report.to_dict(),
        )
        self._collect()
        return UpdateResult(
            outcome=Outcome.COMMITTED,
            message=f"{pending.name} v{pending.version} committed: {report.message}",
            name=pending.name,
            version=pending.version,
            slot=pending.slot,
            selftest=self._selftest,
            health=report,
        )

    def _roll_back_update(
        self, pending: Pending, reason: str, message: str, report: HealthReport | None
    ) -> UpdateResult:
        state = replace(
            self._state,
            active=pending.restore_active,
            previous=pending.restore_previous,
            pending=None,
        )
        self._save(state)
        self._end_window()
        restore = self._retained
        self._retained = None
        if restore is None and pending.from_slot is not None:
            try:  # after a resumed window the old model is not loaded yet
                restore = self._open(pending.from_slot)
            except (AgentError, VerificationError) as exc:
                logger.error("cannot load slot %s to roll back to: %s", pending.from_slot, exc)
        failed = self.host.serve(restore)
        self.host.release(failed)
        self._event(
            EventType.ROLLED_BACK,
            bundle=pending.name,
            version=pending.version,
            slot=pending.slot,
            restored=pending.from_slot,
            reason=reason,
            message=message,
            health=None if report is None else report.to_dict(),
        )
        self._collect()
        return UpdateResult(
            outcome=Outcome.ROLLED_BACK,
            message=f"{pending.name} v{pending.version} rolled back: {message}",
            name=pending.name,
            version=pending.version,
            slot=pending.slot,
            reason=reason,
            stage="health",
            selftest=self._selftest,
            health=report,
        )

    def _end_window(self) -> None:
        serving = self.host.serving
        if serving is not None:
            serving.window = None
        if self._window is not None:
            self._window.cancel()  # wakes an install() waiting on it
        self._window = None

    # ------------------------------------------------------------------ rollback

    def rollback(self, reason: str = "manual", *, message: str | None = None) -> UpdateResult:
        """Go back to the model before the current one.

        During a health window this aborts the update. Otherwise the previous committed slot
        becomes active again (the anti-rollback floor stays where it is: this is a local
        decision, not a new bundle) and the abandoned slot is deleted.
        """
        if self.readonly:
            raise StateError("this agent was opened read-only; it cannot roll back")
        text = message or f"rollback requested ({reason})"
        with self._lock:
            pending = self._state.pending
            if pending is not None and pending.phase is Phase.HEALTH:
                result = self._roll_back_update(pending, reason, text, None)
                self.last_result = result
                return result
            if pending is not None:
                raise UpdateInProgress(
                    f"an update is in its {pending.phase.value} phase; it has not replaced "
                    "the model yet"
                )
            state = self._state
            if state.previous is None:
                raise NothingToRollBack("there is no previous model to roll back to")
            target = state.previous
            try:
                handle = self._open(target)
            except VerificationError as exc:
                raise ModelLoadError(f"cannot roll back to slot {target}: {exc}") from None
            abandoned = self.host.serving
            self._save(replace(state, active=target, previous=None))
            self.fallback = None
            old = self.host.serve(handle)
            self.host.release(old)
            self._event(
                EventType.ROLLED_BACK,
                bundle=handle.manifest.name,
                version=handle.manifest.version,
                slot=target,
                abandoned=abandoned.slot if abandoned else state.active,
                reason=reason,
                message=text,
            )
            self._collect()
            result = UpdateResult(
                outcome=Outcome.ROLLED_BACK,
                message=f"serving {handle.manifest.name} v{handle.manifest.version} again: {text}",
                name=handle.manifest.name,
                version=handle.manifest.version,
                slot=target,
                reason=reason,
            )
            self.last_result = result
            return result

    # ------------------------------------------------------------------ shutdown

    def shutdown(self, *, timeout: float = 30.0) -> None:
        """A clean stop: an open health window is handed over to the next start."""
        self._closing = True
        window = self._window
        if window is not None:
            window.cancel()
        got = self._update_lock.acquire(timeout=timeout)
        try:
            with self._lock:
                pending = self._state.pending
                if not self.readonly and pending is not None and pending.phase is Phase.HEALTH:
                    self._save(replace(self._state, pending=replace(pending, resume=True)))
                retained, self._retained = self._retained, None
                self.host.release(retained)
                self._window = None
        finally:
            if got:
                self._update_lock.release()


def _io_reason(exc: OSError) -> str:
    return "disk-full" if exc.errno in _DISK_FULL else "io-error"
