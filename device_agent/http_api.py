"""The agent's local HTTP API: predictions, health, model information and metrics.

Built on the standard library's :mod:`http.server` (plus NumPy for arrays) rather than a web
framework: a device has no room for a framework's dependency tree, and an API that listens on
loopback or a Unix socket for a handful of local clients needs none of its features. What it
does need is done here on purpose:

* **Local by default.** TCP listens on ``127.0.0.1``; any non-loopback address (``0.0.0.0``
  included) is refused unless ``allow_remote=True``, because the API has no authentication.
  A Unix socket (mode ``0660``) lets file permissions decide who may call it.
* **Bounded work per request.** ``Content-Length`` is required and checked against
  ``max_body_bytes`` before a byte of the body is read; ``.npy``/``.npz`` headers are checked
  against the bytes actually present before any array is allocated; pickled (object) arrays
  are never loaded; idle and slow connections time out; open connections are capped.
* **Keep-alive.** HTTP/1.1 with a ``Content-Length`` on every response and Nagle disabled, so a
  client that reuses its connection pays well under a millisecond per request.
* **One error shape.** Every refusal is ``{"error": {"reason", "message"}}`` with a stable
  ``reason`` and a one-line message naming the problem; tracebacks go to the log only.

The API talks to the agent only through :class:`~device_agent.service.InferenceService`.
The endpoints, formats and status codes are documented in ``docs/http-api.md``.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import ipaddress
import json
import logging
import math
import os
import re
import selectors
import socket
import socketserver
import stat
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import numpy.typing as npt

from device_agent.errors import AgentError, InputError, NoModel
from device_agent.service import InferenceService

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_TIMEOUT",
    "JSON_TYPE",
    "NPY_TYPE",
    "NPZ_TYPE",
    "PROMETHEUS_TYPE",
    "HttpApi",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
#: 16 MiB: a batch of ~80 float32 224x224x3 images. The same bound applies to the array data
#: decoded from a body, so a compressed ``.npz`` cannot inflate past it.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Each connection holds a thread; local clients need few, and a leaking client must not be
#: able to exhaust a small device's memory with idle threads.
DEFAULT_MAX_CONNECTIONS = 32
#: Seconds a connection may stay idle between requests, or stall while sending one.
DEFAULT_REQUEST_TIMEOUT = 30.0
#: Owner and group may connect to the Unix socket; others may not.
DEFAULT_SOCKET_MODE = 0o660

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"
NPZ_TYPE = "application/x-npz"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PREDICT_PATH = "/v1/predict"
_FORMATS = {JSON_TYPE: "json", NPY_TYPE: "npy", NPZ_TYPE: "npz"}
_PREDICT_QUERY = frozenset({"output"})
_NPY_MAGIC = b"\x93NUMPY"
#: NumPy's own bound on an .npy header (``max_header_size``): a longer one is not an array.
_MAX_NPY_HEADER = 10_000
# The limits http.client applies to header lines and their number.
_MAX_LINE = 65536
_MAX_HEADERS = 100
# A header name (RFC 9110 token): no spaces, so no " Content-Length" or "Content-Length :".
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Seconds a model name/version from ``model_info()`` is reused for prediction responses.
_MODEL_REF_TTL = 1.0
# Unread bodies up to this size are read and dropped to keep the connection; larger ones close it.
_DRAIN_LIMIT = 64 * 1024

Array = npt.NDArray[Any]
Inputs = Mapping[str, Array] | Array


# ------------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class _Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


class _HttpError(Exception):
    """A refusal decided by the HTTP layer; becomes an error response, never a traceback.

    ``rejected`` says whether it counts as a rejected input in the service's metrics (every
    refusal of a predict request does, except those decided after the model ran); ``close``
    ends the connection after the response (the request's framing cannot be trusted).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        rejected: bool = True,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.response = replace(_error(status, reason, message, headers=headers), close=close)
        self.rejected = rejected


def _error(
    status: int, reason: str, message: str, *, headers: tuple[tuple[str, str], ...] = ()
) -> _Response:
    error = {"reason": reason, "message": " ".join(message.split())}
    body = json.dumps({"error": error}, separators=(",", ":"))
    return _Response(status, JSON_TYPE, body.encode(), headers)


def _json(status: int, document: Any) -> _Response:
    return _Response(status, JSON_TYPE, _ENCODER.encode(document).encode())


def _json_default(value: Any) -> Any:
    """JSON for what services put into info dicts and outputs besides plain Python values."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def _agent_error(exc: AgentError) -> _Response:
    """The status for an error the service raised on purpose."""
    if isinstance(exc, InputError):
        status = HTTPStatus.BAD_REQUEST
    elif isinstance(exc, NoModel):
        status = HTTPStatus.SERVICE_UNAVAILABLE
    else:  # InferenceError and anything else the agent could not do
        status = HTTPStatus.INTERNAL_SERVER_ERROR
    return _error(status, exc.reason, exc.message)


def _header_value(value: object) -> str:
    """A header-safe rendering of a model name or version (no CR/LF injection, ASCII only)."""
    return quote(str(value), safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


# ------------------------------------------------------------------------------ array codecs


def _inputs_from_json(body: bytes | bytearray) -> Inputs:
    """``{"inputs": {name: nested list}}`` or ``{"inputs": nested list}`` (single input).

    A bare ``{name: list}`` is refused rather than guessed at: top-level keys are the
    request's fields, and an input named like a future field would silently change meaning.
    """
    try:
        document = json.loads(body)
    except RecursionError:
        raise _HttpError(400, "invalid-json", "the JSON body is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _HttpError(400, "invalid-json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _HttpError(
            400,
            "bad-input",
            f'the JSON body must be an object {{"inputs": ...}}, got {_json_kind(document)}',
        )
    unknown = sorted(set(document) - {"inputs"})
    if unknown:
        raise _HttpError(
            400,
            "bad-input",
            f"unknown field(s) {', '.join(map(repr, unknown))} in the JSON body; put the "
            'model inputs under "inputs": {"inputs": {"name": [...]}}',
        )
    if "inputs" not in document:
        raise _HttpError(400, "bad-input", 'the JSON body has no "inputs" field')
    inputs = document["inputs"]
    if isinstance(inputs, dict):
        return {name: _json_array(f"input {name!r}", value) for name, value in inputs.items()}
    if isinstance(inputs, list):
        return _json_array('"inputs"', inputs)
    raise _HttpError(
        400,
        "bad-input",
        '"inputs" must be an object mapping input names to nested lists, or a nested list '
        f"for a single-input model; got {_json_kind(inputs)}",
    )


def _json_array(what: str, value: Any) -> Array:
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise _HttpError(
            400, "bad-input", f"{what}: not a rectangular array of numbers ({exc})"
        ) from None


def _json_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else f"a {type(value).__name__}"


def _load_npy(data: bytes | bytearray, what: str, *, limit: int) -> Array:
    """Decode one ``.npy`` array: a view of ``data`` once its header is checked.

    The header is read by NumPy's own parser and must describe exactly the bytes that follow:
    ``np.lib.format.read_array`` would allocate whatever a header declares before reading, so
    a 100-byte body could ask for terabytes. Object dtypes are refused before any data is
    looked at, so nothing is ever unpickled (what ``allow_pickle=False`` guarantees, enforced
    here without handing the bytes to a loader that has a pickle path at all). The array is a
    view of ``data`` (writable when ``data`` is a bytearray): no copy on the hot path.
    """
    try:
        start = _npy_prefix_length(data)
        shape, fortran, dtype = _npy_header(bytes(data[:start]))
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise _HttpError(400, "invalid-npy", f"{what}: not a valid .npy array ({exc})") from None
    if dtype.hasobject:
        raise _HttpError(
            400,
            "invalid-npy",
            f"{what}: object arrays are refused (loading them needs pickle); send numbers",
        )
    count = math.prod(shape)
    declared = count * dtype.itemsize
    if declared > limit:
        raise _HttpError(
            413,
            "body-too-large",
            f"{what}: a {list(shape)} {dtype} array takes {declared} bytes, over the limit of "
            f"{limit} bytes",
        )
    present = len(data) - start
    if present != declared:
        raise _HttpError(
            400,
            "invalid-npy",
            f"{what}: the header declares a {list(shape)} {dtype} array ({declared} bytes) "
            f"but {present} bytes of data follow",
        )
    try:
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    except ValueError as exc:  # e.g. a zero-size item type
        raise _HttpError(400, "invalid-npy", f"{what}: cannot be decoded ({exc})") from None
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def _npy_prefix_length(data: bytes | bytearray) -> int:
    """Bytes taken by the magic string, version, header length and header of an ``.npy``."""
    if len(data) < 10 or data[:6] != _NPY_MAGIC:
        raise ValueError("no .npy magic string")
    version = bytes(data[6:8])
    if version == b"\x01\x00":
        head, size = 10, int.from_bytes(data[8:10], "little")
    elif version == b"\x02\x00":
        head, size = 12, int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"format version {data[6]}.{data[7]} is not supported")
    if size > _MAX_NPY_HEADER or head + size > len(data):
        raise ValueError(f"a header of {size} bytes is too long or truncated")
    return head + size


@functools.lru_cache(maxsize=64)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, fortran_order, dtype) of an ``.npy`` prefix, by NumPy's parser.

    Cached: a client sends the same header with every request, and parsing it (an
    ``ast.literal_eval``) costs tens of microseconds, a large share of a small model's latency.
    """
    stream = io.BytesIO(prefix)
    if np.lib.format.read_magic(stream) == (1, 0):
        header = np.lib.format.read_array_header_1_0(stream)
    else:
        header = np.lib.format.read_array_header_2_0(stream)
    shape, fortran, dtype = header
    return tuple(shape), bool(fortran), dtype


def _load_npz(data: bytes | bytearray, *, limit: int) -> dict[str, Array]:
    """One array per ``NAME.npy`` member; ``limit`` bounds the arrays' total decoded size.

    Only stored and deflated members are read: ``zipfile`` caps their output at the size
    their header declares (a lying header fails the CRC), so the total is known up front.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise _HttpError(400, "invalid-npz", f"the body is not a valid .npz file ({exc})") from None
    with archive:
        members = archive.infolist()
        if not members:
            raise _HttpError(400, "invalid-npz", "the .npz body holds no arrays")
        total = sum(info.file_size for info in members)
        if total > limit:
            raise _HttpError(
                413,
                "body-too-large",
                f"the .npz arrays take {total} bytes decoded, over the limit of {limit} bytes",
            )
        arrays: dict[str, Array] = {}
        for info in members:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise _HttpError(
                    400, "invalid-npz", f"member {info.filename!r} is not a NAME.npy array"
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _HttpError(
                    400,
                    "invalid-npz",
                    f"member {info.filename!r}: only stored or deflated members are accepted "
                    "(numpy.savez / numpy.savez_compressed)",
                )
            name = info.filename[: -len(".npy")]
            if name in arrays:
                raise _HttpError(400, "invalid-npz", f"array {name!r} appears twice")
            try:
                member = bytearray(archive.read(info))  # writable arrays, like the .npy path
            except (zipfile.BadZipFile, zlib.error, RuntimeError, EOFError, OSError) as exc:
                raise _HttpError(
                    400, "invalid-npz", f"member {info.filename!r} cannot be read ({exc})"
                ) from None
            arrays[name] = _load_npy(member, f"array {name!r}", limit=limit)
    return arrays


def _plain(value: Array) -> Array:
    """An array ``.npy`` can hold without pickle (string outputs come as object arrays)."""
    return value.astype(np.str_) if value.dtype.hasobject else value


def _npy_bytes(value: Array) -> bytes:
    value = _plain(value)
    descr = np.lib.format.dtype_to_descr(value.dtype)
    if not isinstance(descr, str):  # a structured dtype: rare, not worth the cache
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, value, allow_pickle=False)
        return buffer.getvalue()
    return _npy_prefix(descr, value.shape) + np.ascontiguousarray(value).tobytes()


@functools.lru_cache(maxsize=64)
def _npy_prefix(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header for a C-order array (cached: outputs keep their shape)."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _npz_bytes(outputs: Mapping[str, Array]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, value in outputs.items():
            archive.writestr(f"{name}.npy", _npy_bytes(value))
    return buffer.getvalue()


# --------------------------------------------------------------------------------- handler


class _Handler(BaseHTTPRequestHandler):
    """One connection; requests on it are served in order (HTTP/1.1 keep-alive)."""

    api: ClassVar[HttpApi]
    protocol_version = "HTTP/1.1"
    server_version = "edgekit-agent"
    # Headers and body leave in one write (flushed by _send), and Nagle is off on TCP: without
    # both, a keep-alive client can wait for a delayed ACK (40 ms) on every request.
    wbufsize = 64 * 1024
    raw_requestline: bytes  # set by handle_one_request
    _date: ClassVar[tuple[int, str]] = (0, "")  # (second, its Date header)
    _body_read = False

    def setup(self) -> None:
        super().setup()
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # Every method goes through one dispatcher, so that a known path with the wrong method is
    # a 405 rather than the 501 BaseHTTPRequestHandler gives methods it has no do_X for.
    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        self._body_read = False
        url = urlsplit(self.path)
        try:
            response = self._route(url.path)(self, parse_qs(url.query, keep_blank_values=True))
        except _HttpError as exc:
            if exc.rejected and url.path == PREDICT_PATH and self.command == "POST":
                self.api.service.metrics.reject()
            response = exc.response
        except AgentError as exc:
            response = _agent_error(exc)
        except Exception:
            logger.exception("unexpected error serving %s %s", self.command, url.path)
            response = _error(500, "internal", "internal error; the agent's log has the details")
        self._send(response)

    def _route(self, path: str) -> Callable[[_Handler, dict[str, list[str]]], _Response]:
        route = _ROUTES.get(path)
        if route is None:
            known = ", ".join(sorted(_ROUTES))
            raise _HttpError(404, "not-found", f"no endpoint {path!r}; the API has {known}")
        methods, endpoint = route
        if self.command not in methods:
            allowed = ", ".join(sorted(methods))
            raise _HttpError(
                405,
                "method-not-allowed",
                f"{path} does not accept {self.command}; use {allowed}",
                headers=(("Allow", allowed),),
            )
        return endpoint

    # ------------------------------------------------------------------------- endpoints

    def _predict(self, query: dict[str, list[str]]) -> _Response:
        unknown = sorted(set(query) - _PREDICT_QUERY)
        if unknown:
            raise _HttpError(
                400, "bad-request", f"unknown query parameter(s) {', '.join(map(repr, unknown))}"
            )
        wanted = query.get("output", [])
        fmt = self._body_format()
        if fmt == "npy" and len(wanted) > 1:
            raise _HttpError(
                400, "bad-request", "a .npy response holds one array; ask for one output"
            )
        body = self._read_body()
        limit = self.api.max_body_bytes
        inputs: Inputs
        if fmt == "json":
            inputs = _inputs_from_json(body)
        elif fmt == "npy":
            inputs = _load_npy(body, "the .npy body", limit=limit)
        else:
            inputs = _load_npz(body, limit=limit)
        start = time.perf_counter()
        outputs = self.api.service.predict(inputs)
        latency_ms = (time.perf_counter() - start) * 1000.0
        if fmt == "npy" and not wanted:
            wanted = list(outputs)[:1]  # the first output, in the model's order
        selected = _select(outputs, wanted)
        model = self.api.model_ref()
        if fmt == "json":
            return _json(
                200,
                {
                    "outputs": {name: value.tolist() for name, value in selected.items()},
                    "model": model,
                    "latency_ms": round(latency_ms, 3),
                },
            )
        headers = (
            ("X-Model-Name", _header_value(model["name"])),
            ("X-Model-Version", _header_value(model["version"])),
            ("X-Latency-Ms", f"{latency_ms:.3f}"),
        )
        if fmt == "npy":
            return _Response(200, NPY_TYPE, _npy_bytes(next(iter(selected.values()))), headers)
        return _Response(200, NPZ_TYPE, _npz_bytes(selected), headers)

    def _health(self, query: dict[str, list[str]]) -> _Response:
        health = self.api.service.health()
        return _json(200 if health.get("status") == "ok" else 503, health)

    def _model(self, query: dict[str, list[str]]) -> _Response:
        info = self.api.service.model_info()
        self.api.model_ref(info)  # fresh anyway: let predictions use it
        return _json(200, info)

    def _metrics(self, query: dict[str, list[str]]) -> _Response:
        text = self.api.service.metrics.render_prometheus(
            labels=self.api.metrics_labels,
            gauges={"edgekit_http_open_connections": float(self.api.open_connections)},
        )
        return _Response(200, PROMETHEUS_TYPE, text.encode())

    # ------------------------------------------------------------------ request plumbing

    def _body_format(self) -> str:
        raw = self.headers.get("Content-Type")
        if raw is None:
            return "json"
        media = raw.split(";", 1)[0].strip().lower()
        fmt = _FORMATS.get(media)
        if fmt is None:
            hint = ""
            if media == "application/x-www-form-urlencoded":
                hint = " (curl -d sends that; add -H 'Content-Type: application/json')"
            raise _HttpError(
                415,
                "unsupported-media-type",
                f"Content-Type {media!r} is not accepted{hint}; send {JSON_TYPE}, {NPY_TYPE} "
                f"or {NPZ_TYPE}",
            )
        return fmt

    def _content_length(self) -> int:
        """The declared body size, checked before anything is read."""
        if "Transfer-Encoding" in self.headers:
            raise _HttpError(
                411,
                "length-required",
                "chunked request bodies are not supported; send a Content-Length header",
                close=True,
            )
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _HttpError(
                411,
                "length-required",
                "the request has no Content-Length header; send one",
                close=True,
            )
        raw = values[0].strip()
        if len(values) > 1 or not raw.isdigit():
            raise _HttpError(
                400, "bad-request", f"invalid Content-Length {', '.join(values)!r}", close=True
            )
        length = int(raw)
        limit = self.api.max_body_bytes
        if length > limit:
            raise _HttpError(
                413,
                "body-too-large",
                f"the body is {length} bytes, over the limit of {limit} bytes; send smaller "
                "batches",
                close=True,
            )
        return length

    def _read_body(self) -> bytearray:
        length = self._content_length()
        if length == 0:
            raise _HttpError(
                400,
                "empty-body",
                "the request body is empty; send the inputs as JSON, .npy or .npz",
            )
        # A bytearray, so that arrays decoded from it are writable views, not copies.
        body = bytearray(length)
        view, received = memoryview(body), 0
        try:
            while received < length and (count := self.rfile.readinto(view[received:])):
                received += count
        except TimeoutError:
            raise _HttpError(
                408, "timeout", "timed out reading the request body", close=True
            ) from None
        if received != length:
            raise _HttpError(
                400,
                "bad-request",
                f"the body ended after {received} of {length} bytes",
                close=True,
            )
        self._body_read = True
        return body

    def _drain_body(self) -> bool:
        """Consume a small unread body (a 404 or 415 to a POST); False if bytes may remain.

        Leaving a body on the connection would make it read as the next request, and closing
        with unread bytes makes the kernel reset the connection, which can destroy the
        response before the client reads it: a small body is cheaper to read than to lose.
        """
        headers = getattr(self, "headers", None)
        if headers is None or "Transfer-Encoding" in headers:
            return False
        if self._body_read:
            return True
        values = headers.get_all("Content-Length") or []
        if not values:
            return True  # no body
        if len(values) > 1 or not values[0].strip().isdigit():
            return False
        length = int(values[0])
        if length > _DRAIN_LIMIT:
            return False
        try:
            self._body_read = len(self.rfile.read(length)) == length
        except OSError:
            return False
        return self._body_read

    def parse_request(self) -> bool:
        """Read the request line and headers, strictly, without the ``email`` package.

        ``BaseHTTPRequestHandler`` hands the headers to ``email.parser``: ~35 us a request, the
        largest cost of a small prediction after the socket itself. This keeps its protocol
        handling for HTTP/1.0 and 1.1 (keep-alive, ``Expect``, the ``//`` path fix) and builds
        the same ``HTTPMessage``, but refuses what it would tolerate: HTTP/0.9, folded
        (continuation) header lines and lines that are not ``Name: value``, which is where
        request smuggling hides.
        """
        self.command = ""
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if not words:
            return False
        if len(words) != 3 or words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            if len(words) == 3 and re.fullmatch(r"HTTP/\d+(\.\d+)?", words[2]):
                self.send_error(505, f"{words[2]} is not supported; use HTTP/1.1")
            else:
                self.send_error(400, f"malformed request line {self.requestline[:200]!r}")
            return False
        self.command, self.path, self.request_version = words
        if self.path.startswith("//"):  # gh-87389: "//host" would read as an authority
            self.path = "/" + self.path.lstrip("/")
        headers = http.client.HTTPMessage()
        for _ in range(_MAX_HEADERS + 1):
            line = self.rfile.readline(_MAX_LINE + 1)
            if len(line) > _MAX_LINE:
                self.send_error(431, f"a header line is longer than {_MAX_LINE} bytes")
                return False
            if line in (b"\r\n", b"\n", b""):
                break
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if not colon or not _TOKEN.fullmatch(name):
                self.send_error(400, f"malformed header line {line[:200]!r}")
                return False
            headers[name] = value.strip()
        else:
            self.send_error(431, f"more than {_MAX_HEADERS} header lines")
            return False
        self.headers = headers
        connection = headers.get("Connection", "").lower()
        keep_alive = self.request_version == "HTTP/1.1" or connection == "keep-alive"
        self.close_connection = connection == "close" or not keep_alive
        if (
            headers.get("Expect", "").lower() == "100-continue"
            and self.request_version >= "HTTP/1.1"
        ):
            return self.handle_expect_100()
        return True

    def handle_expect_100(self) -> bool:
        """Refuse a request that will be refused anyway before the client sends its body.

        curl sends ``Expect: 100-continue`` for bodies over 1 MiB; answering 413 here spares
        it the upload.
        """
        self._body_read = False
        try:
            self._route(urlsplit(self.path).path)
            if urlsplit(self.path).path == PREDICT_PATH:
                self._body_format()
                self._content_length()
        except _HttpError as exc:
            if exc.rejected and urlsplit(self.path).path == PREDICT_PATH:
                self.api.service.metrics.reject()
            self._send(replace(exc.response, close=True))  # the client holds its body back
            return False
        accepted = super().handle_expect_100()
        self.wfile.flush()  # the client waits for this line before it sends the body
        return accepted

    def _send(self, response: _Response) -> None:
        close = response.close or self.api.stopping or not self._drain_body()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in response.headers:
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")  # also sets self.close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by BaseHTTPRequestHandler itself, in this API's JSON shape."""
        status = HTTPStatus(code)
        reason = _PROTOCOL_REASONS.get(status, "bad-request")
        if not str(getattr(self, "request_version", "")).startswith("HTTP/1."):
            # An unparseable request line leaves HTTP/0.9, whose replies have no status line.
            self.request_version = self.protocol_version
        self._send(replace(_error(status, reason, message or status.phrase), close=True))

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header, formatted once a second rather than for every response."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        second, text = _Handler._date  # one tuple, replaced whole: safe across threads
        if second != now:
            text = super().date_time_string(now)
            _Handler._date = (now, text)
        return text

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def address_string(self) -> str:
        address = self.client_address
        return str(address[0]) if isinstance(address, tuple) and address else "unix-socket"

    def log_message(self, format: str, *args: Any) -> None:
        if logger.isEnabledFor(logging.DEBUG):  # called for every request: format lazily
            logger.debug("%s %s", self.address_string(), format % args)


_PROTOCOL_REASONS = {
    HTTPStatus.REQUEST_URI_TOO_LONG: "uri-too-long",
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: "headers-too-large",
    HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: "http-version",
    HTTPStatus.NOT_IMPLEMENTED: "method-not-allowed",
}

_ROUTES: dict[str, tuple[frozenset[str], Callable[[_Handler, dict[str, list[str]]], _Response]]] = {
    PREDICT_PATH: (frozenset({"POST"}), _Handler._predict),
    "/v1/health": (frozenset({"GET", "HEAD"}), _Handler._health),
    "/v1/model": (frozenset({"GET", "HEAD"}), _Handler._model),
    "/metrics": (frozenset({"GET", "HEAD"}), _Handler._metrics),
}


def _select(outputs: Mapping[str, Array], wanted: list[str]) -> dict[str, Array]:
    if not wanted:
        return dict(outputs)
    missing = [name for name in wanted if name not in outputs]
    if missing:
        known = ", ".join(map(repr, outputs))
        raise _HttpError(
            400,
            "unknown-output",
            f"unknown output(s) {', '.join(map(repr, missing))}; the model's outputs are {known}",
            rejected=False,
        )
    return {name: outputs[name] for name in wanted}


# --------------------------------------------------------------------------------- servers


class _ServerMixin(socketserver.BaseServer):
    """What both transports share: connection accounting, quiet error handling."""

    api: HttpApi
    daemon_threads = True
    # stop() ends connections itself; joining their threads in server_close() would wait for
    # idle keep-alive clients to time out.
    block_on_close = False
    request_queue_size = 64
    timeout = 0.0  # handle_request() is only called when a connection is waiting

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.api._admit(request):
            logger.warning(
                "refusing a connection: %d connections are open", self.api.max_connections
            )
            _send_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def close_request(self, request: Any) -> None:
        self.api._release(request)
        super().close_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-response are routine; anything else is a bug worth a trace.
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            logger.debug("HTTP connection ended: %s", error)
        else:
            logger.exception("unexpected error on an HTTP connection")


class _TcpServer(_ServerMixin, ThreadingHTTPServer):
    allow_reuse_address = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN: on an offline device that is a DNS
        # timeout at every start, for a name nothing here uses.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(_ServerMixin, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        super().server_bind()
        # Before listen(): nobody can connect while the file still has the umask's mode.
        assert self.api.unix_socket is not None
        os.chmod(self.api.unix_socket, self.api.socket_mode)


def _send_busy(request: socket.socket) -> None:
    response = _error(503, "busy", "too many open connections; retry later")
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        request.settimeout(1.0)
        request.sendall(head.encode() + response.body)
    except OSError:
        pass


def _check_host(host: str, allow_remote: bool) -> None:
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        what = "all interfaces" if host in ("0.0.0.0", "::", "") else f"{host!r}"
        raise ValueError(
            f"refusing to listen on {what}: the API has no authentication, so it listens on "
            "loopback or a Unix socket only; pass allow_remote=True to expose it"
        )


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a previous run; never a live socket or any other file."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a stale file
        return
    finally:
        probe.close()
    raise OSError(f"another process is serving on {path}")


# ------------------------------------------------------------------------------------- API


class HttpApi:
    """The HTTP front end of one :class:`InferenceService`; also a context manager.

    Listens on ``host:port`` (``port=0`` picks a free port; see :attr:`address`) or, when
    ``unix_socket`` is given, on that path instead. ``host`` must be a loopback address unless
    ``allow_remote`` is set. ``max_body_bytes`` bounds a request body and the arrays decoded
    from it; ``request_timeout`` bounds idle keep-alive time and stalled uploads;
    ``max_connections`` bounds open connections (one thread each). ``metrics_labels`` are added
    to every series on ``/metrics``.
    """

    def __init__(
        self,
        service: InferenceService,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        unix_socket: str | os.PathLike[str] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        allow_remote: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        socket_mode: int = DEFAULT_SOCKET_MODE,
        metrics_labels: Mapping[str, str] | None = None,
    ) -> None:
        if unix_socket is None:
            _check_host(host, allow_remote)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise ValueError(f"port must be an integer in 0..65535, got {port!r}")
        for name, value in (
            ("max_body_bytes", max_body_bytes),
            ("max_connections", max_connections),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {request_timeout!r}")
        self.service = service
        self.host = host
        self.port = port
        self.unix_socket = None if unix_socket is None else Path(unix_socket)
        self.max_body_bytes = max_body_bytes
        self.max_connections = max_connections
        self.request_timeout = float(request_timeout)
        self.socket_mode = socket_mode
        self.metrics_labels = dict(metrics_labels or {})
        self._server: _TcpServer | _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._socket_id: tuple[int, int] | None = None
        self._connections: set[socket.socket] = set()
        self._changed = threading.Condition()
        self._stopping = False
        self._wake = (-1, -1)
        self._model_ref: tuple[float, dict[str, Any]] = (0.0, {})
        self._model_ref_lock = threading.Lock()

    # ----------------------------------------------------------------------------- state

    @property
    def address(self) -> tuple[str, int] | str:
        """``(host, port)`` actually bound (the real port when ``port=0``), or the socket path."""
        if self.unix_socket is not None:
            return str(self.unix_socket)
        server = self._server
        if server is not None:
            host, port = server.socket.getsockname()[:2]
            return str(host), int(port)
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def stopping(self) -> bool:
        """True while :meth:`stop` runs: in-flight responses then close their connection."""
        return self._stopping

    @property
    def open_connections(self) -> int:
        with self._changed:
            return len(self._connections)

    def model_ref(self, info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{"name", "version"}`` of the serving model, for prediction responses.

        ``model_info()`` may be expensive (the Agent's reads the slots' manifests from disk),
        so it is asked at most once per ``_MODEL_REF_TTL`` seconds and the answer shared: a
        response may name the model that served up to that long before a swap. (Exact
        attribution is impossible through this protocol anyway: a swap can happen between
        ``predict`` and any later question.) ``info`` stores a fresh ``model_info()`` answer.
        A failure yields nulls: it must not lose an answer already computed.
        """
        now = time.monotonic()
        expires, ref = self._model_ref
        if info is None and now < expires:
            return ref
        with self._model_ref_lock:
            expires, ref = self._model_ref
            if info is None and now < expires:
                return ref  # another thread refreshed it meanwhile
            if info is None:
                try:
                    info = self.service.model_info()
                except Exception as exc:
                    logger.warning("model_info() failed: %s", exc)
                    info = {}
            ref = {"name": info.get("name"), "version": info.get("version")}
            self._model_ref = (time.monotonic() + _MODEL_REF_TTL, ref)
            return ref

    # ------------------------------------------------------------------------- lifecycle

    def start(self) -> HttpApi:
        """Bind and serve on a daemon thread; binding errors (port in use) raise here."""
        if self._server is not None:
            raise RuntimeError("the HTTP API is already running")
        handler = type("Handler", (_Handler,), {"api": self, "timeout": self.request_timeout})
        server: _TcpServer | _UnixServer
        if self.unix_socket is not None:
            _clear_stale_socket(self.unix_socket)
            server = _UnixServer(str(self.unix_socket), handler, bind_and_activate=False)
        else:
            cls = _Tcp6Server if ":" in self.host else _TcpServer
            server = cls((self.host, self.port), handler, bind_and_activate=False)
        server.api = self
        try:
            server.server_bind()
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        # Non-blocking accept: a connection reset between select() and accept() must not
        # block the loop (and stop()) until the next client arrives.
        server.socket.setblocking(False)
        if self.unix_socket is not None:
            info = self.unix_socket.stat()
            self._socket_id = (info.st_dev, info.st_ino)
        self._stopping = False
        self._server = server
        self._wake = os.pipe()
        self._thread = threading.Thread(
            target=self._serve, args=(server, self._wake[0]), name="http-api", daemon=True
        )
        self._thread.start()
        logger.info("HTTP API listening on %s", self.address)
        return self

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``timeout`` s), close the rest.

        Idle keep-alive connections are ended at once: their read side is shut down, so the
        thread waiting for a next request sees end-of-file, while a response being written
        still goes out. The Unix socket file is removed if it is still ours.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping = True
        os.write(self._wake[1], b"\0")
        thread.join()
        server.server_close()
        for fd in self._wake:
            os.close(fd)
        with self._changed:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RD)
            drained = self._changed.wait_for(lambda: not self._connections, timeout)
        if not drained:
            logger.warning(
                "HTTP API: %d connection(s) still open after stop", len(self._connections)
            )
        if self.unix_socket is not None and self._socket_id is not None:
            try:
                info = self.unix_socket.lstat()
                if (info.st_dev, info.st_ino) == self._socket_id:
                    self.unix_socket.unlink()
            except FileNotFoundError:
                pass
        self._server = self._thread = None
        self._socket_id = None
        logger.info("HTTP API stopped")

    def _serve(self, server: _TcpServer | _UnixServer, wake: int) -> None:
        """Accept connections until stop() writes to the wake pipe.

        Instead of ``serve_forever``, which polls for its shutdown flag (a wake-up every
        interval on an idle device, and a stop() that waits up to one interval).
        """
        with selectors.DefaultSelector() as selector:
            selector.register(server, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is server and not self._stopping:
                        server.handle_request()  # returns at once: timeout 0, and ready

    def __enter__(self) -> HttpApi:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------- connection accounting

    def _admit(self, connection: socket.socket) -> bool:
        with self._changed:
            if len(self._connections) >= self.max_connections or self._stopping:
                return False
            self._connections.add(connection)
            return True

    def _release(self, connection: socket.socket) -> None:
        with self._changed:
            self._connections.discard(connection)
            self._changed.notify_all()


#: Options ``serve`` reads from a configuration (a mapping or an object's attributes).
_CONFIG_FIELDS = (
    "host",
    "port",
    "unix_socket",
    "max_body_bytes",
    "allow_remote",
    "max_connections",
    "request_timeout",
    "socket_mode",
    "metrics_labels",
)


def serve(service: InferenceService, config: Any = None, /, **overrides: Any) -> HttpApi:
    """Start an :class:`HttpApi` for ``service`` configured from ``config`` and return it.

    ``config`` is a mapping or an object (a dataclass, a namespace) holding the fields of
    ``HttpApi`` (``host``, ``port``, ``unix_socket``, ...), either directly or in an ``http``
    member, so the agent's whole configuration can be passed as is. ``None`` values mean the
    default. In a mapping, unknown keys are refused (a typo must not silently open TCP instead
    of a socket). ``enabled = false`` raises ``ValueError`` rather than serving anyway.
    ``overrides`` win over ``config``. Works with ``device_agent.config.HttpConfig``.
    """
    options = {**_options_from(config), **overrides}
    return HttpApi(service, **options).start()


def _options_from(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        section = config.get("http", config)
    else:
        section = getattr(config, "http", config)
    if section is None:
        return {}
    if isinstance(section, Mapping):
        unknown = sorted(set(section) - {*_CONFIG_FIELDS, "enabled"})
        if unknown:
            raise ValueError(
                f"unknown HTTP option(s) {', '.join(map(repr, unknown))}; known: "
                f"enabled, {', '.join(_CONFIG_FIELDS)}"
            )
        enabled = section.get("enabled", True)
        values = {name: section.get(name) for name in _CONFIG_FIELDS}
    else:
        enabled = getattr(section, "enabled", True)
        values = {name: getattr(section, name, None) for name in _CONFIG_FIELDS}
    if enabled is False:
        raise ValueError("the HTTP API is disabled in this configuration (enabled = false)")
    return {name: value for name, value in values.items() if value is not None}
