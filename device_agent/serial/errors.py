"""Typed errors for the serial input path.

The frame decoder never lets these escape from :meth:`FrameDecoder.feed` (a noisy wire is
normal, not exceptional); it catches them, counts them under their ``reason`` and moves on.
They surface to callers only from the strict helpers (:func:`cobs_decode`, :func:`parse_frame`,
:func:`encode_frame`) and from model-output checks in the bridge, where a typed error lets
tests and telemetry tell one failure from another without string matching.

Every error carries a short machine-readable ``reason`` (the key used in the bridge's
``bad_by_reason`` counters and in log lines) and a one-line message, matching the convention of
:mod:`edgekit.errors`.
"""

from __future__ import annotations

from device_agent.errors import AgentError

__all__ = [
    "BadModelOutput",
    "ChecksumError",
    "CobsError",
    "EncodeError",
    "FrameError",
    "FrameTooLarge",
    "LengthError",
    "SerialError",
    "UnknownMessageType",
    "UnsupportedVersion",
]


class SerialError(AgentError):
    """Base of every error the serial input path raises on purpose."""

    reason: str = "serial-error"

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class FrameError(SerialError):
    """A received frame was refused; the decoder skips it and resynchronizes on the next 0x00."""

    reason = "bad-frame"


class CobsError(FrameError):
    """The bytes between two delimiters are not valid COBS (a code byte overruns the frame)."""

    reason = "bad-cobs"


class ChecksumError(FrameError):
    """The CRC-16 trailer does not match the header and payload: bits were corrupted in transit."""

    reason = "bad-crc"


class LengthError(FrameError):
    """The frame is too short for a header, or the payload size does not fit its message type."""

    reason = "bad-length"


class UnknownMessageType(FrameError):
    """The type byte names no message this protocol version defines."""

    reason = "unknown-type"


class UnsupportedVersion(FrameError):
    """The version byte is not the protocol version this side speaks."""

    reason = "bad-version"


class FrameTooLarge(FrameError):
    """A frame exceeds the maximum frame size (on receive: no delimiter came in time)."""

    reason = "oversized"


class EncodeError(SerialError, ValueError):
    """A message field is out of range for its wire type (a caller bug, hence also ValueError)."""

    reason = "bad-field"


class BadModelOutput(SerialError):
    """The model's output cannot be turned into a RESULT (missing name, empty, not a vector)."""

    reason = "bad-output"
