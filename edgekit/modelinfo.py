"""Introspect a model file (ONNX or TFLite) and report its inputs and outputs.

``edgekit sign MODEL`` writes what this module finds into the bundle manifest, so the device can
check a bundle against the runtime it has before installing it. The signing path also runs on
small boards (a Raspberry Pi Zero has 512 MiB of memory and no wheels for onnx or tensorflow), so
this module uses the standard library only:

* ONNX models are protobuf messages that can be several GiB large (weights are inline). A small
  streaming protobuf reader walks ``ModelProto`` with seeks and reads only the few fields that
  describe the graph interface; node lists and weight payloads are skipped without being read, so
  memory stays constant whatever the file size.
* TFLite models are flatbuffers. The file is memory-mapped and the few tables needed are decoded
  with :mod:`struct`, bounds-checking every offset first.

Every failure (unknown format, truncated or corrupt file, unsupported feature, I/O error) is
raised as :class:`edgekit.errors.ModelInfoError` with a one-line message naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NoReturn

from edgekit.errors import ModelInfoError

__all__ = [
    "RUNTIME_ONNX",
    "RUNTIME_TFLITE",
    "ModelInfo",
    "TensorInfo",
    "detect_runtime",
    "read_model_info",
]

RUNTIME_ONNX = "onnxruntime"
RUNTIME_TFLITE = "tflite"
_RUNTIMES = (RUNTIME_ONNX, RUNTIME_TFLITE)

Dim = int | str | None


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output, in runtime-neutral terms (numpy dtype names)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    quantization: dict[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict; ``quantization`` only appears for quantized tensors."""
        out: dict[str, object] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantization is not None:
            out["quantization"] = {
                key: list(value) if isinstance(value, (list, tuple)) else value
                for key, value in self.quantization.items()
            }
        return out


@dataclass(frozen=True)
class ModelInfo:
    """What a model expects and produces, plus format metadata for the manifest."""

    runtime: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opsets: dict[str, int]
    details: dict[str, object]


# --------------------------------------------------------------------------------------------
# Format detection


_TFLITE_IDENTIFIER = b"TFL3"
_ORT_IDENTIFIER = b"ORTM"
_ONNX_SUFFIX = ".onnx"
_ORT_SUFFIX = ".ort"


def detect_runtime(path: str | os.PathLike[str]) -> str:
    """Return :data:`RUNTIME_TFLITE` or :data:`RUNTIME_ONNX` for the model at ``path``.

    TFLite is recognised by content (the flatbuffer file identifier), because ``.tflite`` files
    are often renamed. ONNX protobufs carry no magic number, so they are accepted only with a
    ``.onnx`` extension *and* a first field that fits ``ModelProto``; guessing protobuf for any
    file would misreport random data as a model.
    """
    label = os.fspath(path)
    suffix = os.path.splitext(label)[1].lower()
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = os.fstat(fh.fileno()).st_size
            if len(head) >= 8 and head[4:8] == _TFLITE_IDENTIFIER:
                return RUNTIME_TFLITE
            if (len(head) >= 8 and head[4:8] == _ORT_IDENTIFIER) or suffix == _ORT_SUFFIX:
                _fail(label, "ORT format models are not supported (expected a .onnx protobuf)")
            if suffix == _ONNX_SUFFIX:
                _check_onnx_start(fh, size, label)
                return RUNTIME_ONNX
    except OSError as exc:
        _fail_os(label, exc)
    _fail(
        label,
        "unknown model format (expected a TFLite flatbuffer with identifier TFL3 "
        "or an ONNX protobuf with a .onnx extension)",
    )


def read_model_info(path: str | os.PathLike[str], runtime: str | None = None) -> ModelInfo:
    """Read the inputs, outputs and format metadata of the model at ``path``.

    ``runtime`` skips detection when the caller already knows the format (for example a
    ``.onnx`` file saved under another name); ``None`` means :func:`detect_runtime`.
    """
    label = os.fspath(path)
    if runtime is None:
        runtime = detect_runtime(path)
    if runtime == RUNTIME_ONNX:
        return _read_onnx(path, label)
    if runtime == RUNTIME_TFLITE:
        return _read_tflite(path, label)
    _fail(label, f"unsupported runtime {runtime!r} (expected one of {', '.join(_RUNTIMES)})")


def _fail(label: str, message: str) -> NoReturn:
    raise ModelInfoError(f"{label}: {message}")


def _fail_os(label: str, exc: OSError) -> NoReturn:
    reason = exc.strerror or exc.__class__.__name__
    raise ModelInfoError(f"{label}: cannot read model file: {reason}") from exc


def _signed64(value: int) -> int:
    """Reinterpret a protobuf varint as int64 (negative values are sign-extended to 64 bits)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# --------------------------------------------------------------------------------------------
# ONNX: a streaming protobuf reader

_WIRE_VARINT = 0
_WIRE_FIXED64 = 1
_WIRE_LEN = 2
_WIRE_FIXED32 = 5

# The window the reader keeps in memory. Seeks past it are free, reads refill it.
_CHUNK = 64 * 1024
# Names, domains and producer strings are short; a longer one means corruption, and capping it
# keeps memory constant even for a hostile file.
_MAX_STRING = 1024 * 1024

# ModelProto fields and their wire types, used to recognise the start of an ONNX file.
_MODEL_FIELD_WIRE = {
    1: _WIRE_VARINT,  # ir_version
    2: _WIRE_LEN,  # producer_name
    3: _WIRE_LEN,  # producer_version
    4: _WIRE_LEN,  # domain
    5: _WIRE_VARINT,  # model_version
    6: _WIRE_LEN,  # doc_string
    7: _WIRE_LEN,  # graph
    8: _WIRE_LEN,  # opset_import
    14: _WIRE_LEN,  # metadata_props
    20: _WIRE_LEN,  # training_info
    25: _WIRE_LEN,  # functions
    26: _WIRE_LEN,  # configuration
}

# TensorProto.DataType -> numpy dtype name (ml_dtypes names for types numpy lacks).
_ONNX_DTYPES = {
    0: "undefined",
    1: "float32",
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    8: "string",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    14: "complex64",
    15: "complex128",
    16: "bfloat16",
    17: "float8_e4m3fn",
    18: "float8_e4m3fnuz",
    19: "float8_e5m2",
    20: "float8_e5m2fnuz",
    21: "uint4",
    22: "int4",
    23: "float4_e2m1fn",
    24: "float8_e8m0fnu",
    25: "uint2",
    26: "int2",
    27: "float6_e2m3fn",
    28: "float6_e3m2fn",
}

# TypeProto value fields other than tensor_type: reported by kind, without element details.
_ONNX_OTHER_TYPES = {4: "sequence", 5: "map", 7: "opaque", 8: "sparse_tensor", 9: "optional"}


class _Stream:
    """Random-access reader over a file that keeps only a small window in memory.

    ``pos`` may be moved freely (that is how payloads are skipped); the next read after a jump
    outside the window costs one seek and one read of at most :data:`_CHUNK` bytes (or the
    requested length, which callers cap).
    """

    def __init__(self, fh: BinaryIO, size: int, label: str) -> None:
        self._fh = fh
        self.size = size
        self.label = label
        self.pos = 0
        self._buf = b""
        self._buf_start = 0

    def fail(self, message: str) -> NoReturn:
        _fail(self.label, f"malformed ONNX protobuf at byte {self.pos}: {message}")

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > self.size:
            self.fail("truncated (a field runs past the end of the file)")
        offset = self.pos - self._buf_start
        if offset < 0 or end > self._buf_start + len(self._buf):
            try:
                self._fh.seek(self.pos)
                self._buf = self._fh.read(max(n, _CHUNK))
            except OSError as exc:
                _fail_os(self.label, exc)
            self._buf_start = self.pos
            offset = 0
            if len(self._buf) < n:
                self.fail("truncated (the file ended early)")
        self.pos = end
        return self._buf[offset : offset + n]

    def varint(self) -> int:
        result = 0
        for shift in range(0, 70, 7):
            byte = self.read(1)[0]
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result & 0xFFFF_FFFF_FFFF_FFFF
        self.fail("varint longer than 10 bytes")

    def string(self, n: int, what: str) -> str:
        if n > _MAX_STRING:
            self.fail(f"{what} is {n} bytes long (limit {_MAX_STRING})")
        raw = self.read(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def fields(self, end: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(field_number, wire_type, value)`` for the message in ``[pos, end)``.

        For length-delimited fields ``value`` is the payload length and ``pos`` is at the payload
        start; whatever the consumer reads of it, the stream resumes after the payload, so not
        reading a payload skips it with a seek.
        """
        while self.pos < end:
            key = self.varint()
            field, wire = key >> 3, key & 7
            if field == 0:
                self.fail("field number 0")
            payload_end = -1
            if wire == _WIRE_VARINT:
                value = self.varint()
            elif wire == _WIRE_FIXED64:
                value = int.from_bytes(self.read(8), "little")
            elif wire == _WIRE_FIXED32:
                value = int.from_bytes(self.read(4), "little")
            elif wire == _WIRE_LEN:
                value = self.varint()
                payload_end = self.pos + value
                if payload_end > end:
                    self.fail(f"field {field} is {value} bytes long, past the end of its message")
            else:
                self.fail(f"unsupported wire type {wire} in field {field}")
            if self.pos > end:
                self.fail(f"field {field} runs past the end of its message")
            yield field, wire, value
            if payload_end >= 0:
                self.pos = payload_end

    def expect(self, field: int, wire: int, expected: int, message: str) -> None:
        if wire != expected:
            self.fail(f"{message} field {field} has wire type {wire}, expected {expected}")


def _check_onnx_start(fh: BinaryIO, size: int, label: str) -> None:
    """Fail unless the file starts with a plausible ``ModelProto`` field."""
    if size == 0:
        _fail(label, "empty file (expected an ONNX ModelProto protobuf)")
    stream = _Stream(fh, size, label)
    try:
        key = stream.varint()
        field, wire = key >> 3, key & 7
        ok = _MODEL_FIELD_WIRE.get(field) == wire
        if ok and wire == _WIRE_LEN:
            ok = stream.varint() <= size - stream.pos
        elif ok:
            stream.varint()
    except ModelInfoError:
        ok = False
    if not ok:
        _fail(label, "not an ONNX model (the file does not start with a ModelProto field)")


@dataclass
class _GraphAccumulator:
    """Repeated graph fields; protobuf merges repeated occurrences of a message, so do we."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    initializer_names: set[str]
    seen: bool = False


def _read_onnx(path: str | os.PathLike[str], label: str) -> ModelInfo:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                _fail(label, "empty file (expected an ONNX ModelProto protobuf)")
            return _parse_model(_Stream(fh, size, label))
    except OSError as exc:
        _fail_os(label, exc)


def _parse_model(s: _Stream) -> ModelInfo:
    ir_version = 0
    producer_name = ""
    producer_version = ""
    opsets: dict[str, int] = {}
    graph = _GraphAccumulator([], [], set())
    for field, wire, value in s.fields(s.size):
        expected = _MODEL_FIELD_WIRE.get(field)
        if expected is None:
            continue  # unknown or uninteresting field: already skipped
        s.expect(field, wire, expected, "ModelProto")
        if field == 1:
            ir_version = _signed64(value)
        elif field == 2:
            producer_name = s.string(value, "producer_name")
        elif field == 3:
            producer_version = s.string(value, "producer_version")
        elif field == 7:
            _parse_graph(s, s.pos + value, graph)
        elif field == 8:
            domain, version = _parse_opset(s, s.pos + value)
            opsets[domain] = version
    if not graph.seen:
        _fail(s.label, "ONNX model has no graph")
    # Older IR versions list every initializer as a graph input too; runtimes do not expect
    # callers to feed those, so the manifest should not list them.
    inputs = tuple(t for t in graph.inputs if t.name not in graph.initializer_names)
    return ModelInfo(
        runtime=RUNTIME_ONNX,
        inputs=inputs,
        outputs=tuple(graph.outputs),
        opsets=opsets,
        details={
            "ir_version": ir_version,
            "producer_name": producer_name,
            "producer_version": producer_version,
        },
    )


def _parse_opset(s: _Stream, end: int) -> tuple[str, int]:
    domain = ""
    version = 0
    for field, wire, value in s.fields(end):
        if field == 1:
            s.expect(field, wire, _WIRE_LEN, "OperatorSetIdProto")
            domain = s.string(value, "opset domain")
        elif field == 2:
            s.expect(field, wire, _WIRE_VARINT, "OperatorSetIdProto")
            version = _signed64(value)
    return (domain or "ai.onnx"), version


def _parse_graph(s: _Stream, end: int, graph: _GraphAccumulator) -> None:
    graph.seen = True
    for field, wire, value in s.fields(end):
        # node (1), sparse_initializer (15), value_info, doc_string...: skipped by seeking.
        if field == 5:
            s.expect(field, wire, _WIRE_LEN, "GraphProto")
            name = _parse_initializer_name(s, s.pos + value)
            if name is not None:
                graph.initializer_names.add(name)
        elif field in (11, 12):
            s.expect(field, wire, _WIRE_LEN, "GraphProto")
            info = _parse_value_info(s, s.pos + value)
            (graph.inputs if field == 11 else graph.outputs).append(info)


def _parse_initializer_name(s: _Stream, end: int) -> str | None:
    """Return ``TensorProto.name``; the weights around it (raw_data...) are never read."""
    name: str | None = None
    for field, wire, value in s.fields(end):
        if field == 8:
            s.expect(field, wire, _WIRE_LEN, "TensorProto")
            name = s.string(value, "initializer name")
    return name


def _parse_value_info(s: _Stream, end: int) -> TensorInfo:
    name = ""
    dtype = "undefined"
    shape: tuple[Dim, ...] = ()
    for field, wire, value in s.fields(end):
        if field == 1:
            s.expect(field, wire, _WIRE_LEN, "ValueInfoProto")
            name = s.string(value, "value name")
        elif field == 2:
            s.expect(field, wire, _WIRE_LEN, "ValueInfoProto")
            dtype, shape = _parse_type(s, s.pos + value)
    return TensorInfo(name=name, dtype=dtype, shape=shape)


def _parse_type(s: _Stream, end: int) -> tuple[str, tuple[Dim, ...]]:
    dtype = "undefined"
    shape: tuple[Dim, ...] = ()
    for field, wire, value in s.fields(end):
        if field == 1:
            s.expect(field, wire, _WIRE_LEN, "TypeProto")
            dtype, shape = _parse_tensor_type(s, s.pos + value)
        elif field in _ONNX_OTHER_TYPES:
            dtype, shape = _ONNX_OTHER_TYPES[field], ()
    return dtype, shape


def _parse_tensor_type(s: _Stream, end: int) -> tuple[str, tuple[Dim, ...]]:
    elem_type = 0
    dims: list[Dim] = []
    for field, wire, value in s.fields(end):
        if field == 1:
            s.expect(field, wire, _WIRE_VARINT, "TypeProto.Tensor")
            elem_type = _signed64(value)
        elif field == 2:
            s.expect(field, wire, _WIRE_LEN, "TypeProto.Tensor")
            dims.extend(_parse_shape(s, s.pos + value))
    dtype = _ONNX_DTYPES.get(elem_type, f"onnx_type_{elem_type}")
    return dtype, tuple(dims)


def _parse_shape(s: _Stream, end: int) -> Iterator[Dim]:
    for field, wire, value in s.fields(end):
        if field == 1:
            s.expect(field, wire, _WIRE_LEN, "TensorShapeProto")
            yield _parse_dim(s, s.pos + value)


def _parse_dim(s: _Stream, end: int) -> Dim:
    dim: Dim = None
    for field, wire, value in s.fields(end):
        if field == 1:
            s.expect(field, wire, _WIRE_VARINT, "Dimension")
            dim = _signed64(value)
        elif field == 2:
            s.expect(field, wire, _WIRE_LEN, "Dimension")
            dim = s.string(value, "dim_param") or None
    return dim


# --------------------------------------------------------------------------------------------
# TFLite: a bounds-checked flatbuffer reader

# TensorType -> numpy dtype name (ml_dtypes names for types numpy lacks).
_TFLITE_DTYPES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    5: "string",
    6: "bool",
    7: "int16",
    8: "complex64",
    9: "int8",
    10: "float64",
    11: "complex128",
    12: "uint64",
    13: "resource",
    14: "variant",
    15: "uint32",
    16: "uint16",
    17: "int4",
    18: "bfloat16",
    19: "int2",
    20: "uint4",
    21: "float8_e4m3fn",
    22: "float8_e5m2",
}

# BuiltinOperator names by enum value (0..209, contiguous in the schema), space-separated.
_TFLITE_OP_NAMES = (
    "ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE "
    "EMBEDDING_LOOKUP FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D "
    "LOCAL_RESPONSE_NORMALIZATION LOGISTIC LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU "
    "RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF TANH "
    "CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD "
    "UNIDIRECTIONAL_SEQUENCE_RNN GATHER BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB "
    "DIV SQUEEZE UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE BIDIRECTIONAL_SEQUENCE_RNN EXP "
    "TOPK_V2 SPLIT LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM ARG_MAX "
    "MINIMUM LESS NEG PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV "
    "SPARSE_TO_DENSE TILE EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN "
    "FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK "
    "REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL FLOOR_MOD RANGE "
    "RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL "
    "REVERSE_V2 ADD_N GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE "
    "MATRIX_SET_DIAG ROUND HARD_SWISH IF WHILE NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 "
    "SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES "
    "CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D IMAG REAL COMPLEX_ABS HASHTABLE "
    "HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL CONV_3D_TRANSPOSE VAR_HANDLE "
    "READ_VARIABLE ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL BUCKETIZE "
    "RANDOM_UNIFORM MULTINOMIAL GELU DYNAMIC_UPDATE_SLICE RELU_0_TO_1 UNSORTED_SEGMENT_PROD "
    "UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2 UNSORTED_SEGMENT_MIN SIGN BITCAST "
    "BITWISE_XOR RIGHT_SHIFT STABLEHLO_LOGISTIC STABLEHLO_ADD STABLEHLO_DIVIDE "
    "STABLEHLO_MULTIPLY STABLEHLO_MAXIMUM STABLEHLO_RESHAPE STABLEHLO_CLAMP "
    "STABLEHLO_CONCATENATE STABLEHLO_BROADCAST_IN_DIM STABLEHLO_CONVOLUTION STABLEHLO_SLICE "
    "STABLEHLO_CUSTOM_CALL STABLEHLO_REDUCE STABLEHLO_ABS STABLEHLO_AND STABLEHLO_COSINE "
    "STABLEHLO_EXPONENTIAL STABLEHLO_FLOOR STABLEHLO_LOG STABLEHLO_MINIMUM STABLEHLO_NEGATE "
    "STABLEHLO_OR STABLEHLO_POWER STABLEHLO_REMAINDER STABLEHLO_RSQRT STABLEHLO_SELECT "
    "STABLEHLO_SUBTRACT STABLEHLO_TANH STABLEHLO_SCATTER STABLEHLO_COMPARE STABLEHLO_CONVERT "
    "STABLEHLO_DYNAMIC_SLICE STABLEHLO_DYNAMIC_UPDATE_SLICE STABLEHLO_PAD STABLEHLO_IOTA "
    "STABLEHLO_DOT_GENERAL STABLEHLO_REDUCE_WINDOW STABLEHLO_SORT STABLEHLO_WHILE "
    "STABLEHLO_GATHER STABLEHLO_TRANSPOSE DILATE STABLEHLO_RNG_BIT_GENERATOR REDUCE_WINDOW "
    "STABLEHLO_COMPOSITE STABLEHLO_SHIFT_LEFT STABLEHLO_CBRT STABLEHLO_CASE"
)
_TFLITE_OPS = tuple(_TFLITE_OP_NAMES.split())
_TFLITE_CUSTOM_OP = 32

# Field ids (vtable slots) from the TFLite schema (tensorflow/compiler/mlir/lite/schema).
_MODEL_VERSION, _MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS = 0, 1, 2
_MODEL_DESCRIPTION, _MODEL_BUFFERS = 3, 4
_OPCODE_DEPRECATED_BUILTIN, _OPCODE_CUSTOM, _OPCODE_BUILTIN = 0, 1, 3
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 0, 1, 2
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_QUANTIZATION = 0, 1, 3, 4
_TENSOR_SHAPE_SIGNATURE = 7
_QUANT_SCALE, _QUANT_ZERO_POINT, _QUANT_DIMENSION = 2, 3, 6
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2

_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Flatbuffer:
    """Bounds-checked access to a flatbuffer held in ``buf`` (bytes or an mmap).

    Every read checks its range first, so a corrupt offset becomes a :class:`ModelInfoError`
    rather than a ``struct.error`` or a read of unrelated memory. The reader never follows
    references recursively and every loop is bounded by a vector length that itself fits in the
    file, so parsing always terminates.
    """

    def __init__(self, buf: bytes | mmap.mmap, label: str) -> None:
        self._buf = buf
        self.size = len(buf)
        self.label = label

    def fail(self, message: str) -> NoReturn:
        _fail(self.label, f"malformed TFLite flatbuffer: {message}")

    def check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.fail(f"offset {offset} (+{length} bytes) is outside the {self.size}-byte file")

    def unpack(self, fmt: struct.Struct, offset: int) -> int:
        self.check(offset, fmt.size)
        value: int = fmt.unpack_from(self._buf, offset)[0]
        return value

    def unpack_array(self, fmt: str, offset: int, count: int) -> tuple[float | int, ...]:
        item = struct.calcsize("<" + fmt)
        self.check(offset, item * count)
        return struct.unpack_from(f"<{count}{fmt}", self._buf, offset)

    def raw(self, offset: int, length: int) -> bytes:
        self.check(offset, length)
        return bytes(self._buf[offset : offset + length])

    def deref(self, offset: int) -> int:
        """Follow the uoffset stored at ``offset`` (offsets are relative to where they sit)."""
        return offset + self.unpack(_U32, offset)

    def table(self, offset: int) -> _Table:
        vtable = offset - self.unpack(_I32, offset)
        vtable_size = self.unpack(_U16, vtable)
        if vtable_size < 4 or vtable_size % 2:
            self.fail(f"bad vtable size {vtable_size} at offset {vtable}")
        self.check(vtable, vtable_size)
        return _Table(self, offset, vtable, vtable_size)


class _Table:
    """One flatbuffer table: field lookup through its vtable, with schema defaults."""

    def __init__(self, fb: _Flatbuffer, offset: int, vtable: int, vtable_size: int) -> None:
        self._fb = fb
        self._offset = offset
        self._vtable = vtable
        self._vtable_size = vtable_size

    def _field(self, field_id: int) -> int | None:
        slot = 4 + 2 * field_id
        if slot >= self._vtable_size:
            return None
        relative = self._fb.unpack(_U16, self._vtable + slot)
        return self._offset + relative if relative else None

    def scalar(self, field_id: int, fmt: struct.Struct, default: int = 0) -> int:
        offset = self._field(field_id)
        return default if offset is None else self._fb.unpack(fmt, offset)

    def table(self, field_id: int) -> _Table | None:
        offset = self._field(field_id)
        return None if offset is None else self._fb.table(self._fb.deref(offset))

    def vector(self, field_id: int, item_size: int) -> tuple[int, int] | None:
        """Return ``(first_item_offset, length)`` of a vector field, checked to fit the file."""
        offset = self._field(field_id)
        if offset is None:
            return None
        start = self._fb.deref(offset)
        length = self._fb.unpack(_U32, start)
        self._fb.check(start + 4, length * item_size)
        return start + 4, length

    def scalars(self, field_id: int, fmt: str) -> tuple[float | int, ...] | None:
        found = self.vector(field_id, struct.calcsize("<" + fmt))
        return None if found is None else self._fb.unpack_array(fmt, found[0], found[1])

    def tables(self, field_id: int) -> Iterator[_Table]:
        found = self.vector(field_id, 4)
        if found is None:
            return
        start, length = found
        for index in range(length):
            yield self._fb.table(self._fb.deref(start + 4 * index))

    def string(self, field_id: int, what: str) -> str | None:
        found = self.vector(field_id, 1)
        if found is None:
            return None
        try:
            return self._fb.raw(found[0], found[1]).decode("utf-8")
        except UnicodeDecodeError:
            self._fb.fail(f"{what} is not valid UTF-8")


def _read_tflite(path: str | os.PathLike[str], label: str) -> ModelInfo:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                _fail(label, f"truncated TFLite file ({size} bytes)")
            try:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError, OverflowError):
                # No mmap (some filesystems, 32-bit address space): the runtime would load the
                # whole file anyway, so reading it is no worse.
                return _parse_tflite(_Flatbuffer(fh.read(), label))
            with mapped:
                return _parse_tflite(_Flatbuffer(mapped, label))
    except OSError as exc:
        _fail_os(label, exc)


def _parse_tflite(fb: _Flatbuffer) -> ModelInfo:
    if fb.raw(4, 4) != _TFLITE_IDENTIFIER:
        fb.fail("missing the TFL3 file identifier")
    model = fb.table(fb.deref(0))
    version = model.scalar(_MODEL_VERSION, _U32)
    description = model.string(_MODEL_DESCRIPTION, "description") or ""
    operator_codes = [_operator_name(code) for code in model.tables(_MODEL_OPERATOR_CODES)]
    _check_buffers(fb, model)
    subgraphs = model.vector(_MODEL_SUBGRAPHS, 4)
    if subgraphs is None or subgraphs[1] == 0:
        fb.fail("the model has no subgraph")
    subgraph = fb.table(fb.deref(subgraphs[0]))
    tensors = subgraph.vector(_SUBGRAPH_TENSORS, 4)
    count = 0 if tensors is None else tensors[1]

    def io_tensors(field_id: int, what: str) -> tuple[TensorInfo, ...]:
        indices = subgraph.scalars(field_id, "i") or ()
        out = []
        for index in indices:
            if tensors is None or not 0 <= int(index) < count:
                fb.fail(f"{what} tensor index {index} is out of range (subgraph has {count})")
            out.append(_tensor_info(fb, fb.table(fb.deref(tensors[0] + 4 * int(index)))))
        return tuple(out)

    return ModelInfo(
        runtime=RUNTIME_TFLITE,
        inputs=io_tensors(_SUBGRAPH_INPUTS, "input"),
        outputs=io_tensors(_SUBGRAPH_OUTPUTS, "output"),
        opsets={},
        details={
            "version": version,
            "description": description,
            "subgraphs": subgraphs[1],
            "operator_codes": operator_codes,
        },
    )


def _operator_name(code: _Table) -> str:
    # Codes above 127 do not fit the old int8 field, which then holds a placeholder (127); the
    # real code is the larger of the two fields.
    builtin = max(code.scalar(_OPCODE_DEPRECATED_BUILTIN, _I8), code.scalar(_OPCODE_BUILTIN, _I32))
    if builtin == _TFLITE_CUSTOM_OP:
        return "CUSTOM:" + (code.string(_OPCODE_CUSTOM, "custom op name") or "")
    if 0 <= builtin < len(_TFLITE_OPS):
        return _TFLITE_OPS[builtin]
    return f"BUILTIN_{builtin}"


def _check_buffers(fb: _Flatbuffer, model: _Table) -> None:
    """Check that every weight buffer lies inside the file: this catches truncated files.

    Large models keep weights after the flatbuffer proper (``offset``/``size``, offset > 1), so a
    truncated file can have an intact flatbuffer and still be unusable.
    """
    for buffer in model.tables(_MODEL_BUFFERS):
        buffer.vector(_BUFFER_DATA, 1)
        offset = buffer.scalar(_BUFFER_OFFSET, _U64)
        size = buffer.scalar(_BUFFER_SIZE, _U64)
        if offset > 1 and offset + size > fb.size:
            fb.fail(f"buffer at offset {offset} (+{size} bytes) runs past the end of the file")


def _tensor_info(fb: _Flatbuffer, tensor: _Table) -> TensorInfo:
    name = tensor.string(_TENSOR_NAME, "tensor name") or ""
    type_code = tensor.scalar(_TENSOR_TYPE, _I8)
    dtype = _TFLITE_DTYPES.get(type_code, f"tflite_type_{type_code}")
    signature = tensor.scalars(_TENSOR_SHAPE_SIGNATURE, "i")
    dims = signature if signature is not None else tensor.scalars(_TENSOR_SHAPE, "i") or ()
    # shape_signature marks dynamic dims with -1; the plain shape holds 1 for them instead.
    shape = tuple(int(d) if int(d) >= 0 else None for d in dims)
    return TensorInfo(name=name, dtype=dtype, shape=shape, quantization=_quantization(tensor))


def _quantization(tensor: _Table) -> dict[str, object] | None:
    params = tensor.table(_TENSOR_QUANTIZATION)
    if params is None:
        return None
    scales = params.scalars(_QUANT_SCALE, "f")
    if not scales:
        return None  # float tensors often carry an empty QuantizationParameters table
    zero_points = params.scalars(_QUANT_ZERO_POINT, "q") or ()
    return {
        "scale": [float(v) for v in scales],
        "zero_point": [int(v) for v in zero_points],
        "axis": params.scalar(_QUANT_DIMENSION, _I32),
    }
