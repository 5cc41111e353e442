"""Bad requests: each gets the right status and a one-line message naming the problem, is
counted as a rejected input, and the next good request is served as usual."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
import time
import zipfile
from typing import Any

import numpy as np
import pytest
from http_helpers import FEATURES, Client, connect, npz_bytes, raw_exchange
from http_runtime_service import RuntimeService

from device_agent.errors import InferenceError
from device_agent.http_api import JSON_TYPE, NPY_TYPE, NPZ_TYPE, HttpApi

GOOD = {"inputs": {"input": [[0.25] * FEATURES]}}


def npy(array: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def as_json(document: Any) -> bytes:
    return json.dumps(document).encode()


def assert_good_request_works(client: Client) -> None:
    reply = client.predict_json(GOOD)
    assert reply.status == 200, reply.body
    assert set(reply.json()["outputs"]) == {"probabilities"}


# (id, body, content type, status, reason, words the message must contain)
TINY_CASES = [
    ("wrong-shape", as_json({"inputs": {"input": [[1, 2, 3]]}}), JSON_TYPE, 400, "bad-input",
     ["'input'", "shape [batch, 16]", "[1, 3]"]),
    ("wrong-rank", as_json({"inputs": [0.5] * FEATURES}), JSON_TYPE, 400, "bad-input",
     ["'input'", "shape"]),
    ("wrong-dtype-strings", as_json({"inputs": {"input": [["a"] * FEATURES]}}), JSON_TYPE, 400,
     "bad-input", ["'input'", "float32", "<U1"]),
    ("wrong-dtype-null", as_json({"inputs": {"input": [[None] * FEATURES]}}), JSON_TYPE, 400,
     "bad-input", ["'input'", "objects"]),
    ("ragged", as_json({"inputs": {"input": [[1.0] * FEATURES, [1.0]]}}), JSON_TYPE, 400,
     "bad-input", ["'input'", "rectangular"]),
    ("unknown-input", as_json({"inputs": {"pixels": [[0.0] * FEATURES]}}), JSON_TYPE, 400,
     "bad-input", ["'pixels'", "'input'"]),
    ("bare-mapping", as_json({"input": [[0.0] * FEATURES]}), JSON_TYPE, 400, "bad-input",
     ["unknown field", "'input'", '"inputs"']),
    ("inputs-not-array", as_json({"inputs": "zeros"}), JSON_TYPE, 400, "bad-input",
     ['"inputs"', "a str"]),
    ("body-not-object", as_json([[0.0] * FEATURES]), JSON_TYPE, 400, "bad-input",
     ["object", "a list"]),
    ("no-inputs-field", as_json({}), JSON_TYPE, 400, "bad-input", ['no "inputs"']),
    ("invalid-json", b'{"inputs": [[1.0,', JSON_TYPE, 400, "invalid-json",
     ["not valid JSON", "line 1"]),
    ("invalid-utf8", b'{"inputs": "\xff\xfe"}', JSON_TYPE, 400, "invalid-json", ["JSON"]),
    ("nested-too-deep", b"[" * 200_000 + b"]" * 200_000, JSON_TYPE, 400, "invalid-json",
     ["nested too deeply"]),
    ("huge-integer", b'{"inputs": [[' + b"1" * 400 + b"]]}", JSON_TYPE, 400, "bad-input",
     ["'input'"]),
    ("empty-body", b"", JSON_TYPE, 400, "empty-body", ["empty"]),
    ("unknown-content-type", b"0.5,0.5", "text/csv", 415, "unsupported-media-type",
     ["'text/csv'", JSON_TYPE, NPY_TYPE]),
    ("form-urlencoded", b"inputs=1", "application/x-www-form-urlencoded", 415,
     "unsupported-media-type", ["curl -d", "Content-Type: application/json"]),
    ("npy-garbage", b"definitely not numpy", NPY_TYPE, 400, "invalid-npy", ["not a valid .npy"]),
    ("npy-truncated", npy(np.zeros((5, FEATURES), np.float32))[:-8], NPY_TYPE, 400, "invalid-npy",
     ["declares", "320 bytes", "312 bytes"]),
    ("npy-header-lies-huge", npy_header((10**12,)) + b"\0" * 64, NPY_TYPE, 413, "body-too-large",
     ["4000000000000 bytes", "limit"]),
    ("npy-complex", npy(np.zeros((1, FEATURES), np.complex64)), NPY_TYPE, 400, "bad-input",
     ["'input'", "complex64"]),
    ("npy-wrong-shape", npy(np.zeros((2, FEATURES + 1), np.float32)), NPY_TYPE, 400, "bad-input",
     ["'input'", "[2, 17]"]),
    ("npy-version-3", b"\x93NUMPY\x03\x00" + b"\0" * 32, NPY_TYPE, 400, "invalid-npy",
     ["version 3.0"]),
    ("npz-not-a-zip", b"PK\x03\x04 but not really", NPZ_TYPE, 400, "invalid-npz", [".npz"]),
    ("npz-empty", npz_bytes({}), NPZ_TYPE, 400, "invalid-npz", ["no arrays"]),
    ("npz-unknown-input", npz_bytes({"x": np.zeros((1, FEATURES))}), NPZ_TYPE, 400, "bad-input",
     ["'x'", "'input'"]),
    ("query-typo", None, JSON_TYPE, 400, "bad-request", ["'outptu'"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in TINY_CASES],
)
def test_bad_request_is_refused_and_the_next_one_served(
    client: Client, service: Any, body: bytes | None, content_type: str, status: int,
    reason: str, words: list[str],
) -> None:  # fmt: skip
    if body is None:  # the query-string case
        reply = client.post(as_json(GOOD), content_type, path="/v1/predict?outptu=x")
    else:
        reply = client.post(body, content_type)
    assert reply.status == status, reply.body
    error = reply.error
    assert error["reason"] == reason
    for word in words:
        assert word in error["message"], error["message"]
    assert service.metrics.snapshot().rejected_inputs == 1
    assert service.metrics.snapshot().inferences == 0
    assert_good_request_works(client)


def test_nan_refused_where_the_input_cannot_hold_it(two_io_client: Client) -> None:
    body = json.dumps({"inputs": {"a": [[1.0, 2.0, 3.0]], "ids": [math.nan]}}).encode()
    assert b"NaN" in body
    reply = two_io_client.post(body, JSON_TYPE)
    assert reply.status == 400
    assert reply.error["reason"] == "bad-input"
    assert "'ids'" in reply.error["message"] and "NaN" in reply.error["message"]
    good = two_io_client.predict_json({"inputs": {"a": [[1.0, 2.0, 3.0]], "ids": [4]}})
    assert good.json()["outputs"]["ids_out"] == [8]


def test_nan_passes_through_a_float_input(client: Client) -> None:
    """Float inputs take NaN (docs/runtimes.md); it comes back as JSON's NaN token."""
    body = json.dumps({"inputs": [[math.nan] * FEATURES]}).encode()
    reply = client.post(body, JSON_TYPE)
    assert reply.status == 200
    assert all(math.isnan(v) for v in reply.json()["outputs"]["probabilities"][0])


def test_missing_input_is_named(two_io_client: Client) -> None:
    reply = two_io_client.predict_npz({"a": np.zeros((1, 3), np.float32)})
    assert reply.status == 400
    assert "missing input 'ids'" in reply.error["message"]


def test_npy_body_for_a_two_input_model_is_refused(two_io_client: Client) -> None:
    reply = two_io_client.post(npy(np.zeros((1, 3), np.float32)), NPY_TYPE)
    assert reply.status == 400
    assert "2 inputs" in reply.error["message"]


def test_npy_object_array_is_never_unpickled(client: Client, service: Any) -> None:
    class Payload:
        def __reduce__(self) -> Any:
            return (exec, ("import os; os.environ['EDGEKIT_HTTP_PWNED'] = '1'",))

    body = npy(np.array([Payload()], dtype=object), allow_pickle=True)
    reply = client.post(body, NPY_TYPE)
    assert reply.status == 400
    assert reply.error["reason"] == "invalid-npy"
    assert "pickle" in reply.error["message"]
    assert "EDGEKIT_HTTP_PWNED" not in os.environ
    npz = io.BytesIO()
    with zipfile.ZipFile(npz, "w") as archive:
        archive.writestr("input.npy", body)
    reply = client.post(npz.getvalue(), NPZ_TYPE)
    assert reply.status == 400 and "pickle" in reply.error["message"]
    assert "EDGEKIT_HTTP_PWNED" not in os.environ
    assert_good_request_works(client)


def test_npz_bomb_is_refused_by_its_declared_size(service: Any, start_api: Any) -> None:
    api = start_api(service, max_body_bytes=1024 * 1024)
    body = npz_bytes({"input": np.zeros((1 << 20, FEATURES), np.float32)}, compressed=True)
    assert len(body) < 1024 * 1024  # 64 MiB of zeros deflate to ~64 KiB
    client = connect(api)
    reply = client.post(body, NPZ_TYPE)
    assert reply.status == 413
    assert "decoded" in reply.error["message"]
    assert_good_request_works(client)


def test_npz_member_with_a_bad_crc_is_refused(client: Client) -> None:
    body = bytearray(npz_bytes({"input": np.ones((2, FEATURES), np.float32)}))
    data_at = body.rfind(b"\x00\x00\x80?")  # inside the float32 ones: corrupt the payload
    body[data_at + 2] ^= 0xFF
    reply = client.post(bytes(body), NPZ_TYPE)
    assert reply.status == 400
    assert reply.error["reason"] == "invalid-npz"
    assert_good_request_works(client)


def test_unknown_output_is_named(client: Client, service: Any) -> None:
    reply = client.predict_json(GOOD, path="/v1/predict?output=logits")
    assert reply.status == 400
    assert reply.error["reason"] == "unknown-output"
    assert "'logits'" in reply.error["message"] and "'probabilities'" in reply.error["message"]
    assert service.metrics.snapshot().rejected_inputs == 0  # the input was fine


def test_two_outputs_for_an_npy_reply_are_refused(client: Client) -> None:
    body = npy(np.zeros((1, FEATURES), np.float32))
    reply = client.post(body, NPY_TYPE, path="/v1/predict?output=a&output=b")
    assert reply.status == 400 and "one output" in reply.error["message"]


# ------------------------------------------------------------------- protocol-level refusals


def head(lines: list[str]) -> bytes:
    return ("\r\n".join([*lines, "", ""])).encode()


def test_missing_content_length_is_411(api: HttpApi, service: Any) -> None:
    reply, closed = raw_exchange(
        api, head(["POST /v1/predict HTTP/1.1", "Host: x", f"Content-Type: {JSON_TYPE}"])
    )
    assert reply.status == 411
    assert reply.error["reason"] == "length-required"
    assert "Content-Length" in reply.error["message"]
    assert closed
    assert service.metrics.snapshot().rejected_inputs == 1


def test_chunked_body_is_411(api: HttpApi) -> None:
    request = head(["POST /v1/predict HTTP/1.1", "Host: x", "Transfer-Encoding: chunked"])
    reply, closed = raw_exchange(api, request + b"2\r\n{}\r\n0\r\n\r\n")
    assert reply.status == 411 and "chunked" in reply.error["message"]
    assert closed


def test_oversized_body_is_refused_before_it_is_sent(api: HttpApi, service: Any) -> None:
    """Only the headers go out: the 413 arrives without the server waiting for the body."""
    size = api.max_body_bytes + 1
    request = head(["POST /v1/predict HTTP/1.1", "Host: x", f"Content-Length: {size}"])
    start = time.monotonic()
    reply, closed = raw_exchange(api, request)
    assert time.monotonic() - start < 2.0
    assert reply.status == 413
    assert reply.error["reason"] == "body-too-large"
    assert str(size) in reply.error["message"] and str(api.max_body_bytes) in reply.error["message"]
    assert closed
    assert service.metrics.snapshot().rejected_inputs == 1


def test_expect_continue_gets_413_instead_of_100(api: HttpApi) -> None:
    size = api.max_body_bytes * 2
    request = head(
        ["POST /v1/predict HTTP/1.1", "Host: x", f"Content-Length: {size}", "Expect: 100-continue"],
    )
    reply, closed = raw_exchange(api, request)
    assert reply.status == 413 and closed


def test_expect_continue_then_body_is_served(api: HttpApi) -> None:
    body = as_json(GOOD)
    request = head(
        [
            "POST /v1/predict HTTP/1.1",
            "Host: x",
            f"Content-Type: {JSON_TYPE}",
            f"Content-Length: {len(body)}",
            "Expect: 100-continue",
        ],
    )
    address = api.address
    assert isinstance(address, tuple)
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(body)
        final = b""
        while b"probabilities" not in final:
            final += sock.recv(65536)
        assert final.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("value", ["abc", "-5", "1e3"])
def test_invalid_content_length_is_400(api: HttpApi, value: str) -> None:
    request = head(["POST /v1/predict HTTP/1.1", "Host: x", f"Content-Length: {value}"])
    reply, closed = raw_exchange(api, request)
    assert reply.status == 400 and "Content-Length" in reply.error["message"]
    assert closed


def test_two_content_lengths_are_400(api: HttpApi) -> None:
    request = head(
        ["POST /v1/predict HTTP/1.1", "Host: x", "Content-Length: 2", "Content-Length: 40"]
    )
    reply, closed = raw_exchange(api, request + b"{}")
    assert reply.status == 400 and closed


def test_body_shorter_than_announced_times_out_with_408(service: Any, start_api: Any) -> None:
    api = start_api(service, request_timeout=0.5)
    request = head(
        [
            "POST /v1/predict HTTP/1.1",
            "Host: x",
            f"Content-Type: {JSON_TYPE}",
            "Content-Length: 100",
        ],
    )
    reply, closed = raw_exchange(api, request + b'{"inputs": ')
    assert reply.status == 408
    assert reply.error["reason"] == "timeout"
    assert closed
    assert_good_request_works(connect(api))


def test_malformed_request_line_gets_a_json_400(api: HttpApi) -> None:
    reply, closed = raw_exchange(api, b"THIS IS NOT HTTP\r\n\r\n")
    assert reply.status == 400
    assert reply.error["reason"] == "bad-request"
    assert closed


def test_unknown_path_is_404(client: Client) -> None:
    reply = client.get("/v1/predictions")
    assert reply.status == 404
    assert reply.error["reason"] == "not-found"
    assert "'/v1/predictions'" in reply.error["message"]
    assert_good_request_works(client)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/predict", "POST"), ("DELETE", "/v1/health", "GET, HEAD"),
     ("POST", "/metrics", "GET, HEAD"), ("PUT", "/v1/model", "GET, HEAD")],
)  # fmt: skip
def test_wrong_method_is_405(client: Client, method: str, path: str, allow: str) -> None:
    body = b"{}" if method in ("POST", "PUT") else None
    reply = client.request(method, path, body)
    assert reply.status == 405
    assert reply.headers["Allow"] == allow
    assert reply.error["reason"] == "method-not-allowed"
    assert method in reply.error["message"] and allow in reply.error["message"]
    assert_good_request_works(client)


# --------------------------------------------------------------------- the service's errors


def test_no_model_is_503(start_api: Any) -> None:
    client = connect(start_api(RuntimeService(None)))
    reply = client.predict_json(GOOD)
    assert reply.status == 503
    assert reply.error == {"reason": "no-model", "message": "no model is installed yet"}
    assert client.get("/v1/model").status == 503


def test_inference_error_is_500_and_counted(client: Client, service: Any) -> None:
    service.runtime.close()  # the real runtime now fails every request
    reply = client.predict_json(GOOD)
    assert reply.status == 500
    assert reply.error["reason"] == "inference-failed"
    assert "closed" in reply.error["message"]
    snap = service.metrics.snapshot()
    assert (snap.inferences, snap.errors) == (1, 1)


def test_unexpected_exception_is_a_500_without_details(
    client: Client, service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    service.fail_with = KeyError("secret internal state")
    with caplog.at_level(logging.ERROR, logger="device_agent.http_api"):
        reply = client.predict_json(GOOD)
    assert reply.status == 500
    assert reply.error["reason"] == "internal"
    assert b"secret" not in reply.body and b"Traceback" not in reply.body
    assert any(record.exc_info for record in caplog.records)  # the log has the traceback
    service.fail_with = None
    assert_good_request_works(client)


def test_service_error_subclass_keeps_its_reason(client: Client, service: Any) -> None:
    class Overheated(InferenceError):
        reason = "overheated"

    service.fail_with = Overheated("the NPU is at 95 C")
    reply = client.predict_json(GOOD)
    assert reply.status == 500
    assert reply.error == {"reason": "overheated", "message": "the NPU is at 95 C"}


@pytest.mark.parametrize(
    ("lines", "status", "reason"),
    [
        (["GET /v1/health HTTP/1.1", "Host: x", " folded: continuation"], 400, "bad-request"),
        (["GET /v1/health HTTP/1.1", "Content-Length : 0"], 400, "bad-request"),
        (["GET /v1/health HTTP/1.1", "no colon here"], 400, "bad-request"),
        (["GET /v1/health HTTP/2.0"], 505, "http-version"),
        (["GET /v1/health"], 400, "bad-request"),  # HTTP/0.9 is not served
        (["GET /v1/health HTTP/1.1", *(f"X-H{i}: {i}" for i in range(101))], 431,
         "headers-too-large"),
        (["BREW /v1/health HTTP/1.1"], 501, "method-not-allowed"),
    ],
)  # fmt: skip
def test_malformed_headers_are_refused(
    api: HttpApi, lines: list[str], status: int, reason: str
) -> None:
    reply, closed = raw_exchange(api, head(lines))
    assert reply.status == status
    assert reply.error["reason"] == reason
    assert closed


def test_http10_closes_after_the_response(api: HttpApi) -> None:
    reply, closed = raw_exchange(api, head(["GET //v1/health HTTP/1.0"]))
    assert reply.status == 200  # "//v1/health" is read as "/v1/health"
    assert closed


def test_decoded_arrays_are_writable(client: Client, service: Any) -> None:
    """The body is decoded in place, not copied: the service may still modify its inputs."""
    seen: list[bool] = []
    real_predict = service.predict

    def predict(inputs: Any) -> Any:
        arrays = inputs.values() if isinstance(inputs, dict) else [inputs]
        seen.extend(bool(a.flags.writeable) for a in arrays)
        return real_predict(inputs)

    service.predict = predict
    x = np.ones((2, FEATURES), np.float32)
    assert client.post(npy(x), NPY_TYPE).status == 200
    assert client.predict_npz({"input": x}).status == 200
    assert client.predict_json({"inputs": x.tolist()}).status == 200
    assert seen == [True, True, True]
