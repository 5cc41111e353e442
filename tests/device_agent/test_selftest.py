"""The golden self-test on a real ONNX Runtime session."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.errors import GoldenMissing, SelfTestFailed
from device_agent.runtime import load_runtime
from device_agent.selftest import default_atol, load_golden, run_selftest


@pytest.fixture
def runtime(kit):
    rt = load_runtime("onnxruntime", kit.models.files["m1"])
    yield rt
    rt.close()


def _golden(kit, tmp_path, **arrays):
    path = tmp_path / "g.npz"
    np.savez(path, **arrays)
    return path


def _x(n=3):
    return np.random.default_rng(5).standard_normal((n, 16)).astype(np.float32)


def test_own_golden_set_passes(kit, runtime):
    report = run_selftest(runtime, kit.models.goldens["m1"])
    assert report.passed and report.samples == 4 and not report.skipped
    assert report.outputs[0].name == "probabilities"
    assert report.outputs[0].atol == pytest.approx(1e-5)
    assert "4 golden samples" in report.summary()


def test_golden_of_another_model_fails_naming_output_and_sample(kit, runtime):
    with pytest.raises(SelfTestFailed, match=r"output 'probabilities' differs .* sample 0"):
        run_selftest(runtime, kit.models.goldens["m2"])


def test_missing_golden(runtime):
    with pytest.raises(GoldenMissing):
        run_selftest(runtime, None)
    assert run_selftest(runtime, None, require=False).skipped


def test_samples_stored_with_their_batch_axis_are_accepted(kit, runtime, tmp_path):
    x = _x()
    y = kit.expected("m1", x)
    path = _golden(kit, tmp_path, **{"input:input": x[:, None, :], "output:probabilities": y})
    assert run_selftest(runtime, path).passed


def test_default_tolerance_scales_with_the_output(kit, runtime, tmp_path):
    x = _x()
    y = kit.expected("m1", x)
    assert default_atol(y) == pytest.approx(1e-4 + 1e-3 * float(np.abs(y).max()))
    near = _golden(kit, tmp_path, **{"input:input": x, "output:probabilities": y + 5e-5})
    assert run_selftest(runtime, near).passed
    far = _golden(kit, tmp_path, **{"input:input": x, "output:probabilities": y + 0.01})
    with pytest.raises(SelfTestFailed):
        run_selftest(runtime, far)


def test_rtol_widens_the_bound(kit, runtime, tmp_path):
    x = _x()
    y = kit.expected("m1", x)
    arrays = {"input:input": x, "output:probabilities": y * 1.01, "atol:probabilities": 0.0}
    with pytest.raises(SelfTestFailed):
        run_selftest(runtime, _golden(kit, tmp_path, **arrays))
    arrays["rtol:probabilities"] = 0.02
    assert run_selftest(runtime, _golden(kit, tmp_path, **arrays)).passed


def test_nan_never_matches_a_number(kit, runtime, tmp_path):
    x = _x()
    y = kit.expected("m1", x)
    y[1, 2] = np.nan
    arrays = {"input:input": x, "output:probabilities": y, "atol:probabilities": 1.0}
    with pytest.raises(SelfTestFailed, match="sample 1"):
        run_selftest(runtime, _golden(kit, tmp_path, **arrays))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"output:probabilities": np.zeros((2, 4))}, "input:NAME and output:NAME"),
        (
            {"input:input": np.zeros((2, 16)), "output:scores": np.zeros((2, 4))},
            "output:scores, which the model does not have",
        ),
        (
            {"input:input": np.zeros((2, 16)), "output:probabilities": np.zeros((3, 4))},
            "disagree on the number of samples",
        ),
        (
            {"input:input": np.zeros((2, 8)), "output:probabilities": np.zeros((2, 4))},
            "failed to run",
        ),
        (
            {
                "input:input": np.zeros((2, 16)),
                "output:probabilities": np.zeros((2, 4)),
                "atol:probabilities": np.array([1.0, 2.0]),
            },
            "must be one number",
        ),
    ],
)
def test_unusable_golden_sets_are_refused(kit, runtime, tmp_path, arrays, message):
    with pytest.raises(SelfTestFailed, match=message):
        run_selftest(runtime, _golden(kit, tmp_path, **arrays))


def test_unreadable_golden_file(tmp_path):
    path = tmp_path / "g.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(SelfTestFailed, match="cannot be read"):
        load_golden(path)
