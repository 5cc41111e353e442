"""Serial input for the agent: sensor records from a microcontroller in, model results out.

One job per module:

* :mod:`~device_agent.serial.framing`: the wire format (COBS, CRC-16, typed messages) and an
  incremental decoder that survives noise; pure functions, no I/O.
* :mod:`~device_agent.serial.windows`: sensor records to fixed-shape model inputs.
* :mod:`~device_agent.serial.link`: :class:`SerialBridge`, the port loop with reconnects.
* :mod:`~device_agent.serial.errors`: typed errors.

The protocol is specified in ``docs/serial-protocol.md``; an Arduino sketch that speaks it is
in ``firmware_examples/arduino_sensor/``.
"""

from __future__ import annotations

from device_agent.serial.errors import (
    BadModelOutput,
    ChecksumError,
    CobsError,
    EncodeError,
    FrameError,
    FrameTooLarge,
    LengthError,
    SerialError,
    UnknownMessageType,
    UnsupportedVersion,
)
from device_agent.serial.framing import (
    MAX_FRAME_SIZE,
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    Hello,
    Message,
    MessageType,
    Result,
    SensorRecord,
    cobs_decode,
    cobs_encode,
    crc16_ccitt,
    encode_frame,
    pack_frame,
    parse_frame,
)
from device_agent.serial.link import BridgeCounters, PredictFn, SerialBridge
from device_agent.serial.windows import Window, WindowAssembler

__all__ = [
    "MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "BadModelOutput",
    "BridgeCounters",
    "ChecksumError",
    "CobsError",
    "EncodeError",
    "ErrorCode",
    "ErrorReport",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "Hello",
    "LengthError",
    "Message",
    "MessageType",
    "PredictFn",
    "Result",
    "SensorRecord",
    "SerialBridge",
    "SerialError",
    "UnknownMessageType",
    "UnsupportedVersion",
    "Window",
    "WindowAssembler",
    "cobs_decode",
    "cobs_encode",
    "crc16_ccitt",
    "encode_frame",
    "pack_frame",
    "parse_frame",
]
