"""The device agent: serves the committed model and applies verified, self-tested updates.

:class:`Agent` is the :class:`~device_agent.service.InferenceService` the front ends (HTTP API,
serial bridge, telemetry) talk to. It owns three things:

* the **serving pointer**: the loaded model every ``predict`` uses. Requests take a reference
  to the model without a lock and run with it, so a hot swap is one pointer assignment:
  requests already running finish on the old model, which is closed only when the last of them
  returns (reference counting), and no request ever sees a closed model (see
  :meth:`Agent.predict` for why no lock is needed);
* the **metrics** of every request (and, during a health window, of the new model's requests
  separately);
* the :class:`~device_agent.updates.UpdateManager`, which decides every change of model and
  persists it (see that module for the state machine and the crash-recovery rules).

Opening an agent locks the state directory, finishes whatever a crash left unfinished, removes
leftovers and loads the committed model; :meth:`Agent.close` hands an open health window over to
the next start. ``Agent(..., readonly=True)`` serves what the service would serve, writes
nothing and takes no lock (the ``predict`` command).
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from device_agent.config import AgentConfig
from device_agent.errors import AgentError, InferenceError, InputError, NoModel, StateError
from device_agent.events import EventLog, EventType
from device_agent.metrics import Metrics
from device_agent.runtime import load_runtime
from device_agent.runtime.base import Runtime
from device_agent.store import StateLock, Store
from device_agent.updates import HealthWindow, ModelHandle, UpdateManager, UpdateResult
from edgekit._version import __version__
from edgekit.manifest import Manifest

__all__ = ["Agent", "LoadedModel", "PredictObserver"]

logger = logging.getLogger(__name__)

#: How long :meth:`Agent.close` waits for running requests before closing models anyway.
DRAIN_TIMEOUT_S = 30.0

#: The request-latency clock, bound once (the attribute lookup is on every request).
_perf_counter = time.perf_counter
_FOLD_EVERY = Metrics.FOLD_EVERY


class PredictObserver(Protocol):
    """Samples successful requests (the fleet link's drift monitor; see
    :meth:`Agent.set_observer`)."""

    countdown: int
    """Requests until the next call. The agent decrements it on every successful request and
    calls the observer when it reaches zero; the observer sets the next countdown. So a
    request that is not sampled costs a decrement, not a function call."""

    def __call__(
        self, slot: str, inputs: Any, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> None:
        """One sampled request: the slot that served it, the request as given, the outputs."""
        ...


class LoadedModel:
    """One slot's model, loaded, with the requests currently using it.

    ``inflight`` holds one entry per running request: a deque because its ``append`` and
    ``pop`` are atomic under the GIL, so taking and returning a reference needs no lock.
    """

    __slots__ = (
        "close_when_idle",
        "closed",
        "inflight",
        "manifest",
        "runtime",
        "slot",
        "window",
    )

    def __init__(self, slot: str, manifest: Manifest, runtime: Runtime) -> None:
        self.slot = slot
        self.manifest = manifest
        self.runtime = runtime
        self.window: HealthWindow | None = None
        self.inflight: deque[None] = deque()
        self.close_when_idle = False
        self.closed = False

    @property
    def refs(self) -> int:
        """Requests running on this model now."""
        return len(self.inflight)

    def __repr__(self) -> str:
        return f"<LoadedModel {self.manifest.name} v{self.manifest.version} slot={self.slot}>"


class Agent:
    """The on-device inference service; thread-safe.

    ``state_dir`` overrides ``config.state_dir``. ``clock`` (monotonic seconds) drives the
    health window and exists for tests.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] | None = None,
        *,
        config: AgentConfig | None = None,
        readonly: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config = config or AgentConfig()
        if state_dir is not None:
            config = replace(config, state_dir=Path(state_dir))
        self.config = config
        self.readonly = readonly
        self.store = Store(config.state_dir)
        self._metrics = Metrics()
        self._intake = self._metrics.intake  # see predict()
        self._cond = threading.Condition()
        self._serving: LoadedModel | None = None
        self._open: set[LoadedModel] = set()
        self._closed = False
        self._observer: PredictObserver | None = None
        #: Exceptions the observer raised (swallowed: a request never fails because of it).
        self.observer_errors = 0
        self._lock: StateLock | None = None
        self.events: EventLog | None = None
        if not readonly:
            self.store.prepare()
            self._lock = self.store.lock()
        try:
            if not readonly:
                removed = self.store.remove_leftovers()
                if removed:
                    logger.info("removed %d leftovers of an interrupted write", len(removed))
                self.events = EventLog(
                    self.store.events_path,
                    max_bytes=config.events.max_bytes,
                    keep=config.events.keep,
                )
            self.updates = UpdateManager(
                store=self.store, config=config, host=self, events=self.events, clock=clock
            )
            self.updates.recover()
            self.updates.boot()
        except BaseException:
            self._release_resources()
            raise
        if self.events is not None:
            serving = self._serving
            self.events.append(
                EventType.AGENT_STARTED,
                bundle=serving.manifest.name if serving else None,
                version=serving.manifest.version if serving else None,
                slot=serving.slot if serving else None,
                agent_version=__version__,
                pid=os.getpid(),
            )

    # ------------------------------------------------------------------ InferenceService

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def predict(
        self, inputs: Mapping[str, npt.ArrayLike] | npt.ArrayLike
    ) -> dict[str, npt.NDArray[np.generic]]:
        """Run the serving model; see :class:`~device_agent.service.InferenceService`.

        The request takes a reference to the serving model without a lock: it appends to the
        model's ``inflight`` and then checks that the model still serves. A swap replaces the
        pointer first and closes the old model only if it then finds ``inflight`` empty (see
        :meth:`release`). Under the GIL these steps happen in some single order, so either the
        swap sees this request's reference (and leaves the closing to the request's release),
        or the request sees the new pointer (and drops the old model unused): a request never
        runs on a closed model, and in-flight requests finish on the old one. This path runs
        on every request, hence the inlined first attempt (:meth:`_acquire` is the loop).
        """
        handle = self._serving
        if handle is None:
            handle = self._acquire()  # raises NoModel
        else:
            handle.inflight.append(None)
            if self._serving is not handle:  # swapped between the read and the append
                self._release(handle)
                handle = self._acquire()
        window = handle.window
        started = _perf_counter()
        try:
            outputs = handle.runtime.predict(inputs)
        except InputError:
            self._metrics.reject()
            if window is not None:
                window.reject()
            raise
        except Exception as exc:
            elapsed = _perf_counter() - started
            self._metrics.observe(elapsed, ok=False)
            if window is not None:
                window.observe(elapsed, ok=False)
            if isinstance(exc, AgentError):
                raise
            # An adapter bug must still reach the caller as the documented error type.
            raise InferenceError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            inflight = handle.inflight
            inflight.pop()
            if handle.close_when_idle and not inflight:
                self._close_model(handle)
        elapsed = _perf_counter() - started
        # Metrics.observe(elapsed), inlined (a method call here costs ~0.45 µs: see Metrics).
        intake = self._intake
        intake.append(elapsed)
        if len(intake) >= _FOLD_EVERY:
            self._metrics.fold()
        if window is not None:
            window.observe(elapsed, ok=True)
        observer = self._observer
        if observer is not None:
            observer.countdown -= 1
            if observer.countdown <= 0:
                try:
                    observer(handle.slot, inputs, outputs)
                except Exception:
                    self.observer_errors += 1
        return outputs

    def set_observer(self, observer: PredictObserver | None) -> None:
        """Let ``observer`` sample successful requests (None removes it).

        This is how the fleet link samples inputs and outputs for drift scores without the
        agent knowing about drift. The agent counts requests down on ``observer.countdown``
        and calls the observer on the request thread when it reaches zero, after the outputs
        are computed (its time is not in the latency metrics but is in the caller's): it must
        be cheap, keep no lock for long and not mutate what it is given. Whatever it raises is
        counted in :attr:`observer_errors` and otherwise ignored; concurrent requests may lose
        a decrement, which only shifts the sampling slightly. One observer at a time: the
        fleet link is the only user.
        """
        self._observer = observer

    def health(self) -> dict[str, Any]:
        """``ok``: serving the committed model; ``degraded``: serving, but on the previous
        model after a failed boot, or with an error rate above the health bound;
        ``no-model``: nothing to serve."""
        serving = self._serving
        snap = self._metrics.snapshot()
        pending = self.updates.state.pending
        fallback = self.updates.fallback
        if serving is None:
            status = "no-model"
        elif fallback is not None or (
            snap.inferences >= self.config.health.min_inferences
            and snap.error_rate > self.config.health.max_error_rate
        ):
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "model": None
            if serving is None
            else {
                "name": serving.manifest.name,
                "version": serving.manifest.version,
                "slot": serving.slot,
            },
            "update": None if pending is None else pending.phase.value,
            "fallback": fallback,
            "inferences": snap.inferences,
            "errors": snap.errors,
            "rejected_inputs": snap.rejected_inputs,
            "error_rate": round(snap.error_rate, 6),
            "p95_ms": snap.p95_ms,
            "uptime_s": round(snap.uptime_s, 3),
        }

    def model_info(self) -> dict[str, Any]:
        """The serving model and the slots; name etc. are None when nothing serves."""
        serving = self._serving
        state = self.updates.state
        info: dict[str, Any] = {
            "name": None,
            "version": None,
            "display_version": None,
            "runtime": None,
            "runtime_version": None,
            "providers": [],
            "sha256": None,
            "model_file": None,
            "created": None,
            "inputs": [],
            "outputs": [],
            "slot": None,
        }
        if serving is not None:
            manifest, runtime = serving.manifest, serving.runtime
            info.update(
                name=manifest.name,
                version=manifest.version,
                display_version=manifest.display_version,
                runtime=manifest.runtime,
                runtime_version=runtime.version,
                providers=list(runtime.providers),
                sha256=manifest.files[manifest.model].sha256,
                model_file=manifest.model,
                created=manifest.created.isoformat().replace("+00:00", "Z"),
                inputs=[spec.to_dict() for spec in runtime.inputs],
                outputs=[spec.to_dict() for spec in runtime.outputs],
                slot=serving.slot,
            )
        info["slots"] = {
            "active": self.store.describe(state.active),
            "previous": self.store.describe(state.previous),
            "staging": self.store.describe(state.staging),
        }
        info["installed_version"] = state.installed_version
        info["pending"] = None if state.pending is None else state.pending.to_dict()
        return info

    # ------------------------------------------------------------------ updates

    def install(
        self,
        source: str | os.PathLike[str],
        *,
        wait_for_health: bool = True,
        timeout: float | None = None,
        sha256: str | None = None,
        size: int | None = None,
    ) -> UpdateResult:
        """Install a bundle file (or ``http(s)://`` URL); see :meth:`UpdateManager.install`."""
        self._check_open()
        return self.updates.install(
            os.fspath(source),
            wait_for_health=wait_for_health,
            timeout=timeout,
            sha256=sha256,
            size=size,
        )

    def evaluate_health(self, *, final: bool = False) -> UpdateResult | None:
        """Commit or roll back an update whose health window is decided (see ``install``)."""
        return self.updates.evaluate(final=final)

    def wait_for_health(self, timeout: float | None = None) -> UpdateResult:
        """Block until the open health window is decided, then commit or roll back."""
        return self.updates.wait_for_health(timeout)

    def rollback(self, reason: str = "manual", *, message: str | None = None) -> UpdateResult:
        """Go back to the previous model (aborts an update on probation)."""
        self._check_open()
        return self.updates.rollback(reason, message=message)

    def poll(self) -> UpdateResult | None:
        """Periodic housekeeping for the service loop: decide a finished health window."""
        return self.updates.evaluate()

    def status(self) -> dict[str, Any]:
        """Everything an operator asks first, JSON-ready."""
        state = self.updates.state
        window = self.updates.window
        last = self.updates.last_result
        return {
            "state_dir": str(self.store.root),
            "agent_version": __version__,
            "architecture": self.config.architecture or platform.machine(),
            "serving": None if self._serving is None else self._serving.slot,
            "active": self.store.describe(state.active),
            "previous": self.store.describe(state.previous),
            "staging": self.store.describe(state.staging),
            "installed_version": state.installed_version,
            "pending": None if state.pending is None else state.pending.to_dict(),
            "health_window": None
            if window is None
            else {
                "elapsed_s": round(window.elapsed, 3),
                "remaining_s": round(window.remaining, 3),
                "inferences": window.metrics.snapshot().inferences,
                "min_inferences": window.config.min_inferences,
            },
            "fallback": self.updates.fallback,
            "last_update": None if last is None else last.to_dict(),
            "health": self.health(),
        }

    # ------------------------------------------------------------------ ModelHost

    def load(self, slot: str, manifest: Manifest) -> ModelHandle:
        """Open ``slot``'s model with this device's runtime options (not serving yet)."""
        specs = [spec.to_dict() for spec in (*manifest.inputs, *manifest.outputs)]
        runtime = load_runtime(
            manifest.runtime,
            self.store.slot_dir(slot) / manifest.model,
            specs=specs,
            options=self.config.runtime.options(),
            manifest=manifest.to_dict(),
        )
        handle = LoadedModel(slot, manifest, runtime)
        with self._cond:
            self._open.add(handle)
        return handle

    def serve(
        self, handle: ModelHandle | None, *, window: HealthWindow | None = None
    ) -> ModelHandle | None:
        """Make ``handle`` the serving model: one pointer swap under the lock."""
        if handle is not None and not isinstance(handle, LoadedModel):
            raise TypeError("serve() takes a model this agent loaded")
        with self._cond:
            old = self._serving
            if handle is not None:
                handle.window = window
            self._serving = handle
        if handle is not None:
            logger.info("serving %s", handle)
        return old

    def release(self, handle: ModelHandle | None) -> None:
        """Close ``handle`` now if idle, else when its last running request returns."""
        if handle is None:
            return
        assert isinstance(handle, LoadedModel)
        with self._cond:
            if handle is self._serving:
                raise RuntimeError("cannot release the serving model")
            handle.close_when_idle = True
            idle = handle.refs == 0
        if idle:
            self._close_model(handle)

    @property
    def serving(self) -> ModelHandle | None:
        return self._serving

    def _acquire(self) -> LoadedModel:
        """Take a reference to the serving model (see :meth:`predict`); NoModel if none."""
        while True:
            handle = self._serving
            if handle is None:
                raise NoModel(self._why_no_model())
            handle.inflight.append(None)
            if self._serving is handle:
                return handle
            self._release(handle)  # swapped meanwhile: drop it (closing it if it is retired)

    def _why_no_model(self) -> str:
        if self._closed:
            return "the agent is closed"
        fallback = self.updates.fallback
        if fallback is not None:
            return f"no installed model can be loaded ({fallback['reason']}: {fallback['message']})"
        return "no model is installed"

    def _release(self, handle: LoadedModel) -> None:
        """Return a reference; the last one out closes a model that no longer serves."""
        inflight = handle.inflight
        inflight.pop()
        if handle.close_when_idle and not inflight:
            self._close_model(handle)

    def _close_model(self, handle: LoadedModel) -> None:
        """Close ``handle`` once (a request and a swap may both get here)."""
        with self._cond:
            if handle.closed:
                return
            handle.closed = True
            self._open.discard(handle)
            self._cond.notify_all()  # wakes close() waiting for running requests
        try:
            handle.runtime.close()
        except Exception as exc:  # closing must not take the service down
            logger.warning("closing %s failed: %s", handle, exc)

    # ------------------------------------------------------------------ lifecycle

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("the agent is closed")

    def close(self, *, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop serving, let running requests finish, hand over an open health window."""
        if self._closed:
            return
        self._closed = True
        try:
            self.updates.shutdown(timeout=timeout)
        finally:
            serving = self.serve(None)
            self.release(serving)
            deadline = time.monotonic() + timeout
            with self._cond:
                while any(h.refs for h in self._open) and time.monotonic() < deadline:
                    # Woken when a retired model closes; the timeout also covers a request
                    # finishing on a model that stays open (requests take no lock to signal).
                    self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                remaining = list(self._open)
            for handle in remaining:
                self._close_model(handle)
            if self.events is not None:
                self.events.append(EventType.AGENT_STOPPED, pid=os.getpid())
            self._release_resources()

    def _release_resources(self) -> None:
        if self.events is not None:
            self.events.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Agent {self.store.root} serving={self._serving!r}>"
