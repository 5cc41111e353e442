"""Calibration and validation data: streamed, validated, memory-bounded samples.

A *sample* is a ``{input_name: np.ndarray}`` dict that can be fed to ``InferenceSession.run`` as
is: every array already has the model's rank, fixed dims and dtype (one sample per run; the
batch axis, when the model has one, is 1).

Readers never hold a whole data set in memory: ``.npy`` is memory-mapped, ``.npz`` is loaded one
array (= one input) at a time, images are decoded one file at a time and CSV is parsed row by
row. At most ``max_samples`` samples are produced (300 by default: enough for min/max and
histogram calibration of activations, small enough to stay fast on a laptop).

A :class:`SampleStream` is re-iterable (calibration may need several passes, measurement another
one) and remembers each sample's index in its source, so labels stay aligned after a
deterministic calibration/validation split (:func:`split_stream`).
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from .errors import BadOption, CalibrationDataError
from .model_spec import ModelSpec, TensorSpec

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "IMAGE_SUFFIXES",
    "CsvOptions",
    "DataSource",
    "ImageOptions",
    "LabelSource",
    "Sample",
    "SampleFactory",
    "SampleStream",
    "fit_sample",
    "image_layout",
    "load_labels",
    "open_samples",
    "split_stream",
]

Sample = dict[str, npt.NDArray[Any]]
"""One model feed: input name -> array with the input's rank, fixed dims and dtype."""

SampleFactory = Callable[[], Iterator[Sample]]
"""What recipes receive: call it to get a fresh pass over the calibration samples."""

DEFAULT_MAX_SAMPLES = 300

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass(frozen=True, kw_only=True)
class ImageOptions:
    """How a directory of images becomes model input.

    Pixels are scaled to [0, 1] float32 (kept as raw 0..255 when the model input is uint8), then
    normalised with ``mean``/``std`` per channel if given. The layout (NCHW vs NHWC) is detected
    from the input shape unless ``layout`` says otherwise; ``size`` (H, W) is only needed when
    the model's spatial dims are dynamic.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: Literal["auto", "NCHW", "NHWC"] = "auto"
    size: tuple[int, int] | None = None


@dataclass(frozen=True, kw_only=True)
class CsvOptions:
    """CSV parsing: one row per sample; numeric columns are flattened into the input shape."""

    delimiter: str = ","
    skip_columns: tuple[str | int, ...] = ()
    """Columns (header names or 0-based indexes) that are not features, e.g. a label column."""


class SampleStream:
    """A re-iterable, capped stream of validated samples.

    ``stream()`` / ``iter(stream)`` start a fresh pass; :meth:`indexed` also yields each sample's
    position in the original source (used to align labels after a split).
    """

    def __init__(
        self,
        open_indexed: Callable[[], Iterator[tuple[int, Sample]]],
        *,
        description: str,
        length: int | None,
        max_samples: int | None = DEFAULT_MAX_SAMPLES,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise BadOption(f"max_samples must be >= 1, got {max_samples}")
        self._open = open_indexed
        self.description = description
        self.max_samples = max_samples
        self._length = length

    @property
    def length_hint(self) -> int | None:
        """Number of samples a pass yields, when known without reading the data."""
        if self._length is None:
            return None
        return self._length if self.max_samples is None else min(self._length, self.max_samples)

    def indexed(self) -> Generator[tuple[int, Sample], None, None]:
        """Fresh pass yielding ``(source_index, sample)``, at most ``max_samples`` of them."""
        produced = 0
        for index, sample in self._open():
            if self.max_samples is not None and produced >= self.max_samples:
                return
            produced += 1
            yield index, sample
        if produced == 0:
            raise CalibrationDataError(f"{self.description}: no samples found")

    def __call__(self) -> Iterator[Sample]:
        for _, sample in self.indexed():
            yield sample

    def __iter__(self) -> Iterator[Sample]:
        return self()

    def take(self, count: int) -> SampleStream:
        """The same stream capped at ``count`` samples."""
        cap = count if self.max_samples is None else min(count, self.max_samples)
        return SampleStream(
            self.indexed, description=self.description, length=self.length_hint, max_samples=cap
        )

    def __repr__(self) -> str:
        return f"SampleStream({self.description!r}, length_hint={self.length_hint})"


DataSource = (
    str
    | os.PathLike[str]
    | npt.NDArray[Any]
    | Mapping[str, npt.NDArray[Any]]
    | Sequence[Mapping[str, npt.NDArray[Any]]]
    | SampleStream
)
"""Where samples come from: a path (.npy, .npz, .csv, image directory) or in-memory data."""

LabelSource = str | os.PathLike[str] | npt.NDArray[Any] | Sequence[int]
"""Labels: a path (.npy, .npz with ``labels``, .csv/.txt) or an array-like of class indices."""


# --------------------------------------------------------------------------- validation


def _shape_ok(shape: tuple[int, ...], spec: TensorSpec) -> bool:
    if spec.shape is None:
        return True
    if len(shape) != len(spec.shape):
        return False
    return all(not isinstance(d, int) or d == s for d, s in zip(spec.shape, shape, strict=True))


def fit_sample(value: npt.ArrayLike, spec: TensorSpec, *, origin: str) -> npt.NDArray[Any]:
    """Turn one sample's array (without a samples axis) into a valid feed for ``spec``.

    Accepted, in this order: the exact input shape; the input shape without its leading batch
    axis (a batch axis of 1 is added); any array with as many elements as the fixed non-batch
    dims (reshaped, e.g. a CSV row or an 8x8 image for a ``[N,64]`` input). dtypes are cast only
    within the same kind (float64 -> float32, uint8 -> float32 ...); float data for an integer
    input is refused rather than silently truncated.
    """
    array = np.asarray(value)
    expected = spec.dtype
    if array.dtype != expected and not np.can_cast(array.dtype, expected, casting="same_kind"):
        raise CalibrationDataError(
            f"{origin}: input {spec.name!r} expects {spec.describe()}, found dtype"
            f" {array.dtype.name} (shape {tuple(array.shape)}) that cannot be cast safely"
        )
    shape = tuple(int(d) for d in array.shape)
    fitted: npt.NDArray[Any] | None = None
    if _shape_ok(shape, spec):
        fitted = array
    elif spec.shape is not None and len(spec.shape) >= 1:
        first = spec.shape[0]
        batch_ok = not isinstance(first, int) or first == 1
        if batch_ok and _shape_ok((1, *shape), spec):
            fitted = array[np.newaxis, ...]
        else:
            tail = spec.shape[1:]
            if batch_ok and all(isinstance(d, int) for d in tail):
                fixed = tuple(int(d) for d in tail if isinstance(d, int))
                if array.size == math.prod(fixed):
                    fitted = array.reshape((1, *fixed))
    if fitted is None:
        raise CalibrationDataError(
            f"{origin}: input {spec.name!r} expects {spec.describe()}, found a sample of shape"
            f" {shape} ({array.dtype.name})"
        )
    return np.ascontiguousarray(fitted, dtype=expected)


def _specs(model: ModelSpec | Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    return model.inputs if isinstance(model, ModelSpec) else tuple(model)


def _single_input(specs: tuple[TensorSpec, ...], what: str) -> TensorSpec:
    if len(specs) != 1:
        names = ", ".join(repr(s.name) for s in specs)
        raise CalibrationDataError(
            f"{what} can feed single-input models only; this model has inputs {names}"
            " (use an .npz with one array per input name)"
        )
    return specs[0]


# --------------------------------------------------------------------------- readers


def _open_npy(path: Path, specs: tuple[TensorSpec, ...]) -> SampleStream:
    spec = _single_input(specs, f"{path.name} (.npy)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim == 0:
        raise CalibrationDataError(
            f"{path.name}: input {spec.name!r} expects {spec.describe()} samples stacked along the"
            " first axis, found a scalar"
        )
    length = int(array.shape[0])
    del array

    def gen() -> Iterator[tuple[int, Sample]]:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        for i in range(data.shape[0]):
            yield i, {spec.name: fit_sample(data[i], spec, origin=path.name)}

    return SampleStream(gen, description=str(path), length=length, max_samples=None)


def _npz_members(path: Path) -> dict[str, tuple[int, ...]]:
    """Array names and shapes of an .npz, from the member headers only (no data read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(handle)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(handle)
                shapes[member[: -len(".npy")]] = tuple(int(d) for d in shape)
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz archive ({exc})") from exc
    return shapes


def _open_npz(path: Path, specs: tuple[TensorSpec, ...]) -> SampleStream:
    members = _npz_members(path)
    wanted = {s.name for s in specs}
    missing = sorted(wanted - members.keys())
    extra = sorted(members.keys() - wanted)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing arrays for inputs {missing}")
        if extra:
            parts.append(f"arrays {extra} match no model input")
        raise CalibrationDataError(
            f"{path.name}: array names must equal the model input names"
            f" {sorted(wanted)}: " + "; ".join(parts)
        )
    lengths = {name: shape[0] if shape else 0 for name, shape in members.items()}
    if len(set(lengths.values())) != 1:
        raise CalibrationDataError(
            f"{path.name}: every array needs the same number of samples, found {lengths}"
        )
    length = next(iter(lengths.values()))

    def gen() -> Iterator[tuple[int, Sample]]:
        # Per-array memory bound: an .npz member cannot be memory-mapped, so each input's array
        # is loaded once per pass (never the whole archive at once beyond the model's inputs).
        with np.load(path, allow_pickle=False) as archive:
            arrays = {s.name: archive[s.name] for s in specs}
        for i in range(length):
            yield (
                i,
                {s.name: fit_sample(arrays[s.name][i], s, origin=path.name) for s in specs},
            )

    return SampleStream(gen, description=str(path), length=length, max_samples=None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_columns(
    header: list[str] | None, width: int, skip: tuple[str | int, ...], path: Path
) -> list[int]:
    skipped: set[int] = set()
    for col in skip:
        if isinstance(col, int):
            if not 0 <= col < width:
                raise BadOption(f"{path.name}: skip column {col} out of range (width {width})")
            skipped.add(col)
        else:
            if header is None or col not in header:
                raise BadOption(f"{path.name}: skip column {col!r} not found in the CSV header")
            skipped.add(header.index(col))
    return [i for i in range(width) if i not in skipped]


def _open_csv(path: Path, specs: tuple[TensorSpec, ...], options: CsvOptions) -> SampleStream:
    spec = _single_input(specs, f"{path.name} (CSV)")
    with path.open(newline="") as handle:
        reader = csv.reader(handle, delimiter=options.delimiter)
        first = next(reader, None)
        if first is None:
            raise CalibrationDataError(f"{path}: no samples found (empty CSV)")
        has_header = not all(_is_number(cell) for cell in first if cell.strip())
        length = sum(1 for row in reader if any(cell.strip() for cell in row))
        if not has_header:
            length += 1
    header = [c.strip() for c in first] if has_header else None
    columns = _csv_columns(header, len(first), options.skip_columns, path)

    def gen() -> Iterator[tuple[int, Sample]]:
        with path.open(newline="") as handle:
            reader = csv.reader(handle, delimiter=options.delimiter)
            if has_header:
                next(reader, None)
            index = 0
            for line_no, row in enumerate(reader, start=2 if has_header else 1):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(first):
                    raise CalibrationDataError(
                        f"{path.name} line {line_no}: {len(row)} columns, expected {len(first)}"
                    )
                try:
                    values = np.array([float(row[c]) for c in columns], dtype=np.float64)
                except ValueError as exc:
                    raise CalibrationDataError(
                        f"{path.name} line {line_no}: non-numeric value ({exc})"
                    ) from exc
                if np.issubdtype(spec.dtype, np.integer) and not np.all(values == np.round(values)):
                    raise CalibrationDataError(
                        f"{path.name} line {line_no}: input {spec.name!r} expects"
                        f" {spec.describe()}, found non-integer values"
                    )
                cast = values.astype(spec.dtype) if not spec.is_float else values
                yield index, {spec.name: fit_sample(cast, spec, origin=f"{path.name} row")}
                index += 1

    return SampleStream(gen, description=str(path), length=length, max_samples=None)


def image_layout(spec: TensorSpec, requested: str = "auto") -> Literal["NCHW", "NHWC", "NHW"]:
    """Where the channel axis is, from the input shape: ``[N,C,H,W]``, ``[N,H,W,C]`` or ``[N,H,W]``.

    A dim of 1, 3 or 4 is taken as channels; when both ends look like channels (or neither does
    and both are dynamic) ONNX's usual NCHW is assumed unless ``requested`` says otherwise.
    """
    if spec.shape is None or len(spec.shape) not in (3, 4):
        raise CalibrationDataError(
            f"input {spec.name!r} expects {spec.describe()}; image directories need a rank-4"
            " [N,C,H,W] / [N,H,W,C] or rank-3 [N,H,W] input"
        )
    if len(spec.shape) == 3:
        return "NHW"
    if requested in ("NCHW", "NHWC"):
        return "NCHW" if requested == "NCHW" else "NHWC"
    channel_like = (1, 3, 4)
    first, last = spec.shape[1], spec.shape[3]
    if last in channel_like and first not in channel_like:
        return "NHWC"
    return "NCHW"


def _open_images(path: Path, specs: tuple[TensorSpec, ...], options: ImageOptions) -> SampleStream:
    spec = _single_input(specs, f"{path.name}/ (image directory)")
    try:
        from PIL import Image
    except ImportError as exc:
        raise CalibrationDataError(
            "reading a directory of images needs Pillow (pip install pillow)"
        ) from exc
    layout = image_layout(spec, options.layout)
    assert spec.shape is not None
    if layout == "NCHW":
        c_dim, h_dim, w_dim = spec.shape[1], spec.shape[2], spec.shape[3]
    elif layout == "NHWC":
        h_dim, w_dim, c_dim = spec.shape[1], spec.shape[2], spec.shape[3]
    else:
        c_dim, h_dim, w_dim = 1, spec.shape[1], spec.shape[2]
    if not isinstance(c_dim, int) or c_dim not in (1, 3, 4):
        raise CalibrationDataError(
            f"input {spec.name!r} expects {spec.describe()}: cannot tell the channel count"
            f" ({layout}); images need 1, 3 or 4 channels"
        )
    if isinstance(h_dim, int) and isinstance(w_dim, int):
        height, width = h_dim, w_dim
    elif options.size is not None:
        height, width = options.size
    else:
        raise CalibrationDataError(
            f"input {spec.name!r} expects {spec.describe()} with dynamic height/width; give the"
            " image size to resize to"
        )
    channels = c_dim
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    mean = np.asarray(options.mean if options.mean is not None else [0.0], dtype=np.float32)
    std = np.asarray(options.std if options.std is not None else [1.0], dtype=np.float32)
    for label, vec in (("mean", mean), ("std", std)):
        if vec.size not in (1, channels):
            raise BadOption(f"image {label} needs 1 or {channels} values, got {vec.size}")
    if np.any(std == 0):
        raise BadOption("image std must not contain zeros")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationDataError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    raw = spec.dtype == np.uint8

    def load(file: Path) -> npt.NDArray[Any]:
        try:
            with Image.open(file) as img:
                img_conv = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(img_conv)
        except OSError as exc:
            raise CalibrationDataError(f"{file}: unreadable image ({exc})") from exc
        if pixels.ndim == 2:
            pixels = pixels[:, :, np.newaxis]
        if raw:
            hwc: npt.NDArray[Any] = pixels
        else:
            hwc = (pixels.astype(np.float32) / 255.0 - mean) / std
        if layout == "NCHW":
            return np.transpose(hwc, (2, 0, 1))
        if layout == "NHW":
            return hwc[:, :, 0]
        return hwc

    def gen() -> Iterator[tuple[int, Sample]]:
        for i, file in enumerate(files):
            yield i, {spec.name: fit_sample(load(file), spec, origin=file.name)}

    return SampleStream(gen, description=f"{path}/ (images)", length=len(files), max_samples=None)


def _open_arrays(arrays: Mapping[str, Any], specs: tuple[TensorSpec, ...]) -> SampleStream:
    wanted = {s.name for s in specs}
    if set(arrays) != wanted:
        raise CalibrationDataError(
            f"in-memory data: array names {sorted(arrays)} must equal the model input names"
            f" {sorted(wanted)}"
        )
    data = {name: np.asarray(value) for name, value in arrays.items()}
    lengths = {name: (a.shape[0] if a.ndim else 0) for name, a in data.items()}
    if len(set(lengths.values())) != 1:
        raise CalibrationDataError(
            f"in-memory data: every array needs the same number of samples, found {lengths}"
        )
    length = next(iter(lengths.values()))

    def gen() -> Iterator[tuple[int, Sample]]:
        for i in range(length):
            yield (
                i,
                {s.name: fit_sample(data[s.name][i], s, origin="in-memory data") for s in specs},
            )

    return SampleStream(gen, description="in-memory arrays", length=length, max_samples=None)


def _open_sample_list(
    samples: Sequence[Mapping[str, Any]], specs: tuple[TensorSpec, ...]
) -> SampleStream:
    wanted = {s.name for s in specs}

    def gen() -> Iterator[tuple[int, Sample]]:
        for i, sample in enumerate(samples):
            if set(sample) != wanted:
                raise CalibrationDataError(
                    f"sample {i}: names {sorted(sample)} must equal the model input names"
                    f" {sorted(wanted)}"
                )
            yield i, {s.name: fit_sample(sample[s.name], s, origin=f"sample {i}") for s in specs}

    return SampleStream(gen, description="in-memory samples", length=len(samples), max_samples=None)


def open_samples(
    source: DataSource,
    model: ModelSpec | Sequence[TensorSpec],
    *,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    image: ImageOptions | None = None,
    csv_options: CsvOptions | None = None,
) -> SampleStream:
    """Open ``source`` as a validated, capped :class:`SampleStream` for ``model``'s inputs.

    ``source`` may be a path to an ``.npy`` (single-input model, first axis = samples), an
    ``.npz`` (one array per input name), a ``.csv`` (one row per sample) or a directory of
    images; or in memory: an array (single input), a mapping of arrays, a list of sample dicts,
    or an existing stream (re-capped). Structural problems (missing file, wrong names, wrong
    array rank) are reported here; per-sample problems when the sample is read.
    """
    specs = _specs(model)
    stream: SampleStream
    if isinstance(source, SampleStream):
        stream = SampleStream(
            source.indexed,
            description=source.description,
            length=source.length_hint,
            max_samples=None,
        )
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"data not found: {path}")
        suffix = path.suffix.lower()
        if path.is_dir():
            stream = _open_images(path, specs, image or ImageOptions())
        elif suffix == ".npy":
            stream = _open_npy(path, specs)
        elif suffix == ".npz":
            stream = _open_npz(path, specs)
        elif suffix in (".csv", ".tsv", ".txt"):
            options = csv_options or CsvOptions(delimiter="\t" if suffix == ".tsv" else ",")
            stream = _open_csv(path, specs, options)
        else:
            raise CalibrationDataError(
                f"{path.name}: unsupported data format (use .npy, .npz, .csv or an image directory)"
            )
    elif isinstance(source, np.ndarray):
        spec = _single_input(specs, "a single array")
        stream = _open_arrays({spec.name: source}, specs)
    elif isinstance(source, Mapping):
        stream = _open_arrays(source, specs)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        stream = _open_sample_list(source, specs)
    else:
        raise BadOption(f"unsupported data source type {type(source).__name__}")
    if stream.length_hint == 0:
        raise CalibrationDataError(f"{stream.description}: no samples found")
    # Read the first sample now so that shape/dtype mismatches surface when the data is opened,
    # not halfway through a conversion.
    first = stream.indexed()
    next(first)
    first.close()
    return SampleStream(
        stream.indexed,
        description=stream.description,
        length=stream.length_hint,
        max_samples=max_samples,
    )


# --------------------------------------------------------------------------- split


def _unit_hash(seed: int, index: int) -> float:
    """Deterministic value in [0, 1) for ``index`` (splitmix64: stable across numpy versions)."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & mask
    z = (z + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z / float(1 << 64)


def split_stream(
    stream: SampleStream,
    *,
    validation_fraction: float = 0.25,
    seed: int = 0,
    max_calibration: int | None = DEFAULT_MAX_SAMPLES,
    max_validation: int | None = DEFAULT_MAX_SAMPLES,
) -> tuple[SampleStream, SampleStream]:
    """Split one stream into (calibration, held-out validation), deterministically.

    Each sample goes to validation when a hash of (seed, source index) falls below
    ``validation_fraction``: the split is the same on every pass and every machine, needs no
    look-ahead (streams stay streamed) and is not fooled by data sorted by class. Calibrating
    and validating on the same samples would hide exactly the overfitting of activation ranges
    that measurement is meant to catch.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise BadOption(f"validation_fraction must be in (0, 1), got {validation_fraction}")

    def part(validation: bool) -> Callable[[], Iterator[tuple[int, Sample]]]:
        def gen() -> Iterator[tuple[int, Sample]]:
            for index, sample in stream.indexed():
                if (_unit_hash(seed, index) < validation_fraction) == validation:
                    yield index, sample

        return gen

    def count(validation: bool) -> int | None:
        total = stream.length_hint
        if total is None:
            return None
        return sum(
            1 for i in range(total) if (_unit_hash(seed, i) < validation_fraction) == validation
        )

    calibration = SampleStream(
        part(False),
        description=f"{stream.description} (calibration split)",
        length=count(False),
        max_samples=max_calibration,
    )
    validation = SampleStream(
        part(True),
        description=f"{stream.description} (validation split)",
        length=count(True),
        max_samples=max_validation,
    )
    return calibration, validation


# --------------------------------------------------------------------------- labels


def load_labels(source: LabelSource, *, column: str | int | None = None) -> npt.NDArray[np.int64]:
    """Integer class labels, one per sample of the data source they accompany.

    ``source``: an array-like, an ``.npy``, an ``.npz`` with a ``labels`` array, or a
    ``.csv``/``.txt`` (one label per line, or ``column`` by header name or index). Labels are
    small (one integer per sample), so they are loaded whole.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"labels not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".npy":
            raw: Any = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "labels" not in archive.files:
                    raise CalibrationDataError(f"{path.name}: no array named 'labels'")
                raw = archive["labels"]
        else:
            raw = _labels_from_text(path, column)
    else:
        raw = np.asarray(source)
    labels = np.asarray(raw)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise CalibrationDataError(
            f"labels must be one integer per sample, found shape {tuple(labels.shape)}"
        )
    if labels.size == 0:
        raise CalibrationDataError("labels: no labels found")
    if np.issubdtype(labels.dtype, np.floating) and not np.all(labels == np.round(labels)):
        raise CalibrationDataError("labels must be integer class indices, found fractions")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise CalibrationDataError(f"labels must be integers, found dtype {labels.dtype.name}")
    return labels.astype(np.int64)


def _labels_from_text(path: Path, column: str | int | None) -> list[float]:
    values: list[float] = []
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        index: int | None = column if isinstance(column, int) else None
        for line_no, row in enumerate(reader, start=1):
            cells = [c.strip() for c in row]
            if not any(cells):
                continue
            if index is None:
                if isinstance(column, str):
                    if column not in cells:
                        raise CalibrationDataError(
                            f"{path.name}: label column {column!r} not in header {cells}"
                        )
                    index = cells.index(column)
                    continue
                if len(cells) != 1:
                    raise CalibrationDataError(
                        f"{path.name}: {len(cells)} columns; name the label column"
                    )
                index = 0
            if index >= len(cells):
                raise CalibrationDataError(f"{path.name} line {line_no}: no column {index}")
            if not _is_number(cells[index]):
                if not values and line_no == 1:
                    continue  # a header row
                raise CalibrationDataError(
                    f"{path.name} line {line_no}: label {cells[index]!r} is not a number"
                )
            values.append(float(cells[index]))
    return values
