"""Clients for the HTTP API tests: keep-alive ``http.client``, Unix sockets, raw bytes.

Loaded by path by the conftest and registered as ``http_helpers`` (the suite runs with
``--import-mode=importlib``, so test-tree modules are not importable by their own name); the
test modules import it under that name.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.http_api import JSON_TYPE, NPY_TYPE, NPZ_TYPE, HttpApi

#: The tiny model: input float32 [batch, FEATURES] -> probabilities float32 [batch, CLASSES].
FEATURES, CLASSES = 16, 4


@dataclass(frozen=True)
class Models:
    tiny: Path  # input: float32 [batch, 16] -> probabilities: float32 [batch, 4]
    two_io: Path  # a: float32 [batch, 3], ids: int64 [batch] -> a_out = a + 1, ids_out = 2 ids


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        assert self.headers.get_content_type() == JSON_TYPE, self.headers
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, str]:
        document = self.json()
        assert set(document) == {"error"}, document
        assert set(document["error"]) == {"reason", "message"}, document
        assert "\n" not in document["error"]["message"]
        assert "Traceback" not in document["error"]["message"]
        return dict(document["error"])

    def array(self) -> np.ndarray:
        return np.load(io.BytesIO(self.body), allow_pickle=False)


class Client:
    """A keep-alive client: one connection, reopened by http.client when the server closes it."""

    def __init__(self, connection: http.client.HTTPConnection) -> None:
        self.connection = connection

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        return Reply(response.status, response.headers, response.read())

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def post(self, body: bytes, content_type: str | None, path: str = "/v1/predict") -> Reply:
        headers = {} if content_type is None else {"Content-Type": content_type}
        return self.request("POST", path, body, headers)

    def predict_json(self, document: Any, path: str = "/v1/predict") -> Reply:
        return self.post(json.dumps(document).encode(), JSON_TYPE, path)

    def predict_npy(self, array: np.ndarray, path: str = "/v1/predict") -> Reply:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return self.post(buffer.getvalue(), NPY_TYPE, path)

    def predict_npz(self, arrays: dict[str, np.ndarray], path: str = "/v1/predict") -> Reply:
        return self.post(npz_bytes(arrays), NPZ_TYPE, path)

    def close(self) -> None:
        self.connection.close()


def npz_bytes(arrays: dict[str, np.ndarray], *, compressed: bool = False) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix domain socket (what ``curl --unix-socket`` does)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def connect(api: HttpApi) -> Client:
    address = api.address
    if isinstance(address, str):
        return Client(UnixHTTPConnection(address))
    return Client(http.client.HTTPConnection(address[0], address[1], timeout=10.0))


def raw_exchange(api: HttpApi, data: bytes, *, timeout: float = 5.0) -> tuple[Reply, bool]:
    """Send ``data`` as is, read one response; also report whether the server then closed."""
    address = api.address
    assert isinstance(address, tuple)
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        response = http.client.HTTPResponse(sock)
        response.begin()
        reply = Reply(response.status, response.headers, response.read())
        sock.settimeout(1.0)
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        return reply, closed
