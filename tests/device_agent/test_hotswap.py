"""Hot swap: updates and rollbacks under concurrent traffic fail no request."""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import pytest

from device_agent.errors import InferenceError
from device_agent.updates import Outcome


def test_swaps_under_concurrent_requests_fail_zero_requests(kit):
    agent = kit.agent(kit.config(min_inferences=40))
    kit.commit(agent, kit.bundle(1, "m1"))
    expected = {name: kit.expected(name) for name in ("m1", "m2", "m3")}
    stop = threading.Event()
    errors: list[BaseException] = []
    served: dict[str, int] = {name: 0 for name in expected}
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                out = agent.predict(kit.x)["probabilities"]
            except BaseException as exc:  # any failure is a test failure
                errors.append(exc)
                return
            which = [n for n, ref in expected.items() if np.allclose(out, ref, rtol=1e-6)]
            with lock:
                if len(which) != 1:
                    errors.append(AssertionError("an output matches no installed model"))
                    return
                served[which[0]] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        # Traffic from the clients closes each health window.
        assert agent.install(kit.bundle(2, "m2"), timeout=60).outcome is Outcome.COMMITTED
        assert agent.install(kit.bundle(3, "m3"), timeout=60).outcome is Outcome.COMMITTED
        assert agent.rollback("swap back under load").outcome is Outcome.ROLLED_BACK
        before = sum(served.values())
        while sum(served.values()) < before + 50 and not errors:
            stop.wait(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert all(count > 0 for count in served.values()), served
    assert agent.model_info()["version"] == 2
    assert agent.metrics.snapshot().errors == 0
    assert len(agent._open) == 1  # every replaced model was closed once idle


def test_request_in_flight_during_swap_finishes_on_the_old_model(kit):
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    in_flight = agent._acquire()  # a request that has taken the model and is still running
    kit.commit(agent, kit.bundle(2, "m2"))
    assert not in_flight.closed
    np.testing.assert_allclose(
        in_flight.runtime.predict(kit.x)["probabilities"], kit.expected("m1"), rtol=1e-6
    )
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m2"))
    agent._release(in_flight)  # the last user returns: now the old model is closed
    assert in_flight.closed
    with pytest.raises(InferenceError):
        in_flight.runtime.predict(kit.x)


def test_rapid_swaps_never_run_a_request_on_a_closed_model(kit):
    """150 pointer swaps under four request threads, with the GIL switching threads as often
    as it can: no request fails or runs on a closed model ("the onnxruntime session is
    closed"), every replaced model is closed, and every request is counted once. (The race
    itself is forced deterministically in the next test; this one is the soak.)"""
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    serving = agent.serving
    assert serving is not None
    expected = kit.expected("m1")
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0] * 4

    def client(index: int) -> None:
        while not stop.is_set():
            try:
                out = agent.predict(kit.x)["probabilities"]
            except BaseException as exc:  # any failure is a test failure
                errors.append(exc)
                return
            if not np.allclose(out, expected, rtol=1e-6):
                errors.append(AssertionError("wrong output"))
                return
            done[index] += 1

    retired = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(150):
            fresh = agent.load(serving.slot, serving.manifest)
            old = agent.serve(fresh)
            agent.release(old)
            retired.append(old)
            if errors:
                break
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []
    assert min(done) > 0, done
    assert all(handle.closed and handle.refs == 0 for handle in retired)
    assert agent._open == {agent.serving}
    snap = agent.metrics.snapshot()
    assert (snap.errors, snap.rejected_inputs) == (0, 0)
    # Every request counted once: the commit's health-window traffic, then the clients'.
    assert snap.inferences == agent.config.health.min_inferences + sum(done)


def test_swap_between_reading_the_pointer_and_taking_the_reference(kit):
    """The one interleaving the lock-free reference must survive, forced: a request has read
    the serving pointer but not yet added itself to the model's ``inflight`` when a swap
    replaces and closes that model. The request must notice and run on the new model."""
    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1"))
    first = agent.serving
    assert first is not None
    at_append, resume = threading.Event(), threading.Event()
    outcome: list[object] = []

    def pause_before_taking_the_reference(frame: Any, event: str, arg: Any) -> None:
        # The first C call Agent.predict makes is ``handle.inflight.append``.
        if event == "c_call" and getattr(arg, "__self__", None) is first.inflight:
            sys.setprofile(None)
            at_append.set()
            resume.wait(10)

    def request() -> None:
        sys.setprofile(pause_before_taking_the_reference)
        try:
            outcome.append(agent.predict(kit.x)["probabilities"])
        except BaseException as exc:
            outcome.append(exc)
        finally:
            sys.setprofile(None)

    thread = threading.Thread(target=request)
    thread.start()
    assert at_append.wait(10)
    second = agent.load(first.slot, first.manifest)
    agent.release(agent.serve(second))
    assert first.closed  # no request held it: closed at once
    resume.set()
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], np.ndarray), outcome
    np.testing.assert_allclose(outcome[0], kit.expected("m1"), rtol=1e-6)
    assert first.refs == 0 and second.refs == 0
    assert agent.metrics.snapshot().errors == 0
