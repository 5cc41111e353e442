"""The server itself: where it may listen, concurrency, connection limits, stop, serve()."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from http_helpers import FEATURES, connect

from device_agent.http_api import HttpApi, serve
from device_agent.runtime import Runtime


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.com", ""])
def test_non_loopback_hosts_are_refused(service: Any, host: str) -> None:
    with pytest.raises(ValueError, match="allow_remote=True"):
        HttpApi(service, host=host, port=0)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost"])
def test_loopback_hosts_are_accepted(service: Any, start_api: Any, host: str) -> None:
    api = start_api(service, host=host)
    assert connect(api).get("/v1/health").status == 200


def test_all_interfaces_when_explicitly_allowed(service: Any, start_api: Any) -> None:
    api = start_api(service, host="0.0.0.0", allow_remote=True)
    host, port = api.address
    assert host == "0.0.0.0" and port > 0


def test_port_in_use_fails_at_start(service: Any, start_api: Any) -> None:
    first = start_api(service)
    with pytest.raises(OSError):
        HttpApi(service, port=first.address[1]).start()


@pytest.mark.parametrize(
    "options",
    [{"port": 70000}, {"port": True}, {"max_body_bytes": 0}, {"max_connections": -1},
     {"request_timeout": 0}],
)  # fmt: skip
def test_invalid_options_are_refused(service: Any, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        HttpApi(service, **options)


def test_start_twice_is_an_error(api: HttpApi) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        api.start()


def test_server_header_does_not_advertise_python(api: HttpApi) -> None:
    reply = connect(api).get("/v1/health")
    assert reply.headers["Server"] == "edgekit-agent"


def test_eight_threads_fifty_requests_each(api: HttpApi, reference: Runtime) -> None:
    failures: list[str] = []
    counts = [0] * 8

    def worker(index: int) -> None:
        client = connect(api)
        rng = np.random.default_rng(index)
        try:
            for _ in range(50):
                x = rng.standard_normal((2, FEATURES)).astype(np.float32)
                if index % 2:
                    reply = client.predict_npy(x)
                    got = reply.array() if reply.status == 200 else None
                else:
                    reply = client.predict_json({"inputs": x.tolist()})
                    got = np.asarray(reply.json()["outputs"]["probabilities"], np.float32)
                want = reference.predict(x)["probabilities"]
                if reply.status != 200 or got is None or not np.array_equal(got, want):
                    failures.append(f"thread {index}: {reply.status} {reply.body[:200]!r}")
                counts[index] += 1
        except Exception as exc:
            failures.append(f"thread {index}: {exc!r}")
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures[:5]
    assert counts == [50] * 8
    assert api.service.metrics.snapshot().inferences == 400


def test_connection_limit_answers_503_busy(service: Any, start_api: Any) -> None:
    api = start_api(service, max_connections=2)
    held = [connect(api), connect(api)]
    for client in held:
        assert client.get("/v1/health").status == 200  # both admitted and kept open
    third = connect(api)
    reply = third.get("/v1/health")
    assert reply.status == 503
    assert reply.json()["error"]["reason"] == "busy"
    held[0].close()
    deadline = time.monotonic() + 5
    while api.open_connections > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert connect(api).get("/v1/health").status == 200


def test_stop_ends_idle_keep_alive_connections_promptly(service: Any) -> None:
    api = HttpApi(service, port=0, request_timeout=60.0).start()
    clients = [connect(api) for _ in range(3)]
    for client in clients:
        assert client.get("/v1/health").status == 200
    assert api.open_connections == 3
    address = api.address
    start = time.monotonic()
    api.stop()
    assert time.monotonic() - start < 2.0  # not the 60 s idle timeout
    assert api.open_connections == 0
    sock = clients[0].connection.sock
    assert sock is not None and sock.recv(1) == b""  # the server closed it
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1).close()


def test_stop_lets_an_in_flight_request_finish(service: Any) -> None:
    api = HttpApi(service, port=0).start()
    client = connect(api)
    entered, release = threading.Event(), threading.Event()
    real_predict = service.predict

    def slow_predict(inputs: Any) -> Any:
        entered.set()
        release.wait(5)
        return real_predict(inputs)

    service.predict = slow_predict
    replies: list[Any] = []
    caller = threading.Thread(
        target=lambda: replies.append(client.predict_json({"inputs": [[0.0] * FEATURES]}))
    )
    caller.start()
    assert entered.wait(5)
    stopper = threading.Thread(target=api.stop)
    stopper.start()
    time.sleep(0.1)
    release.set()
    caller.join(5)
    stopper.join(5)
    assert replies and replies[0].status == 200
    assert replies[0].headers["Connection"] == "close"


def test_context_manager_starts_and_stops(service: Any) -> None:
    with HttpApi(service, port=0) as api:
        assert api.running
        assert connect(api).get("/v1/health").status == 200
    assert not api.running


def test_serve_reads_a_mapping(service: Any) -> None:
    api = serve(service, {"host": "127.0.0.1", "port": 0, "max_body_bytes": 1024})
    try:
        assert api.max_body_bytes == 1024
        assert connect(api).get("/v1/health").status == 200
    finally:
        api.stop()


def test_serve_reads_the_http_section_of_an_object(service: Any, tmp_path: Path) -> None:
    config = SimpleNamespace(
        http=SimpleNamespace(unix_socket=tmp_path / "a.sock", port=None), mqtt=object()
    )
    api = serve(service, config)
    try:
        assert api.address == str(tmp_path / "a.sock")
        assert connect(api).get("/v1/health").status == 200
    finally:
        api.stop()


def test_serve_overrides_win(service: Any) -> None:
    api = serve(service, {"http": {"port": 1}}, port=0, request_timeout=3.0)
    try:
        assert api.address[1] != 1 and api.request_timeout == 3.0
    finally:
        api.stop()


def test_serve_refuses_unknown_options(service: Any) -> None:
    with pytest.raises(ValueError, match="'unix_sock'"):
        serve(service, {"http": {"unix_sock": "/run/agent.sock"}})


def test_serve_takes_the_agent_config_dataclass(service: Any, tmp_path: Path) -> None:
    from device_agent.config import HttpConfig

    api = serve(service, HttpConfig(unix_socket=tmp_path / "agent.sock", request_timeout=5.0))
    try:
        assert api.address == str(tmp_path / "agent.sock")
        assert api.request_timeout == 5.0 and api.max_body_bytes == 16 * 1024 * 1024
        assert connect(api).get("/v1/health").status == 200
    finally:
        api.stop()
    with pytest.raises(ValueError, match="disabled"):
        serve(service, HttpConfig(enabled=False))
    with pytest.raises(ValueError, match="disabled"):
        serve(service, {"http": {"enabled": False}})


def test_model_info_is_not_asked_on_every_prediction(client: Any, service: Any) -> None:
    """The Agent's model_info() reads manifests from disk: predictions reuse a recent answer."""
    calls = []
    real = service.model_info

    def counting() -> Any:
        calls.append(1)
        return real()

    service.model_info = counting
    for _ in range(20):
        reply = client.predict_json({"inputs": [[0.0] * FEATURES]})
        assert reply.json()["model"] == {"name": "tiny", "version": "1.0.0"}
    assert len(calls) <= 1
    service.version = "2.0.0"  # a swap: /v1/model shows it, and predictions follow at once
    assert client.get("/v1/model").json()["version"] == "2.0.0"
    reply = client.predict_json({"inputs": [[0.0] * FEATURES]})
    assert reply.json()["model"]["version"] == "2.0.0"
