"""Bundle hints for ONNX Runtime sessions: graph optimizers a manifest asks to switch off.

Whether an optimizer really is off is read from onnxruntime itself: with its default logger at
verbose level, session creation logs "Applying graph transformer NAME" for every transformer it
runs. That happens in a child process (the logger is process-wide and writes to stderr).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from device_agent.runtime import OnnxRuntime, RuntimeOptions, load_runtime
from device_agent.runtime.onnx import (
    MANIFEST_DISABLED_OPTIMIZERS,
    ORT_OPTIMIZERS,
    disabled_optimizers_hint,
)

from .conftest import Mlp, QdqDigits

REPO = Path(__file__).resolve().parents[3]
QDQ_PROPAGATION = "QDQPropagationTransformer"


def hint(value: Any) -> dict[str, Any]:
    """The manifest fields that hold ``value`` at the hint's path."""
    node: Any = value
    for key in reversed(MANIFEST_DISABLED_OPTIMIZERS):
        node = {key: node}
    return dict(node)


def manifest_with(value: Any) -> dict[str, Any]:
    """A manifest (the part that matters) holding ``value`` at the hint's path."""
    return {"name": "digits", "version": 3, **hint(value)}


def transformers_applied(model: Path, manifest: dict[str, Any], **options: Any) -> list[str]:
    """Graph transformers onnxruntime ran while the agent's adapter opened ``model``."""
    script = (
        "import json, sys\n"
        "import onnxruntime\n"
        "onnxruntime.set_default_logger_severity(0)\n"
        "from device_agent.runtime import RuntimeOptions, load_runtime\n"
        "options = RuntimeOptions(**json.loads(sys.argv[3]))\n"
        "load_runtime('onnxruntime', sys.argv[1], manifest=json.loads(sys.argv[2]),"
        " options=options)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(model), json.dumps(manifest), json.dumps(options)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return re.findall(r"Applying graph transformer (\S+) on step", done.stderr)


def test_hint_is_read_from_the_manifest_path() -> None:
    names = [QDQ_PROPAGATION, "ConstantFolding", QDQ_PROPAGATION]
    assert disabled_optimizers_hint(manifest_with(names)) == (QDQ_PROPAGATION, "ConstantFolding")
    assert disabled_optimizers_hint(manifest_with([])) == ()


def test_the_documented_path_is_the_one_read() -> None:
    docs = (REPO / "docs" / "runtimes.md").read_text()
    assert f"`{'.'.join(MANIFEST_DISABLED_OPTIMIZERS)}`" in docs


@pytest.mark.parametrize(
    "manifest",
    [
        None,
        {},
        {MANIFEST_DISABLED_OPTIMIZERS[0]: {}},
        manifest_with(None),
    ],
    ids=["no-manifest", "no-hints", "no-onnxruntime-hints", "null"],
)
def test_no_hint_means_none_and_no_warning(
    manifest: dict[str, Any] | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    assert disabled_optimizers_hint(manifest) is None
    assert caplog.records == []


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ({"runtime_hints": ["onnxruntime"]}, "runtime_hints must be an object, not a list"),
        (
            {"runtime_hints": {"onnxruntime": "fast"}},
            "runtime_hints.onnxruntime must be an object, not a string",
        ),
        (manifest_with(QDQ_PROPAGATION), "must be a list of optimizer names, not 'QDQ"),
        (manifest_with([QDQ_PROPAGATION, 3]), "must be a list of optimizer names"),
        (manifest_with([" "]), "must be a list of optimizer names"),
    ],
    ids=["hints-not-object", "onnxruntime-not-object", "string", "number", "blank"],
)
def test_malformed_hint_is_one_warning_and_ignored(
    manifest: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The path in these cases is spelled out: they check the messages, not the constant.
    assert MANIFEST_DISABLED_OPTIMIZERS == ("runtime_hints", "onnxruntime", "disabled_optimizers")
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    assert disabled_optimizers_hint(manifest) is None
    [record] = caplog.records
    assert message in record.getMessage() and "\n" not in record.getMessage()


def test_onnxruntime_itself_ignores_unknown_names_silently(mlp_onnx: Mlp) -> None:
    """Why the agent checks names: onnxruntime 1.31 loads a session whatever the names."""
    session = ort.InferenceSession(
        str(mlp_onnx.path),
        providers=["CPUExecutionProvider"],
        disabled_optimizers=["NoSuchOptimizer"],
    )
    assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].shape == (1, 3)


def test_unknown_names_are_warned_about_and_left_out(
    mlp_onnx: Mlp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="device_agent.runtime")
    rt = OnnxRuntime(
        mlp_onnx.path,
        disabled_optimizers=["NoSuchOptimizer", QDQ_PROPAGATION, "noSuchOptimizer"],
        optimizers_from="the test",
    )
    assert rt.disabled_optimizers == (QDQ_PROPAGATION,)
    [record] = caplog.records
    text = record.getMessage()
    assert "'NoSuchOptimizer', 'noSuchOptimizer'" in text and "in the test" in text
    assert mlp_onnx.path.name in text and ort.__version__ in text
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(rt.predict(x)["y"], mlp_onnx.reference(x), atol=1e-5)


def test_names_must_be_a_sequence_of_strings(mlp_onnx: Mlp) -> None:
    with pytest.raises(TypeError, match="disabled_optimizers"):
        OnnxRuntime(mlp_onnx.path, disabled_optimizers=QDQ_PROPAGATION)
    with pytest.raises(ValueError, match="disabled_optimizers"):
        RuntimeOptions(disabled_optimizers=QDQ_PROPAGATION)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="disabled_optimizers"):
        RuntimeOptions(disabled_optimizers=("",))


def test_manifest_hint_switches_the_optimizer_off_in_the_session(qdq_digits: QdqDigits) -> None:
    applied = transformers_applied(qdq_digits.qdq, manifest_with([]))
    assert QDQ_PROPAGATION in applied  # on by default: the test can see it
    applied = transformers_applied(qdq_digits.qdq, manifest_with([QDQ_PROPAGATION]))
    assert QDQ_PROPAGATION not in applied
    assert "QDQSelectorActionTransformer" in applied  # only the one named is off


def test_configuration_overrides_the_manifest(qdq_digits: QdqDigits) -> None:
    hint = manifest_with([QDQ_PROPAGATION])
    applied = transformers_applied(qdq_digits.qdq, hint, disabled_optimizers=[])
    assert QDQ_PROPAGATION in applied
    applied = transformers_applied(qdq_digits.qdq, hint, disabled_optimizers=["ConstantFolding"])
    assert QDQ_PROPAGATION in applied and "ConstantFolding" not in applied
    rt = load_runtime(
        "onnxruntime",
        qdq_digits.qdq,
        manifest=hint,
        options=RuntimeOptions(disabled_optimizers=("ConstantFolding",)),
    )
    assert rt.disabled_optimizers == ("ConstantFolding",)  # type: ignore[attr-defined]


def test_qdq_model_computes_the_same_with_the_hint(qdq_digits: QdqDigits) -> None:
    default = load_runtime("onnxruntime", qdq_digits.qdq)
    hinted = load_runtime("onnxruntime", qdq_digits.qdq, manifest=manifest_with([QDQ_PROPAGATION]))
    assert hinted.disabled_optimizers == (QDQ_PROPAGATION,)  # type: ignore[attr-defined]
    x = qdq_digits.x_test
    with_hint = hinted.predict({"image": x})["probabilities"]
    np.testing.assert_allclose(with_hint, default.predict({"image": x})["probabilities"], atol=1e-6)
    accuracy = float((with_hint.argmax(axis=1) == qdq_digits.y_test).mean())
    fp32 = load_runtime("onnxruntime", qdq_digits.fp32).predict({"image": x})["probabilities"]
    assert accuracy >= float((fp32.argmax(axis=1) == qdq_digits.y_test).mean()) - 0.03


def test_every_transformer_this_onnxruntime_runs_is_a_known_name(
    qdq_digits: QdqDigits, mlp_onnx: Mlp
) -> None:
    """Keeps ORT_OPTIMIZERS in step with the installed onnxruntime: an upgrade that adds or
    renames a transformer fails here instead of making the agent warn about a valid name."""
    applied = set(transformers_applied(qdq_digits.qdq, {}))
    applied |= set(transformers_applied(mlp_onnx.path, {}))
    assert len(applied) > 20  # the log format was understood
    assert applied - ORT_OPTIMIZERS == set()


def test_agent_applies_the_bundle_hint_and_the_devices_override(kit) -> None:
    """Through the real install path (verify, self-test, activate, commit): the manifest's
    hint reaches the serving session, and ``[runtime] disabled_optimizers`` replaces it."""
    from device_agent.agent import Agent
    from device_agent.config import AgentConfig, RuntimeConfig

    agent = kit.agent()
    kit.commit(agent, kit.bundle(1, "m1", extra=hint([QDQ_PROPAGATION, "NoSuchOptimizer"])))
    serving = agent.serving
    assert serving is not None
    assert serving.runtime.disabled_optimizers == (QDQ_PROPAGATION,)
    np.testing.assert_allclose(agent.predict(kit.x)["probabilities"], kit.expected("m1"), rtol=1e-5)
    agent.close()

    config = AgentConfig(state_dir=kit.state_dir, runtime=RuntimeConfig(disabled_optimizers=()))
    with Agent(config=config) as override:
        serving = override.serving
        assert serving is not None and serving.runtime.disabled_optimizers == ()
