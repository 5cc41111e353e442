"""POST /v1/predict in its three formats: answers equal to calling the runtime directly."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import numpy as np
from http_helpers import CLASSES, FEATURES, Client, Models, npz_bytes

from device_agent.http_api import NPY_TYPE, NPZ_TYPE
from device_agent.runtime import Runtime, load_runtime

rng = np.random.default_rng(7)


def batch(n: int = 5) -> np.ndarray:
    return rng.standard_normal((n, FEATURES))


def test_json_named_inputs_equal_the_runtime(client: Client, reference: Runtime) -> None:
    x = batch()
    reply = client.predict_json({"inputs": {"input": x.tolist()}})
    assert reply.status == 200
    got = np.asarray(reply.json()["outputs"]["probabilities"], dtype=np.float32)
    want = reference.predict({"input": x})["probabilities"]
    assert got.shape == (5, CLASSES)
    np.testing.assert_array_equal(got, want)  # float32 survives JSON exactly


def test_json_bare_list_for_a_single_input_model(client: Client, reference: Runtime) -> None:
    x = batch(1)
    reply = client.predict_json({"inputs": x.tolist()})
    assert reply.status == 200
    got = np.asarray(reply.json()["outputs"]["probabilities"], dtype=np.float32)
    np.testing.assert_array_equal(got, reference.predict(x)["probabilities"])


def test_json_integers_are_accepted_for_a_float_input(client: Client, reference: Runtime) -> None:
    x = np.arange(2 * FEATURES).reshape(2, FEATURES) % 3
    reply = client.predict_json({"inputs": {"input": x.tolist()}})
    assert reply.status == 200
    got = np.asarray(reply.json()["outputs"]["probabilities"], dtype=np.float32)
    np.testing.assert_array_equal(got, reference.predict(x)["probabilities"])


def test_json_reply_names_the_model_and_the_latency(client: Client) -> None:
    reply = client.predict_json({"inputs": batch(1).tolist()})
    document = reply.json()
    assert set(document) == {"outputs", "model", "latency_ms"}
    assert document["model"] == {"name": "tiny", "version": "1.0.0"}
    assert isinstance(document["latency_ms"], float) and 0 < document["latency_ms"] < 1000
    assert reply.headers["Cache-Control"] == "no-store"


def test_npy_body_returns_the_first_output_as_npy(client: Client, reference: Runtime) -> None:
    x = batch().astype(np.float32)
    reply = client.predict_npy(x)
    assert reply.status == 200
    assert reply.headers.get_content_type() == NPY_TYPE
    assert reply.headers["X-Model-Name"] == "tiny"
    assert reply.headers["X-Model-Version"] == "1.0.0"
    assert float(reply.headers["X-Latency-Ms"]) > 0
    got = reply.array()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, reference.predict(x)["probabilities"])


def test_npy_float64_and_fortran_order_bodies(client: Client, reference: Runtime) -> None:
    x = np.asfortranarray(batch(3))
    reply = client.predict_npy(x)
    assert reply.status == 200
    np.testing.assert_array_equal(reply.array(), reference.predict(x)["probabilities"])


def test_npy_output_query_selects_by_name(client: Client) -> None:
    reply = client.predict_npy(batch(2), path="/v1/predict?output=probabilities")
    assert reply.status == 200
    assert reply.array().shape == (2, CLASSES)


def test_npz_two_inputs_equal_the_runtime(two_io_client: Client, models: Models) -> None:
    a = rng.standard_normal((4, 3)).astype(np.float32)
    ids = np.array([3, -1, 0, 2**40], dtype=np.int64)
    reply = two_io_client.predict_npz({"a": a, "ids": ids})
    assert reply.status == 200
    assert reply.headers.get_content_type() == NPZ_TYPE
    with np.load(io.BytesIO(reply.body), allow_pickle=False) as archive:
        got = {name: archive[name] for name in archive.files}
    want = load_runtime("onnxruntime", models.two_io).predict({"a": a, "ids": ids})
    assert set(got) == {"a_out", "ids_out"}
    for name, value in want.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)


def test_npz_compressed_body_is_accepted(two_io_client: Client) -> None:
    a = np.zeros((2, 3), np.float32)
    ids = np.array([1, 2])
    body = npz_bytes({"a": a, "ids": ids}, compressed=True)
    reply = two_io_client.post(body, NPZ_TYPE)
    assert reply.status == 200
    with zipfile.ZipFile(io.BytesIO(reply.body)) as archive:
        assert sorted(archive.namelist()) == ["a_out.npy", "ids_out.npy"]


def test_npz_output_query_selects_outputs(two_io_client: Client) -> None:
    arrays = {"a": np.zeros((1, 3), np.float32), "ids": np.array([5])}
    reply = two_io_client.predict_npz(arrays, path="/v1/predict?output=ids_out")
    with np.load(io.BytesIO(reply.body), allow_pickle=False) as archive:
        assert archive.files == ["ids_out"]
        assert archive["ids_out"].tolist() == [10]


def test_json_two_inputs_keep_integer_outputs_exact(two_io_client: Client) -> None:
    reply = two_io_client.predict_json({"inputs": {"a": [[0.5, 1.5, 2.5]], "ids": [2**52 + 1]}})
    outputs: dict[str, Any] = reply.json()["outputs"]
    assert outputs == {"a_out": [[1.5, 2.5, 3.5]], "ids_out": [2**53 + 2]}


def test_keep_alive_serves_many_requests_on_one_connection(client: Client) -> None:
    first = client.predict_json({"inputs": batch(1).tolist()})
    assert first.status == 200
    sock = client.connection.sock
    assert sock is not None
    for _ in range(20):
        assert client.predict_json({"inputs": batch(1).tolist()}).status == 200
        assert client.get("/v1/health").status == 200
    assert client.connection.sock is sock  # never reconnected


def test_predictions_are_counted_in_the_service_metrics(client: Client, service: Any) -> None:
    for _ in range(3):
        client.predict_json({"inputs": batch(1).tolist()})
    snap = service.metrics.snapshot()
    assert snap.inferences == 3
    assert snap.rejected_inputs == 0
