"""The interpreter fallback chain, exercised in a fresh interpreter process.

The subprocess makes ``ai_edge_litert`` unimportable (``sys.modules[name] = None``) and puts a
``tflite_runtime`` on the path that fails on import the way tflite-runtime 2.14 does under
NumPy 2. The agent must then load the model with real ``tensorflow.lite``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import TFLiteModels

CHILD = """
import json, logging, sys
sys.modules["ai_edge_litert"] = None
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="LOG %(name)s %(message)s")
import numpy as np
from device_agent.runtime import load_runtime
rt = load_runtime("tflite", sys.argv[1])
y = rt.predict(np.array(json.loads(sys.argv[2])))["output_0"]
print(json.dumps({"library": rt.library, "version": rt.version, "y": y.tolist()}))
"""

BROKEN_TFLITE_RUNTIME = """
# What tflite-runtime 2.14 (built against NumPy 1) does when imported under NumPy 2.
raise AttributeError("_ARRAY_API not found")
"""


@pytest.mark.slow
def test_falls_back_to_tensorflow_lite(tflite_models: TFLiteModels, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "tflite_runtime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "2.14.0"\n')
    (fake / "interpreter.py").write_text(BROKEN_TFLITE_RUNTIME)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")])
        ),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    x = np.random.default_rng(4).normal(size=(3, 4))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tflite_models.float_dyn), json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    import tensorflow as tf

    assert report["library"] == "tensorflow"
    assert report["version"] == tf.__version__
    np.testing.assert_allclose(report["y"], tflite_models.reference(x), rtol=1e-5, atol=1e-5)

    logs = [line for line in result.stderr.splitlines() if line.startswith("LOG device_agent")]
    tried = [line for line in logs if "unavailable" in line or "using the TFLite" in line]
    assert len(tried) == 3, logs
    assert "from ai_edge_litert unavailable: ModuleNotFoundError" in tried[0]
    assert "from tflite_runtime unavailable: AttributeError: _ARRAY_API not found" in tried[1]
    assert "using the TFLite interpreter from tensorflow" in tried[2]


# In-process variants: cheaper (TensorFlow is already imported by the model fixture), and they
# cover the two other ways a tflite_runtime built for NumPy 1 shows up under NumPy 2.

TF_DEPRECATION = "ignore:.*tf.lite.Interpreter is deprecated:UserWarning"

FAILS_ON_FIRST_USE = '''
class Interpreter:
    """Imports fine, breaks when the NumPy bridge is first used (as on some devices)."""

    def __init__(self, model_path=None, num_threads=None):
        try:
            raise AttributeError("_ARRAY_API not found")
        except AttributeError as exc:
            raise ImportError("numpy.core.multiarray failed to import") from exc
'''


@pytest.fixture
def without_litert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Block ai_edge_litert, give a site dir for a fake tflite_runtime, clean up after."""
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    site = tmp_path / "site"
    (site / "tflite_runtime").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in [m for m in sys.modules if m.split(".")[0] == "tflite_runtime"]:
        del sys.modules[name]


@pytest.mark.filterwarnings(TF_DEPRECATION)
def test_library_that_fails_on_first_use_is_skipped(
    tflite_models: TFLiteModels, without_litert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (without_litert / "tflite_runtime" / "__init__.py").write_text("")
    (without_litert / "tflite_runtime" / "interpreter.py").write_text(FAILS_ON_FIRST_USE)
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    from device_agent.runtime import TFLiteRuntime

    rt = TFLiteRuntime(tflite_models.float_dyn)
    assert rt.library == "tensorflow"
    assert "tflite_runtime" in sys.modules  # it was imported, then rejected
    assert "from tflite_runtime" in caplog.text and "cannot run under NumPy" in caplog.text
    x = np.ones((2, 4))
    np.testing.assert_allclose(rt.predict(x)["output_0"], tflite_models.reference(x), atol=1e-5)


@pytest.mark.filterwarnings(TF_DEPRECATION)
def test_pypi_tflite_runtime_is_not_even_imported_under_numpy_2(
    tflite_models: TFLiteModels, without_litert: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (without_litert / "tflite_runtime" / "__init__.py").write_text(
        'raise RuntimeError("must not be imported")\n'
    )
    dist = without_litert / "tflite_runtime-2.14.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tflite-runtime\nVersion: 2.14.0\n")
    caplog.set_level(logging.DEBUG, logger="device_agent.runtime")
    from device_agent.runtime import TFLiteRuntime

    rt = TFLiteRuntime(tflite_models.float_dyn)
    assert rt.library == "tensorflow"
    assert "tflite_runtime" not in sys.modules
    assert "tflite-runtime 2.14.0 is built against NumPy 1" in caplog.text
