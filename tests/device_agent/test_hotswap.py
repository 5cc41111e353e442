"""Hot swap: updates and rollbacks under concurrent traffic fail no request."""

from __future__ import annotations

import threading

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
