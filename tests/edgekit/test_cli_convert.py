"""`edgekit convert` end to end: real conversions, real measurements, a real signed bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.models import digits_data, write_digits_classifier

from edgekit.cli import cli
from edgekit.keys import write_key_pair
from edgekit.trust import TrustPolicy
from edgekit.verify import verify_bundle


@pytest.fixture(scope="module")
def setup(tmp_path_factory, signers) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert")
    x, y = digits_data()
    np.save(root / "calib.npy", x[:300])
    np.save(root / "val.npy", x[1200:1500])
    np.save(root / "labels.npy", y[1200:1500])
    write_key_pair(root / "keys", "release", signers["A"])
    return {
        "root": root,
        "model": write_digits_classifier(root / "digits.onnx"),
        "calib": root / "calib.npy",
        "val": root / "val.npy",
        "labels": root / "labels.npy",
        "key": root / "keys" / "release.key",
    }


def convert(setup: dict[str, Path], out: Path, *extra: object, code: int = 0) -> str:
    args = [
        "convert",
        setup["model"],
        "--key",
        setup["key"],
        "--name",
        "digits",
        "--version",
        "3",
        "--no-progress",
        "--batch-size",
        "8",
        "-o",
        out,
        *extra,
    ]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def outputs_left(directory: Path) -> list[str]:
    return sorted(
        p.name
        for p in directory.iterdir()
        if p.suffix in (".ekb", ".html") or p.name.startswith(".edgekit-convert")
    )


def test_auto_conversion_signs_a_self_testable_bundle(setup, signers, tmp_path):
    out = tmp_path / "digits-3.ekb"
    text = convert(
        setup,
        out,
        "--quantize",
        "auto",
        "--calibration",
        setup["calib"],
        "--validation",
        setup["val"],
        "--labels",
        setup["labels"],
        "--report",
        tmp_path / "report.html",
    )
    assert "onnx-fp32" in text and "onnx-int8-qdq" in text
    policy = TrustPolicy.create([("A", signers["A"].public)], threshold=1)
    result = verify_bundle(out, policy, install_to=tmp_path / "slot")
    files = set(result.manifest.files)
    assert {"model.onnx", "golden.npz", "baseline.json", "report.json"} <= files
    # The session settings it was measured with travel in the signed manifest, and the report.
    hints = {"onnxruntime": {"disabled_optimizers": ["QDQPropagationTransformer"]}}
    assert result.manifest.extra["runtime_hints"] == hints
    report = json.loads((tmp_path / "slot" / "report.json").read_text())
    assert report["runtime_hints"] == hints
    chosen = report["selection"]["chosen"]
    measured = {c["measurement"]["recipe"] for c in report["candidates"]}
    assert chosen in measured and "onnx-fp32" in measured
    # The golden set reproduces with the device's own runtime layer.
    from device_agent.runtime import load_runtime

    golden = np.load(tmp_path / "slot" / "golden.npz")
    runtime = load_runtime("onnxruntime", tmp_path / "slot" / "model.onnx")
    got = runtime.predict({"image": golden["input:image"]})["probabilities"]
    assert np.max(np.abs(got - golden["output:probabilities"])) <= golden["atol:probabilities"]
    page = (tmp_path / "report.html").read_text()
    assert "<svg" in page and chosen in page


def test_accuracy_gate_refuses_and_signs_nothing(setup, tmp_path):
    out = tmp_path / "digits-3.ekb"
    # One outlier in the calibration data stretches the input's int8 range so far that every
    # real pixel quantizes to zero: a classic way int8 silently destroys a model.
    calib = np.load(setup["calib"])
    calib[0, :] = 1e5
    np.save(tmp_path / "outlier.npy", calib)
    text = convert(
        setup,
        out,
        "--quantize",
        "int8",
        "--calibration",
        tmp_path / "outlier.npy",
        "--validation",
        setup["val"],
        "--labels",
        setup["labels"],
        "--max-accuracy-drop",
        "0.01",
        "--allow-slower",
        "--report",
        tmp_path / "refused.html",
        code=1,
    )
    assert "nothing was signed" in text
    assert "accuracy" in text.splitlines()[-1]
    assert not out.exists()
    assert (tmp_path / "refused.html").exists()  # the report explains the refusal
    assert outputs_left(tmp_path) == ["refused.html"]
    (tmp_path / "outlier.npy").unlink()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("not-a-model", "onnx"),
        ("corrupt-onnx", "digits"),
        ("wrong-shape", "image"),
        ("empty-calibration", "no samples"),
        ("missing-key", "key"),
        ("no-float-stem-for-tflite", "applies to --runtime onnx"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(setup, tmp_path, case, expected):
    out = tmp_path / "digits-3.ekb"
    args: list[object] = ["--quantize", "int8", "--calibration", setup["calib"]]
    model = setup["model"]
    if case == "not-a-model":
        model = tmp_path / "notes.txt"
        model.write_text("hello")
    elif case == "corrupt-onnx":
        model = tmp_path / "digits.onnx"
        model.write_bytes(setup["model"].read_bytes()[:200])
    elif case == "wrong-shape":
        np.save(tmp_path / "bad.npy", np.zeros((10, 32), np.float32))
        args = ["--quantize", "int8", "--calibration", tmp_path / "bad.npy"]
    elif case == "empty-calibration":
        np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.float32))
        args = ["--quantize", "int8", "--calibration", tmp_path / "empty.npy"]
    elif case == "missing-key":
        (tmp_path / "k.key").write_text("not a key")
        args += ["--key", tmp_path / "k.key"]
    elif case == "no-float-stem-for-tflite":
        args += ["--runtime", "tflite", "--no-float-stem"]
    runner_args = [
        "convert",
        model,
        "--key",
        setup["key"],
        "--name",
        "digits",
        "--version",
        "3",
        "--no-progress",
        "-o",
        out,
        *args,
    ]
    result = CliRunner().invoke(cli, [str(a) for a in runner_args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error:") and expected in line.lower(), result.output
    assert outputs_left(tmp_path) == []


def test_convert_help_teaches_with_an_example():
    result = CliRunner().invoke(cli, ["convert", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "--max-accuracy-drop" in result.output
    assert "--no-float-stem" in result.output and "QDQPropagationTransformer" in result.output


def test_no_float_stem_reaches_the_recipe(setup, tmp_path):
    out = tmp_path / "digits-3.ekb"
    json_report = tmp_path / "report.json"
    common = ["--quantize", "int8", "--calibration", setup["calib"], "--allow-slower"]
    convert(setup, out, *common, "--no-float-stem", "--json-report", json_report)
    (qdq,) = [c for c in json.loads(json_report.read_text())["candidates"] if c["mode"] == "int8"]
    assert qdq["config"]["float_stem"] is False
    assert "float stem: off" in qdq["notes"]


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory) -> Path:
    keras = pytest.importorskip("keras")
    x, y = digits_data()
    model = keras.Sequential(
        [
            keras.Input(shape=(64,), name="image"),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x[:1200], y[:1200], epochs=15, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "digits.keras"
    model.save(path)
    return path


def test_tflite_int8_conversion_from_keras(setup, keras_model, signers, tmp_path):
    out = tmp_path / "digits-tflite.ekb"
    args = [
        "convert",
        keras_model,
        "--runtime",
        "tflite",
        "--quantize",
        "int8",
        "--calibration",
        setup["calib"],
        "--validation",
        setup["val"],
        "--labels",
        setup["labels"],
        "--max-accuracy-drop",
        "0.05",
        "--allow-slower",
        "--key",
        setup["key"],
        "--name",
        "digits",
        "--version",
        "4",
        "--no-progress",
        "-o",
        out,
    ]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    policy = TrustPolicy.create([("A", signers["A"].public)], threshold=1)
    verified = verify_bundle(out, policy, install_to=tmp_path / "slot")
    manifest = verified.manifest
    assert manifest.runtime == "tflite"
    assert manifest.extra["runtime_hints"] == {"tflite": {"op_resolver": "auto"}}
    assert manifest.inputs[0].dtype == "int8" and manifest.inputs[0].quantization
    from device_agent.runtime import load_runtime

    golden = np.load(tmp_path / "slot" / "golden.npz")
    runtime = load_runtime("tflite", tmp_path / "slot" / manifest.model)
    (name,) = [k.split(":", 1)[1] for k in golden.files if k.startswith("input:")]
    (out_name,) = [k.split(":", 1)[1] for k in golden.files if k.startswith("output:")]
    got = runtime.predict({name: golden[f"input:{name}"]})[out_name]
    assert np.max(np.abs(got - golden[f"output:{out_name}"])) <= golden[f"atol:{out_name}"]
