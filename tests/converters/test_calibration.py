from __future__ import annotations

import numpy as np
import pytest

from converters.calibration import (
    CsvOptions,
    ImageOptions,
    SampleStream,
    fit_sample,
    image_layout,
    load_labels,
    open_samples,
    split_stream,
)
from converters.errors import BadOption, CalibrationDataError
from converters.model_spec import TensorSpec, read_model_spec

F32 = np.dtype(np.float32)
FLAT = TensorSpec("input", ("N", 64), F32)
IMAGE = TensorSpec("image", ("N", 1, 8, 8), F32)


def spec(*tensors: TensorSpec) -> tuple[TensorSpec, ...]:
    return tensors


# --------------------------------------------------------------------------- .npy


def test_npy_streams_samples_with_batch_axis(tmp_path, digits):
    path = tmp_path / "x.npy"
    np.save(path, digits.x[:50].astype(np.float64))  # float64 on disk: cast to the model's float32
    stream = open_samples(path, spec(FLAT))
    samples = list(stream())
    assert len(samples) == 50 == stream.length_hint
    assert samples[0]["input"].shape == (1, 64)
    assert samples[0]["input"].dtype == np.float32
    np.testing.assert_allclose(samples[7]["input"][0], digits.x[7])
    assert len(list(stream())) == 50  # re-iterable


def test_npy_from_model_spec_and_reshape_of_images(tmp_path, digits, mlp_model):
    path = tmp_path / "imgs.npy"
    np.save(path, digits.x[:5].reshape(-1, 8, 8))  # 8x8 per sample, model wants [N,64]
    samples = list(open_samples(path, read_model_spec(mlp_model)))
    assert samples[2]["input"].shape == (1, 64)
    np.testing.assert_allclose(samples[2]["input"][0], digits.x[2])


def test_npy_capped_at_max_samples(tmp_path):
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((500, 64), dtype=np.float32))
    assert len(list(open_samples(path, spec(FLAT)))) == 300  # default cap
    stream = open_samples(path, spec(FLAT), max_samples=10)
    assert stream.length_hint == 10
    assert len(list(stream)) == 10
    assert len(list(stream.take(3)())) == 3


def test_npy_wrong_shape_names_input_expected_and_found(tmp_path):
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((4, 65), dtype=np.float32))
    with pytest.raises(CalibrationDataError) as err:
        open_samples(path, spec(FLAT))
    message = str(err.value)
    assert "'input'" in message and "float32 [N,64]" in message and "(65,)" in message
    assert "\n" not in message
    assert err.value.reason == "calibration-data"


def test_npy_float_data_for_integer_input_is_refused(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.full((3, 4), 1.5))
    ids = TensorSpec("ids", ("N", 4), np.dtype(np.int64))
    with pytest.raises(CalibrationDataError, match="int64"):
        open_samples(path, spec(ids))


def test_npy_empty_and_missing(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 64), dtype=np.float32))
    with pytest.raises(CalibrationDataError, match="no samples"):
        open_samples(path, spec(FLAT))
    with pytest.raises(CalibrationDataError, match="not found"):
        open_samples(tmp_path / "nope.npy", spec(FLAT))


def test_npy_needs_single_input_model(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((3, 64), dtype=np.float32))
    other = TensorSpec("mask", ("N", 64), F32)
    with pytest.raises(CalibrationDataError, match="single-input"):
        open_samples(path, spec(FLAT, other))


# --------------------------------------------------------------------------- .npz


def test_npz_one_array_per_input(tmp_path):
    path = tmp_path / "multi.npz"
    mask = TensorSpec("mask", ("N", 4), np.dtype(np.int64))
    np.savez(path, input=np.ones((6, 64), np.float32), mask=np.arange(24).reshape(6, 4))
    samples = list(open_samples(path, spec(FLAT, mask)))
    assert len(samples) == 6
    assert samples[1]["mask"].tolist() == [[4, 5, 6, 7]]
    assert samples[1]["mask"].dtype == np.int64


def test_npz_wrong_names(tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, pixels=np.ones((6, 64), np.float32))
    with pytest.raises(CalibrationDataError) as err:
        open_samples(path, spec(FLAT))
    assert "missing arrays for inputs ['input']" in str(err.value)
    assert "['pixels'] match no model input" in str(err.value)


def test_npz_mismatched_sample_counts(tmp_path):
    path = tmp_path / "uneven.npz"
    mask = TensorSpec("mask", ("N", 4), F32)
    np.savez(path, input=np.ones((6, 64), np.float32), mask=np.ones((5, 4), np.float32))
    with pytest.raises(CalibrationDataError, match="same number of samples"):
        open_samples(path, spec(FLAT, mask))


# --------------------------------------------------------------------------- CSV


def test_csv_with_header_and_skipped_label_column(tmp_path, digits):
    path = tmp_path / "d.csv"
    header = ",".join(["label", *[f"p{i}" for i in range(64)]])
    rows = [",".join([str(int(digits.y[i])), *map(str, digits.x[i])]) for i in range(20)]
    path.write_text("\n".join([header, *rows]) + "\n")
    stream = open_samples(path, spec(FLAT), csv_options=CsvOptions(skip_columns=("label",)))
    samples = list(stream)
    assert len(samples) == 20 == stream.length_hint
    np.testing.assert_allclose(samples[3]["input"][0], digits.x[3], rtol=1e-6)
    np.testing.assert_array_equal(load_labels(path, column="label"), digits.y[:20])


def test_csv_without_header_reshaped_into_image_input(tmp_path, digits):
    path = tmp_path / "rows.csv"
    path.write_text("\n".join(",".join(map(str, digits.x[i])) for i in range(4)))
    samples = list(open_samples(path, spec(IMAGE)))
    assert samples[0]["image"].shape == (1, 1, 8, 8)
    np.testing.assert_allclose(samples[1]["image"].reshape(-1), digits.x[1], rtol=1e-6)


def test_csv_errors(tmp_path):
    short = tmp_path / "short.csv"
    short.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(CalibrationDataError, match="expects float32 \\[N,64\\]"):
        open_samples(short, spec(FLAT))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join([",".join(["0"] * 64)] * 2 + [",".join(["0"] * 63)]))
    with pytest.raises(CalibrationDataError, match="line 3: 63 columns"):
        list(open_samples(ragged, spec(FLAT)))
    text = tmp_path / "text.csv"
    text.write_text("\n".join([",".join(["1"] * 64), ",".join(["x"] * 64)]))
    with pytest.raises(CalibrationDataError, match="non-numeric"):
        list(open_samples(text, spec(FLAT)))
    with pytest.raises(BadOption, match="skip column"):
        open_samples(short, spec(FLAT), csv_options=CsvOptions(skip_columns=("nope",)))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CalibrationDataError, match="no samples"):
        open_samples(empty, spec(FLAT))


# --------------------------------------------------------------------------- images


def test_image_layout_detection():
    assert image_layout(IMAGE) == "NCHW"
    assert image_layout(TensorSpec("x", ("N", 224, 224, 3), F32)) == "NHWC"
    assert image_layout(TensorSpec("x", ("N", 3, "H", "W"), F32)) == "NCHW"
    assert image_layout(TensorSpec("x", ("N", 28, 28), F32)) == "NHW"
    assert image_layout(TensorSpec("x", (1, 3, 8, 3), F32), "NHWC") == "NHWC"
    with pytest.raises(CalibrationDataError, match="rank-4"):
        image_layout(FLAT)


def test_image_directory(tmp_path, digits):
    pil = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        pixels = (digits.x[i].reshape(8, 8) * 255).astype(np.uint8)
        target = folder / f"{i:02d}.png" if i < 4 else folder / "sub" / "big.png"
        img = pil.fromarray(pixels, mode="L")
        if i == 4:  # larger RGB image: converted to grayscale and resized to 8x8
            img = img.convert("RGB").resize((32, 32))
        img.save(target)
    (folder / "notes.txt").write_text("not an image")
    stream = open_samples(folder, spec(IMAGE))
    samples = list(stream)
    assert len(samples) == 5 == stream.length_hint
    first = samples[0]["image"]
    assert first.shape == (1, 1, 8, 8) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_allclose(first.reshape(-1), digits.x[0], atol=1 / 255 + 1e-6)
    assert samples[4]["image"].shape == (1, 1, 8, 8)

    nhwc = TensorSpec("rgb", ("N", 8, 8, 3), F32)
    normalised = list(
        open_samples(folder, spec(nhwc), image=ImageOptions(mean=(0.5,), std=(0.25,)))
    )
    assert normalised[0]["rgb"].shape == (1, 8, 8, 3)
    raw = (digits.x[0].reshape(8, 8) * 255).astype(np.uint8) / 255.0
    np.testing.assert_allclose(normalised[0]["rgb"][0, :, :, 1], (raw - 0.5) / 0.25, atol=0.02)


def test_image_directory_errors(tmp_path):
    pytest.importorskip("PIL.Image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="no image files"):
        open_samples(tmp_path / "empty", spec(IMAGE))
    with pytest.raises(CalibrationDataError, match="rank-4"):
        open_samples(tmp_path / "empty", spec(FLAT))
    dynamic = TensorSpec("image", ("N", 3, "H", "W"), F32)
    with pytest.raises(CalibrationDataError, match="dynamic height/width"):
        open_samples(tmp_path / "empty", spec(dynamic))


# --------------------------------------------------------------------------- in memory, split


def test_in_memory_sources():
    arrays = {"input": np.zeros((4, 64), np.float32)}
    assert len(list(open_samples(arrays, spec(FLAT)))) == 4
    assert len(list(open_samples(np.zeros((3, 64)), spec(FLAT)))) == 3
    listed = [{"input": np.zeros(64)}, {"input": np.ones((1, 64))}]
    samples = list(open_samples(listed, spec(FLAT)))
    assert [s["input"].shape for s in samples] == [(1, 64), (1, 64)]
    with pytest.raises(CalibrationDataError, match="names"):
        open_samples({"x": np.zeros((4, 64))}, spec(FLAT))
    with pytest.raises(BadOption):
        open_samples(42, spec(FLAT))  # type: ignore[arg-type]


def test_fit_sample_rules():
    assert fit_sample(np.zeros((1, 64)), FLAT, origin="t").shape == (1, 64)
    assert fit_sample(np.zeros(64), FLAT, origin="t").shape == (1, 64)
    assert fit_sample(np.zeros((8, 8)), FLAT, origin="t").shape == (1, 64)
    fixed = TensorSpec("x", (2, 64), F32)
    with pytest.raises(CalibrationDataError, match="\\(64,\\)"):
        fit_sample(np.zeros(64), fixed, origin="t")


def test_split_is_deterministic_disjoint_and_complete():
    data = np.arange(200, dtype=np.float32)[:, None].repeat(64, axis=1)
    whole = open_samples(data, spec(FLAT), max_samples=None)
    cal, val = split_stream(whole, validation_fraction=0.25, seed=3)
    cal_ids = [i for i, _ in cal.indexed()]
    val_ids = [i for i, _ in val.indexed()]
    assert cal_ids == [i for i, _ in cal.indexed()]  # same on every pass
    assert not set(cal_ids) & set(val_ids)
    assert sorted(cal_ids + val_ids) == list(range(200))
    assert 30 <= len(val_ids) <= 70
    assert cal.length_hint == len(cal_ids) and val.length_hint == len(val_ids)
    # The sample content follows its index (labels stay aligned).
    for index, sample in val.indexed():
        assert sample["input"][0, 0] == index
    other_cal, _ = split_stream(whole, validation_fraction=0.25, seed=4)
    assert [i for i, _ in other_cal.indexed()] != cal_ids
    capped, _ = split_stream(whole, max_calibration=10)
    assert len(list(capped)) == 10
    with pytest.raises(BadOption):
        split_stream(whole, validation_fraction=1.0)


def test_sample_stream_rejects_zero_cap():
    with pytest.raises(BadOption):
        SampleStream(lambda: iter(()), description="x", length=0, max_samples=0)


def test_load_labels(tmp_path):
    np.save(tmp_path / "y.npy", np.array([1, 2, 3]))
    assert load_labels(tmp_path / "y.npy").tolist() == [1, 2, 3]
    (tmp_path / "y.txt").write_text("label\n4\n5\n")
    assert load_labels(tmp_path / "y.txt").tolist() == [4, 5]
    np.savez(tmp_path / "y.npz", labels=np.array([[7], [8]]))
    assert load_labels(tmp_path / "y.npz").tolist() == [7, 8]
    assert load_labels([0.0, 1.0]).dtype == np.int64
    with pytest.raises(CalibrationDataError, match="fractions"):
        load_labels([0.5, 1.0])
    with pytest.raises(CalibrationDataError, match="one integer per sample"):
        load_labels(np.zeros((2, 2)))
