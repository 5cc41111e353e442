"""The API on a Unix domain socket: same answers, file permissions, stale-file handling."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from http_helpers import FEATURES, connect

from device_agent.http_api import HttpApi
from device_agent.runtime import Runtime


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


def test_predictions_over_a_unix_socket(
    service: Any, start_api: Any, sock_path: Path, reference: Runtime
) -> None:
    api = start_api(service, unix_socket=sock_path)
    assert api.address == str(sock_path)
    client = connect(api)
    x = np.random.default_rng(3).standard_normal((4, FEATURES)).astype(np.float32)
    reply = client.predict_npy(x)
    assert reply.status == 200
    np.testing.assert_array_equal(reply.array(), reference.predict(x)["probabilities"])
    reply = client.predict_json({"inputs": {"input": x.tolist()}})
    got = np.asarray(reply.json()["outputs"]["probabilities"], np.float32)
    np.testing.assert_array_equal(got, reference.predict(x)["probabilities"])
    assert client.get("/v1/health").status == 200
    assert b"edgekit_inferences_total 2" in client.get("/metrics").body


def test_socket_file_mode_is_0660(service: Any, start_api: Any, sock_path: Path) -> None:
    start_api(service, unix_socket=sock_path)
    info = sock_path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o660


def test_stale_socket_file_is_replaced(service: Any, start_api: Any, sock_path: Path) -> None:
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(sock_path))
    leftover.close()  # the file stays behind, nobody listens: a crashed agent's socket
    assert sock_path.exists()
    api = start_api(service, unix_socket=sock_path)
    assert connect(api).get("/v1/health").status == 200


def test_live_socket_is_not_stolen(service: Any, start_api: Any, sock_path: Path) -> None:
    first = start_api(service, unix_socket=sock_path)
    with pytest.raises(OSError, match="another process is serving"):
        HttpApi(service, unix_socket=sock_path).start()
    assert connect(first).get("/v1/health").status == 200


def test_regular_file_is_not_replaced(service: Any, sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        HttpApi(service, unix_socket=sock_path).start()
    assert sock_path.read_text() == "precious"


def test_socket_file_is_removed_on_stop(service: Any, sock_path: Path) -> None:
    with HttpApi(service, unix_socket=sock_path):
        assert sock_path.exists()
    assert not sock_path.exists()
