"""TensorFlow sources for TFLite conversion: Keras ``.keras`` / ``.h5`` files, SavedModel dirs.

Every source is reduced to one thing, a SavedModel directory and the signature to convert, so
that all TFLite recipes drive the same converter (``TFLiteConverter.from_saved_model``) and
produce models with the same signature keys: a Keras model is loaded once and exported to a
private temporary SavedModel, shared by the recipes of a conversion.

TensorFlow is imported only when a source is prepared (it takes seconds) and while it runs its
native logging and Python prints are captured (:func:`captured_output`): the library must not
write to the caller's terminal. TFLite models get their input/output tensors renamed to their
signature keys (:func:`align_io_names`) so that every view of the model agrees on the names.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import struct
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UnsupportedModel

__all__ = [
    "PreparedSource",
    "SourceKind",
    "align_io_names",
    "captured_output",
    "detect_source",
    "first_error_line",
    "import_tensorflow",
    "prepare_source",
]

SourceKind = Literal["keras", "h5", "saved_model"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_KERAS_SUFFIXES = {".keras": "keras", ".h5": "h5", ".hdf5": "h5"}
_NOT_SUPPORTED = {
    ".onnx": "ONNX -> TFLite is not supported (no maintained converter installs beside the"
    " other extras; see docs/convert.md); convert it for ONNX Runtime instead",
    ".pt2": "PyTorch .pt2 -> TFLite is not supported; see docs/convert.md",
    ".pt": "PyTorch .pt -> TFLite is not supported; see docs/convert.md",
    ".tflite": "already a TFLite model: give the Keras or SavedModel source it came from",
}


# --------------------------------------------------------------------------- output capture


def _flush_c_stdio() -> None:
    """Flush C ``stdout``/``stderr`` buffers, so that native output lands in the capture file."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Capture everything TensorFlow writes while the block runs; yields the captured lines.

    Covers Python ``print``/``sys.stderr``, ``warnings`` and native writes to file descriptors
    1 and 2 (TensorFlow's C++ logging, the MLIR converter's diagnostics). The list is filled
    when the block exits, also when it raises, so that an error message can quote it. File
    descriptors are process-wide: output of other threads during the block is captured too.
    """
    lines: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_stdio()
    sink = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally clause below
    saved: list[int] = []
    try:
        for fd in (1, 2):
            try:
                copy = os.dup(fd)
            except OSError:  # no such descriptor (a daemon): nothing to capture there
                saved.append(-1)
                continue
            saved.append(copy)
            os.dup2(sink.fileno(), fd)
        out, err = io.StringIO(), io.StringIO()
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            try:
                yield lines
            finally:
                lines.extend(out.getvalue().splitlines())
                lines.extend(err.getvalue().splitlines())
                lines.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        _flush_c_stdio()
        for fd, copy in zip((1, 2), saved, strict=False):
            if copy >= 0:
                os.dup2(copy, fd)
                os.close(copy)
        sink.seek(0)
        lines.extend(sink.read().decode("utf-8", errors="replace").splitlines())
        sink.close()


def first_error_line(exc: BaseException, captured: list[str] | None = None) -> str:
    """The most informative single line about ``exc``: an ``error:`` line if there is one."""
    text = str(exc).strip()
    candidates = [line.strip() for line in text.splitlines() if line.strip()]
    for line in (*candidates, *(captured or ())):
        if "error:" in line.lower() and "<unknown>:0: note" not in line:
            return str(line).strip()[:400]
    first = candidates[0] if candidates else type(exc).__name__
    return str(first)[:400]


_TF: Any = None


def import_tensorflow() -> Any:
    """Import TensorFlow quietly (once) and return the module."""
    global _TF
    if _TF is None:
        try:
            with captured_output():
                import tensorflow as tf
        except ImportError as exc:
            raise UnsupportedModel(
                f"TFLite conversion needs TensorFlow: pip install 'edgekit[convert,tflite]' ({exc})"
            ) from exc
        _TF = tf
    return _TF


# --------------------------------------------------------------------------- sources


def detect_source(path: str | Path) -> SourceKind:
    """What kind of TensorFlow model ``path`` is, from its layout and first bytes.

    Content is checked, not only the suffix, so that "not a model" fails here with one clear
    line instead of deep inside Keras.
    """
    src = Path(path)
    if not src.exists():
        raise UnsupportedModel(f"model not found: {src}")
    if src.is_dir():
        if (src / "saved_model.pb").is_file() or (src / "saved_model.pbtxt").is_file():
            return "saved_model"
        raise UnsupportedModel(
            f"{src} is a directory without saved_model.pb: not a TensorFlow SavedModel"
        )
    suffix = src.suffix.lower()
    if suffix in _NOT_SUPPORTED:
        raise UnsupportedModel(f"{src.name}: {_NOT_SUPPORTED[suffix]}")
    kind = _KERAS_SUFFIXES.get(suffix)
    if kind is None:
        raise UnsupportedModel(
            f"{src.name}: not a Keras (.keras, .h5) model or a SavedModel directory"
        )
    if kind == "keras" and not zipfile.is_zipfile(src):
        raise UnsupportedModel(f"{src.name} is not a Keras .keras archive (not a zip file)")
    if kind == "h5":
        with src.open("rb") as handle:
            head = handle.read(8)
        if head != _HDF5_MAGIC:
            raise UnsupportedModel(f"{src.name} is not a Keras .h5 file (no HDF5 signature)")
    return kind  # type: ignore[return-value]


@dataclass(frozen=True)
class PreparedSource:
    """A source reduced to a SavedModel directory and the signature the converter uses."""

    kind: SourceKind
    path: Path
    saved_model: Path
    signature_key: str
    notes: tuple[str, ...] = ()

    def converter(self) -> Any:
        """A fresh ``TFLiteConverter`` for this source (recipes configure and run it)."""
        tf = import_tensorflow()
        return tf.lite.TFLiteConverter.from_saved_model(
            str(self.saved_model), signature_keys=[self.signature_key]
        )


# Preparing is deterministic for a given file, so the recipes of one conversion share it; the
# exported SavedModels live in a private temporary directory removed at interpreter exit.
_CACHE: dict[tuple[str, int, int], PreparedSource] = {}
_EXPORT_DIR: tempfile.TemporaryDirectory[str] | None = None


def _export_root() -> Path:
    global _EXPORT_DIR
    if _EXPORT_DIR is None:
        _EXPORT_DIR = tempfile.TemporaryDirectory(prefix="edgekit-tf-")
    return Path(_EXPORT_DIR.name)


def _identity(path: Path) -> tuple[str, int, int]:
    target = path / "saved_model.pb" if path.is_dir() else path
    if path.is_dir() and not target.exists():
        target = path / "saved_model.pbtxt"
    stat = target.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _signature_key(saved_model: Path, label: str) -> str:
    tf = import_tensorflow()
    try:
        with captured_output():
            loaded = tf.saved_model.load(str(saved_model))
            keys = sorted(loaded.signatures.keys())
    except Exception as exc:
        raise UnsupportedModel(
            f"{label} does not load as a SavedModel: {first_error_line(exc)}"
        ) from exc
    if "serving_default" in keys:
        return "serving_default"
    if len(keys) == 1:
        return str(keys[0])
    if not keys:
        raise UnsupportedModel(f"{label}: the SavedModel has no signatures to convert")
    raise UnsupportedModel(
        f"{label}: the SavedModel has signatures {keys} and none is serving_default; export the"
        " one to convert as serving_default"
    )


def _export_keras(src: Path, kind: SourceKind) -> Path:
    tf = import_tensorflow()
    keras = tf.keras
    captured: list[str] = []
    try:
        with captured_output() as captured:
            model = keras.models.load_model(str(src), compile=False)
    except Exception as exc:
        raise UnsupportedModel(
            f"{src.name} does not load in Keras: {first_error_line(exc, captured)}"
        ) from exc
    target = Path(tempfile.mkdtemp(prefix="saved_model-", dir=_export_root()))
    try:
        with captured_output() as captured:
            model.export(str(target), format="tf_saved_model", verbose=False)
    except Exception as exc:
        raise UnsupportedModel(
            f"{src.name}: the Keras model cannot be exported for conversion:"
            f" {first_error_line(exc, captured)}"
        ) from exc
    return target


def prepare_source(path: str | Path) -> PreparedSource:
    """Check ``path`` and reduce it to a SavedModel + signature (cached per file version)."""
    src = Path(path)
    kind = detect_source(src)
    key = _identity(src)
    cached = _CACHE.get(key)
    if cached is not None and cached.saved_model.exists():
        return cached
    if kind == "saved_model":
        saved_model = src
        notes: tuple[str, ...] = ()
    else:
        saved_model = _export_keras(src, kind)
        notes = (f"{kind} model exported to a SavedModel for conversion",)
    # Keras exports serve exactly one signature, serving_default; loading it again is not needed.
    signature = (
        _signature_key(saved_model, src.name) if kind == "saved_model" else "serving_default"
    )
    prepared = PreparedSource(
        kind=kind, path=src, saved_model=saved_model, signature_key=signature, notes=notes
    )
    _CACHE[key] = prepared
    return prepared


# --------------------------------------------------------------------------- names


def _u32(buf: bytes | bytearray, pos: int) -> int:
    return int(struct.unpack_from("<I", buf, pos)[0])


def _field(buf: bytes | bytearray, table: int, index: int) -> int:
    """Absolute position of field ``index`` of the table at ``table`` (0 when absent)."""
    vtable = table - int(struct.unpack_from("<i", buf, table)[0])
    vt_size = int(struct.unpack_from("<H", buf, vtable)[0])
    slot = 4 + 2 * index
    if slot >= vt_size:
        return 0
    offset = int(struct.unpack_from("<H", buf, vtable + slot)[0])
    return table + offset if offset else 0


def _deref(buf: bytes | bytearray, pos: int) -> int:
    return pos + _u32(buf, pos)


def _vector(buf: bytes | bytearray, table: int, index: int) -> tuple[int, int]:
    """(position of the first element, length) of a vector field; (0, 0) when absent."""
    pos = _field(buf, table, index)
    if not pos:
        return 0, 0
    vec = _deref(buf, pos)
    return vec + 4, _u32(buf, vec)


# TFLite schema field indexes (tensorflow/compiler/mlir/lite/schema/schema.fbs).
_MODEL_SUBGRAPHS, _MODEL_SIGNATURE_DEFS = 2, 7
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 0, 1, 2
_TENSOR_NAME = 3
_SIGNATURE_INPUTS, _SIGNATURE_OUTPUTS, _SIGNATURE_SUBGRAPH = 0, 1, 4
_TENSORMAP_NAME, _TENSORMAP_INDEX = 0, 1


def _string_at(buf: bytes | bytearray, table: int, index: int) -> tuple[int, str] | None:
    pos = _field(buf, table, index)
    if not pos:
        return None
    start = _deref(buf, pos)
    length = _u32(buf, start)
    return start, bytes(buf[start + 4 : start + 4 + length]).decode("utf-8", errors="replace")


def align_io_names(content: bytes) -> tuple[bytes, dict[str, str]]:
    """Rename the model's input/output tensors to their signature keys, in place.

    Why: a TFLite model names its I/O twice, by tensor (``serving_default_image:0``) and by
    signature key (``image``). The device agent reports signature keys, the bundle manifest is
    read from tensor names: after this both are the signature keys, so a golden set, a manifest
    and a device all speak of the same tensors.

    How: only when the model has one signature covering exactly subgraph 0's inputs and
    outputs with distinct keys, and only when every key fits in the bytes of the old name (a
    flatbuffer string is rewritten in place: same file size, no offset moves, weights untouched).
    Otherwise the model is returned unchanged. Returns the model and ``{old: new}``.
    """
    buf = bytearray(content)
    try:
        root = _deref(buf, 0)
        sig_start, sig_count = _vector(buf, root, _MODEL_SIGNATURE_DEFS)
        sub_start, sub_count = _vector(buf, root, _MODEL_SUBGRAPHS)
        if sig_count != 1 or sub_count < 1:
            return content, {}
        signature = _deref(buf, sig_start)
        subgraph_index_pos = _field(buf, signature, _SIGNATURE_SUBGRAPH)
        if subgraph_index_pos and _u32(buf, subgraph_index_pos) != 0:
            return content, {}
        keys: dict[int, str] = {}
        for field_index in (_SIGNATURE_INPUTS, _SIGNATURE_OUTPUTS):
            start, count = _vector(buf, signature, field_index)
            for i in range(count):
                entry = _deref(buf, start + 4 * i)
                name = _string_at(buf, entry, _TENSORMAP_NAME)
                index_pos = _field(buf, entry, _TENSORMAP_INDEX)
                if name is None:
                    return content, {}
                keys[_u32(buf, index_pos) if index_pos else 0] = name[1]
        subgraph = _deref(buf, sub_start)
        io_indexes: list[int] = []
        for field_index in (_SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS):
            start, count = _vector(buf, subgraph, field_index)
            io_indexes += [
                int(struct.unpack_from("<i", buf, start + 4 * i)[0]) for i in range(count)
            ]
        if set(io_indexes) != set(keys) or len(set(keys.values())) != len(keys):
            return content, {}
        tensors_start, tensors_count = _vector(buf, subgraph, _SUBGRAPH_TENSORS)
        edits: list[tuple[int, str, str]] = []
        for index, key in keys.items():
            if not 0 <= index < tensors_count:
                return content, {}
            tensor = _deref(buf, tensors_start + 4 * index)
            current = _string_at(buf, tensor, _TENSOR_NAME)
            if current is None:
                return content, {}
            position, old = current
            if old == key:
                continue
            if len(key.encode()) > len(old.encode()):
                return content, {}
            edits.append((position, old, key))
    except (struct.error, IndexError):
        return content, {}
    for position, _old, new in edits:
        encoded = new.encode()
        old_length = _u32(buf, position)
        struct.pack_into("<I", buf, position, len(encoded))
        # New bytes, then zeros over the rest of the old string (flatbuffer strings end in 0).
        buf[position + 4 : position + 4 + old_length + 1] = encoded + bytes(
            old_length + 1 - len(encoded)
        )
    return bytes(buf), {old: new for _, old, new in edits}
