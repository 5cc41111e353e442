"""Fixtures for the HTTP API tests: real models, a real service, a real server, real sockets.

The service is ``runtime_service.RuntimeService`` (an InferenceService over ONNX Runtime) and
the clients live in ``helpers.py``; both are loaded by path because the suite runs with
``--import-mode=importlib``, and ``helpers`` is registered as ``http_helpers`` for the test
modules to import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.bundles import write_onnx_model

from device_agent.http_api import HttpApi
from device_agent.runtime import Runtime, load_runtime


def _load(name: str, filename: str) -> Any:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(filename))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


helpers = _load("http_helpers", "helpers.py")
RuntimeService = _load("http_runtime_service", "runtime_service.py").RuntimeService
Models, Client, connect = helpers.Models, helpers.Client, helpers.connect
FEATURES, CLASSES = helpers.FEATURES, helpers.CLASSES


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    out = tmp_path_factory.mktemp("http-models")
    tiny = write_onnx_model(out / "tiny.onnx", features=FEATURES, classes=CLASSES)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "one"], ["a_out"]),
            helper.make_node("Mul", ["ids", "two"], ["ids_out"]),
        ],
        "two_io",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("a_out", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch"]),
        ],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(2, np.int64), "two"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    two_io = out / "two_io.onnx"
    two_io.write_bytes(model.SerializeToString())
    return Models(tiny=tiny, two_io=two_io)


@pytest.fixture(scope="session")
def reference(models: Models) -> Runtime:
    """The tiny model loaded separately: what 'calling the runtime directly' returns."""
    return load_runtime("onnxruntime", models.tiny)


@pytest.fixture
def service(models: Models) -> Any:
    return RuntimeService(models.tiny)


@pytest.fixture
def api(service: Any) -> Iterator[HttpApi]:
    with HttpApi(service, port=0, request_timeout=10.0) as running:
        yield running


@pytest.fixture
def client(api: HttpApi) -> Iterator[Client]:
    c = connect(api)
    yield c
    c.close()


@pytest.fixture
def start_api() -> Iterator[Any]:
    """``start_api(service, **options)``: a started HttpApi (port 0 unless given), stopped after."""
    started: list[HttpApi] = []

    def start(service: Any, **options: Any) -> HttpApi:
        options.setdefault("port", 0)
        api = HttpApi(service, **options).start()
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


@pytest.fixture
def two_io_client(models: Models, start_api: Any) -> Iterator[Client]:
    """A client of an API serving the two-input model (float ``a`` and int64 ``ids``)."""
    c = connect(start_api(RuntimeService(models.two_io)))
    yield c
    c.close()
