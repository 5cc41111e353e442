"""Building and co-signing bundles: what `edgekit sign` writes and what it refuses."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from edgekit.bundle import add_signatures, build_bundle, read_bundle
from edgekit.errors import BundleError
from edgekit.trust import TrustPolicy
from edgekit.verify import verify_bundle

CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def golden(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_same_inputs_give_identical_bytes(tmp_path, model_file, signers):
    one, two = tmp_path / "1.ekb", tmp_path / "2.ekb"
    for out in (one, two):
        build_bundle(model_file, out, name="m", version=1, keys=[signers["A"]], created=CREATED)
    # Ed25519 is deterministic and the archive carries no wall-clock times.
    assert one.read_bytes() == two.read_bytes()


def test_manifest_describes_the_model(tmp_path, model_file, signers):
    out = tmp_path / "m.ekb"
    manifest = build_bundle(model_file, out, name="m", version=4, keys=[signers["A"]])
    assert manifest.runtime == "onnxruntime"
    assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [
        ("input", "float32", ("batch", 16))
    ]
    assert manifest.outputs[0].name == "probabilities"
    assert manifest.targets.opsets == {"ai.onnx": 17}
    assert manifest.files["model.onnx"].size == model_file.stat().st_size
    assert read_bundle(out).manifest == manifest


def test_golden_set_is_checked_against_the_model(tmp_path, model_file, signers):
    good = golden(
        tmp_path / "g.npz",
        **{
            "input:input": np.zeros((3, 16), np.float32),
            "output:probabilities": np.zeros((3, 4), np.float32),
            "atol:probabilities": np.float32(1e-4),
        },
    )
    manifest = build_bundle(
        model_file, tmp_path / "ok.ekb", name="m", version=1, keys=[signers["A"]], golden=good
    )
    assert "golden.npz" in manifest.files
    cases = {
        "wrong-input": {"input:image": np.zeros(1), "output:probabilities": np.zeros(1)},
        "no-output": {"input:input": np.zeros(1)},
        "unknown-key": {
            "input:input": np.zeros(1),
            "output:probabilities": np.zeros(1),
            "labels": np.zeros(1),
        },
    }
    for name, arrays in cases.items():
        out = tmp_path / f"{name}.ekb"
        with pytest.raises(BundleError, match="golden"):
            build_bundle(
                model_file,
                out,
                name="m",
                version=1,
                keys=[signers["A"]],
                golden=golden(tmp_path / f"{name}.npz", **arrays),
            )
        assert not out.exists()
    (tmp_path / "not.npz").write_text("nope")
    with pytest.raises(BundleError, match=r"not an \.npz"):
        build_bundle(
            model_file,
            tmp_path / "x.ekb",
            name="m",
            version=1,
            keys=[signers["A"]],
            golden=tmp_path / "not.npz",
        )


def test_bad_inputs_leave_no_output(tmp_path, model_file, signers):
    out = tmp_path / "out.ekb"
    bad_json = tmp_path / "baseline.json"
    bad_json.write_text('{"a": 1, "a": 2}')
    attempts = [
        dict(baseline=bad_json),
        dict(extra_files=[tmp_path / "missing.txt"]),
        dict(name="bad name!"),
        dict(version=-1),
        dict(runtime="tflite"),
    ]
    for options in attempts:
        kwargs = dict(name="m", version=1, keys=[signers["A"]])
        kwargs.update(options)
        with pytest.raises(BundleError):
            build_bundle(model_file, out, **kwargs)
        assert list(tmp_path.iterdir()) == [bad_json], options


def test_extra_files_are_shipped_and_verified(tmp_path, model_file, signers):
    labels = tmp_path / "labels.txt"
    labels.write_text("zero\none\n")
    out = tmp_path / "m.ekb"
    manifest = build_bundle(
        model_file, out, name="m", version=1, keys=[signers["A"]], extra_files=[labels]
    )
    policy = TrustPolicy.create([("A", signers["A"].public)], threshold=1)
    result = verify_bundle(out, policy, install_to=tmp_path / "slot")
    assert (result.directory / "labels.txt").read_text() == "zero\none\n"
    assert set(manifest.files) == {"model.onnx", "labels.txt"}


def test_co_signing_keeps_manifest_bytes_and_refuses_repeats(tmp_path, model_file, signers):
    out = tmp_path / "m.ekb"
    build_bundle(model_file, out, name="m", version=1, keys=[signers["A"]])
    before = read_bundle(out).manifest_bytes
    assert add_signatures(out, [signers["B"], signers["C"]]) == (
        signers["B"].keyid,
        signers["C"].keyid,
    )
    after = read_bundle(out, check_hashes=True)
    assert after.manifest_bytes == before
    assert not after.problems
    assert [s.keyid for s in after.signatures] == [signers[k].keyid for k in "ABC"]
    with pytest.raises(BundleError, match="already signed"):
        add_signatures(out, [signers["A"]])


def test_co_signing_refuses_a_damaged_bundle(tmp_path, model_file, signers):
    out = tmp_path / "m.ekb"
    build_bundle(model_file, out, name="m", version=1, keys=[signers["A"]])
    data = bytearray(out.read_bytes())
    data[data.rindex(b"tiny") + 1] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(Exception, match="damaged"):
        add_signatures(out, [signers["B"]])


@pytest.fixture(scope="module")
def int8_tflite(tmp_path_factory) -> Path:
    tf = pytest.importorskip("tensorflow")
    inputs = tf.keras.Input(shape=(8,), batch_size=1, name="features")
    outputs = tf.keras.layers.Dense(3, activation="softmax")(inputs)
    model = tf.keras.Model(inputs, outputs)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    converter.representative_dataset = lambda: (
        [rng.standard_normal((1, 8)).astype(np.float32)] for _ in range(50)
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path = tmp_path_factory.mktemp("tflite") / "classifier.tflite"
    path.write_bytes(converter.convert())
    return path


def test_tflite_runtime_and_quantization_are_recorded(tmp_path, int8_tflite, signers):
    manifest = build_bundle(
        int8_tflite, tmp_path / "t.ekb", name="t", version=1, keys=[signers["A"]]
    )
    assert manifest.runtime == "tflite"
    (tensor,) = manifest.inputs
    assert tensor.dtype == "int8"
    assert tensor.shape == (1, 8)
    assert tensor.quantization is not None
    assert len(tensor.quantization["scale"]) == 1
    assert manifest.outputs[0].quantization is not None
    with pytest.raises(BundleError, match="not onnxruntime"):
        build_bundle(
            int8_tflite,
            tmp_path / "x.ekb",
            name="t",
            version=1,
            keys=[signers["A"]],
            runtime="onnxruntime",
        )
