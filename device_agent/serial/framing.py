"""Wire format between a microcontroller and the agent: COBS frames with a CRC-16 trailer.

Why this shape (the full byte layouts are in ``docs/serial-protocol.md``):

* **COBS + 0x00 delimiter.** A UART gives a byte stream with no message boundaries, and a
  device may be plugged in mid-frame or drop bytes under load. COBS removes every 0x00 from the
  frame so a single 0x00 marks "end of frame" unambiguously; a receiver that lost sync throws
  away at most one frame and is back in step at the next 0x00. Overhead is one byte per 254.
* **CRC-16/CCITT-FALSE** (poly 0x1021, init 0xFFFF, no reflection, no final xor) rather than
  CRC-32: an 8-bit AVR computes it bitwise in a dozen instructions per bit with 16-bit
  arithmetic and no table (a CRC-32 table is 1 KiB, half an Uno's RAM), it detects every 1-3
  bit error and every burst up to 16 bits at these frame sizes, and Python has it in C as
  :func:`binascii.crc_hqx`. It is transmitted little-endian like every other field.
* **A version byte and a type byte** so the format can evolve and so a receiver can reject
  what it does not understand instead of misreading it.

Everything here is pure (no I/O, no threads); :class:`FrameDecoder` holds only the partial
frame between calls and its counters.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

from device_agent.serial.errors import (
    ChecksumError,
    CobsError,
    EncodeError,
    FrameError,
    FrameTooLarge,
    LengthError,
    UnknownMessageType,
    UnsupportedVersion,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME_SIZE",
    "MAX_NAME_BYTES",
    "MAX_TEXT_BYTES",
    "PROTOCOL_VERSION",
    "ErrorCode",
    "ErrorReport",
    "FrameDecoder",
    "Hello",
    "Message",
    "MessageType",
    "Result",
    "SensorRecord",
    "cobs_decode",
    "cobs_encode",
    "crc16_ccitt",
    "encode_frame",
    "max_encoded_size",
    "pack_frame",
    "parse_frame",
]

PROTOCOL_VERSION = 1
"""Value of the header's version byte. Frames with another version are refused, not guessed at."""

MAX_FRAME_SIZE = 1024
"""Largest decoded frame (header + payload + CRC) either side sends or accepts by default.

Bounds the receiver's memory when a line carries garbage with no 0x00, and keeps frames small
enough that a device can buffer one (an Uno has 2 KiB of RAM in total).
"""

MAX_NAME_BYTES = 32
"""Longest HELLO device name, in UTF-8 bytes."""

MAX_TEXT_BYTES = 64
"""Longest ERROR text, in UTF-8 bytes."""

_HEADER = struct.Struct("<BBH")  # version, type, sequence number
_CRC = struct.Struct("<H")
HEADER_SIZE = _HEADER.size
_MIN_FRAME = _HEADER.size + _CRC.size
_CRC_INIT = 0xFFFF
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF

_RECORD_HEAD = struct.Struct("<I")  # timestamp_ms
_RESULT_HEAD = struct.Struct("<Hhf")  # window_seq, class_index, score
_HELLO_HEAD = struct.Struct("<BH")  # channels, sample_period_ms
_ERROR_HEAD = struct.Struct("<BH")  # code, ref_seq
_F32 = 4


class MessageType(IntEnum):
    """The header's type byte."""

    HELLO = 0x01
    """Either side announces itself; a device sends it at boot (channels, sample period, name)."""
    SENSOR_RECORD = 0x02
    """Device -> host: one sample of every channel, with the device's millisecond clock."""
    RESULT = 0x03
    """Host -> device: the model's answer for the window that ended at ``window_seq``."""
    ERROR = 0x04
    """Either side reports a problem tied to a sequence number (e.g. predict failed)."""


class ErrorCode(IntEnum):
    """Codes carried by ERROR frames. Unknown codes are passed through as plain ints."""

    UNSPECIFIED = 0
    BAD_FRAME = 1
    """The sender received frames it had to drop."""
    BAD_RECORD = 2
    """A record was refused (e.g. wrong channel count for the model)."""
    PREDICT_FAILED = 3
    """The model raised or returned something unusable for the window ending at ``ref_seq``."""
    SENSOR_FAULT = 4
    """The device could not read its sensor."""
    OVERRUN = 5
    """The device dropped samples because it could not keep its sample rate."""


@dataclass(frozen=True, slots=True)
class SensorRecord:
    """One sample of every channel, stamped with the device's ``millis()`` (wraps at 2**32)."""

    type: ClassVar[MessageType] = MessageType.SENSOR_RECORD
    seq: int
    timestamp_ms: int
    values: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.values)


@dataclass(frozen=True, slots=True)
class Result:
    """The model's answer for the window whose newest record had sequence ``window_seq``.

    ``seq`` is the host's own transmit counter; ``window_seq`` is what lets the device match
    the answer to the data it sent. ``outputs`` optionally carries the raw output vector.
    """

    type: ClassVar[MessageType] = MessageType.RESULT
    seq: int
    window_seq: int
    class_index: int
    score: float
    outputs: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Hello:
    """A side announces itself. A device sends it at boot, so it also means "I restarted"."""

    type: ClassVar[MessageType] = MessageType.HELLO
    seq: int
    channels: int
    sample_period_ms: int
    name: str = ""


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """A problem tied to a sequence number; ``code`` is an :class:`ErrorCode` when known."""

    type: ClassVar[MessageType] = MessageType.ERROR
    seq: int
    code: int
    ref_seq: int
    text: str = ""


Message: TypeAlias = SensorRecord | Result | Hello | ErrorReport
"""Any decoded protocol message; dispatch with ``isinstance`` or on ``msg.type``."""


# --------------------------------------------------------------------------------------- CRC


def crc16_ccitt(data: bytes | bytearray | memoryview, crc: int = _CRC_INIT) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (check value for ``b"123456789"`` is 0x29B1).

    Pass a previous result as ``crc`` to continue over several chunks.
    """
    return binascii.crc_hqx(data, crc)


# -------------------------------------------------------------------------------------- COBS


def cobs_encode(data: bytes | bytearray | memoryview) -> bytes:
    """COBS-encode ``data``: the result contains no 0x00 and is at most ``len//254 + 1`` longer.

    The trailing delimiter is not included; :func:`encode_frame` appends it.
    """
    out = bytearray()
    segments = bytes(data).split(b"\x00")
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        # A run of 254 non-zero bytes is a full block (code 0xFF) that implies no zero after it.
        while len(segment) >= 0xFE:
            out.append(0xFF)
            out += segment[:0xFE]
            segment = segment[0xFE:]
            if not segment and i == last:
                return bytes(out)
        out.append(len(segment) + 1)
        out += segment
    return bytes(out)


def cobs_decode(encoded: bytes | bytearray | memoryview) -> bytes:
    """Invert :func:`cobs_encode`; raise :class:`CobsError` on anything it could not produce.

    ``encoded`` is one frame without its delimiter.
    """
    src = bytes(encoded)
    n = len(src)
    if n == 0:
        raise CobsError("empty COBS frame")
    out = bytearray()
    i = 0
    while i < n:
        code = src[i]
        if code == 0:
            raise CobsError(f"zero byte inside a COBS frame at offset {i}")
        end = i + code
        if end > n:
            raise CobsError(f"COBS block at offset {i} runs {end - n} bytes past the frame")
        block = src[i + 1 : end]
        if 0 in block:
            raise CobsError("zero byte inside a COBS block")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def max_encoded_size(frame_size: int) -> int:
    """Upper bound of the COBS-encoded length of a ``frame_size``-byte frame (no delimiter)."""
    return frame_size + frame_size // 0xFE + 1


# ------------------------------------------------------------------------- pack / parse frames


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise EncodeError(f"{name}={value} is outside [{low}, {high}]")


def _pack_floats(name: str, values: Iterable[float]) -> bytes:
    floats = tuple(float(v) for v in values)
    try:
        return struct.pack(f"<{len(floats)}f", *floats)
    except (OverflowError, struct.error) as exc:
        raise EncodeError(f"{name} do not fit float32: {exc}") from exc


def _encode_text(name: str, text: str, limit: int) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > limit:
        raise EncodeError(f"{name} is {len(raw)} UTF-8 bytes; at most {limit} fit")
    return raw


def _pack_payload(msg: Message) -> bytes:
    if isinstance(msg, SensorRecord):
        if not msg.values:
            raise EncodeError("a sensor record needs at least one value")
        _check_range("timestamp_ms", msg.timestamp_ms, 0, _U32)
        return _RECORD_HEAD.pack(msg.timestamp_ms) + _pack_floats("values", msg.values)
    if isinstance(msg, Result):
        _check_range("window_seq", msg.window_seq, 0, _U16)
        _check_range("class_index", msg.class_index, -0x8000, 0x7FFF)
        return (
            struct.pack("<Hh", msg.window_seq, msg.class_index)
            + _pack_floats("score", (msg.score,))
            + _pack_floats("outputs", msg.outputs)
        )
    if isinstance(msg, Hello):
        _check_range("channels", msg.channels, 0, 0xFF)
        _check_range("sample_period_ms", msg.sample_period_ms, 0, _U16)
        name = _encode_text("name", msg.name, MAX_NAME_BYTES)
        return _HELLO_HEAD.pack(msg.channels, msg.sample_period_ms) + name
    if isinstance(msg, ErrorReport):
        _check_range("code", int(msg.code), 0, 0xFF)
        _check_range("ref_seq", msg.ref_seq, 0, _U16)
        text = _encode_text("text", msg.text, MAX_TEXT_BYTES)
        return _ERROR_HEAD.pack(int(msg.code), msg.ref_seq) + text
    raise EncodeError(f"not a protocol message: {type(msg).__name__}")


def pack_frame(msg: Message, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Header + payload + CRC of ``msg``, before COBS (useful for tests and worked examples)."""
    _check_range("seq", msg.seq, 0, _U16)
    body = _HEADER.pack(PROTOCOL_VERSION, int(msg.type), msg.seq) + _pack_payload(msg)
    frame = body + _CRC.pack(crc16_ccitt(body))
    if len(frame) > max_frame_size:
        raise FrameTooLarge(f"{msg.type.name} frame is {len(frame)} bytes; limit {max_frame_size}")
    return frame


def encode_frame(msg: Message, *, max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Bytes to write to the port for ``msg``: COBS of :func:`pack_frame`, then one 0x00."""
    return cobs_encode(pack_frame(msg, max_frame_size=max_frame_size)) + b"\x00"


def _unpack_floats(payload: bytes, offset: int, what: str) -> tuple[float, ...]:
    rest = len(payload) - offset
    if rest % _F32:
        raise LengthError(f"{what}: {rest} trailing bytes are not a whole number of float32")
    return struct.unpack_from(f"<{rest // _F32}f", payload, offset)


def _parse_payload(kind: MessageType, seq: int, payload: bytes) -> Message:
    size = len(payload)
    if kind is MessageType.SENSOR_RECORD:
        if size < _RECORD_HEAD.size + _F32:
            raise LengthError(f"SENSOR_RECORD payload is {size} bytes; needs >= 8")
        (timestamp,) = _RECORD_HEAD.unpack_from(payload)
        values = _unpack_floats(payload, _RECORD_HEAD.size, "SENSOR_RECORD")
        return SensorRecord(seq=seq, timestamp_ms=timestamp, values=values)
    if kind is MessageType.RESULT:
        if size < _RESULT_HEAD.size:
            raise LengthError(f"RESULT payload is {size} bytes; needs >= {_RESULT_HEAD.size}")
        window_seq, class_index, score = _RESULT_HEAD.unpack_from(payload)
        outputs = _unpack_floats(payload, _RESULT_HEAD.size, "RESULT")
        return Result(seq, window_seq, class_index, score, outputs)
    if kind is MessageType.HELLO:
        if not _HELLO_HEAD.size <= size <= _HELLO_HEAD.size + MAX_NAME_BYTES:
            raise LengthError(f"HELLO payload is {size} bytes")
        channels, period = _HELLO_HEAD.unpack_from(payload)
        name = payload[_HELLO_HEAD.size :].decode("utf-8", errors="replace")
        return Hello(seq=seq, channels=channels, sample_period_ms=period, name=name)
    # MessageType.ERROR (the enum is closed; _parse_type refused anything else)
    if not _ERROR_HEAD.size <= size <= _ERROR_HEAD.size + MAX_TEXT_BYTES:
        raise LengthError(f"ERROR payload is {size} bytes")
    code, ref_seq = _ERROR_HEAD.unpack_from(payload)
    text = payload[_ERROR_HEAD.size :].decode("utf-8", errors="replace")
    known = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
    return ErrorReport(seq=seq, code=known, ref_seq=ref_seq, text=text)


def parse_frame(
    frame: bytes | bytearray | memoryview, *, max_frame_size: int = MAX_FRAME_SIZE
) -> Message:
    """Check and decode one COBS-decoded frame; raise a :class:`FrameError` subclass if bad.

    The CRC is checked before the version and type so that line noise is reported as
    ``bad-crc`` rather than as a plausible-looking protocol mismatch.
    """
    raw = bytes(frame)
    if len(raw) > max_frame_size:
        raise FrameTooLarge(f"frame is {len(raw)} bytes; limit {max_frame_size}")
    if len(raw) < _MIN_FRAME:
        raise LengthError(f"frame is {len(raw)} bytes; header and CRC alone need {_MIN_FRAME}")
    body, (crc,) = raw[: -_CRC.size], _CRC.unpack_from(raw, len(raw) - _CRC.size)
    expected = crc16_ccitt(body)
    if crc != expected:
        raise ChecksumError(f"CRC is 0x{crc:04x}; header and payload give 0x{expected:04x}")
    version, type_byte, seq = _HEADER.unpack_from(body)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version}; this side speaks {PROTOCOL_VERSION}")
    try:
        kind = MessageType(type_byte)
    except ValueError:
        raise UnknownMessageType(f"message type 0x{type_byte:02x}") from None
    return _parse_payload(kind, seq, body[_HEADER.size :])


# ------------------------------------------------------------------------- streaming decoder


class FrameDecoder:
    """Turn an arbitrary byte stream into messages, skipping whatever is not a good frame.

    ``feed`` never raises for any input: a serial line delivers noise, partial frames after a
    replug and bytes from a misconfigured baud rate, and none of that should stop the agent.
    Each refused frame is counted once under its error's ``reason`` and the decoder resumes at
    the next 0x00. A run of bytes longer than the largest possible encoded frame is dropped as
    soon as it crosses that size, so memory stays bounded even if no delimiter ever arrives.
    Empty frames (consecutive 0x00) are ignored: senders may emit a lone 0x00 to flush
    whatever partial frame the receiver holds.
    """

    def __init__(self, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if max_frame_size < _MIN_FRAME:
            raise ValueError(f"max_frame_size must be >= {_MIN_FRAME}")
        self.max_frame_size = max_frame_size
        self._max_encoded = max_encoded_size(max_frame_size)
        self._buf = bytearray()
        self._discarding = False
        self.frames_ok = 0
        self.frames_bad = 0
        self.bytes_in = 0
        self.bad_by_reason: dict[str, int] = {}

    @property
    def pending(self) -> int:
        """Bytes held for a frame whose delimiter has not arrived yet."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget any partial frame (after a reconnect), keeping the counters."""
        self._buf.clear()
        self._discarding = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Consume ``data`` and return the messages of every frame it completed, in order."""
        chunk = bytes(data)
        self.bytes_in += len(chunk)
        messages: list[Message] = []
        start = 0
        while True:
            end = chunk.find(0, start)
            if end < 0:
                self._accumulate(chunk, start, len(chunk))
                return messages
            self._accumulate(chunk, start, end)
            self._complete(messages)
            start = end + 1

    def _accumulate(self, chunk: bytes, start: int, end: int) -> None:
        if self._discarding or start == end:
            return
        self._buf += chunk[start:end]
        if len(self._buf) > self._max_encoded:
            self._buf.clear()
            self._discarding = True
            self._count_bad(FrameTooLarge.reason)

    def _complete(self, messages: list[Message]) -> None:
        if self._discarding:
            # Already counted when it overflowed; the delimiter just ends the discard.
            self._discarding = False
            return
        if not self._buf:
            return
        encoded = bytes(self._buf)
        self._buf.clear()
        try:
            message = parse_frame(cobs_decode(encoded), max_frame_size=self.max_frame_size)
        except FrameError as exc:
            self._count_bad(exc.reason)
            return
        self.frames_ok += 1
        messages.append(message)

    def _count_bad(self, reason: str) -> None:
        self.frames_bad += 1
        self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + 1
