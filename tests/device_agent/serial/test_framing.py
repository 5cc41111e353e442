"""Framing: COBS, CRC, frame layout and the streaming decoder's refusal of bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.serial import (
    MAX_FRAME_SIZE,
    ChecksumError,
    CobsError,
    EncodeError,
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    FrameTooLarge,
    Hello,
    LengthError,
    MessageType,
    Result,
    SensorRecord,
    UnknownMessageType,
    UnsupportedVersion,
    cobs_decode,
    cobs_encode,
    crc16_ccitt,
    encode_frame,
    pack_frame,
    parse_frame,
)
from device_agent.serial.framing import max_encoded_size

# --------------------------------------------------------------------------- checksum / COBS


def crc16_bitwise(data: bytes) -> int:
    """The loop the Arduino sketch runs: MSB first, poly 0x1021, init 0xFFFF, no final xor."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


@given(st.binary(max_size=300))
def test_crc_matches_the_bitwise_loop_the_firmware_uses(data):
    assert crc16_ccitt(data) == crc16_bitwise(data)


def test_crc_is_ccitt_false():
    assert crc16_ccitt(b"123456789") == 0x29B1  # the catalogue check value
    assert crc16_ccitt(b"6789", crc16_ccitt(b"12345")) == 0x29B1  # chunked


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        (b"", b"\x01"),
        (b"\x00", b"\x01\x01"),
        (b"\x00\x00", b"\x01\x01\x01"),
        (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
        (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
        (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
        (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
        (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
        (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    ],
)
def test_cobs_reference_vectors(raw, encoded):
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x05\x11\x22", b"\x03\x11\x00", b"\x00", b"\x02\x11\x00\x01"],
)
def test_cobs_decode_refuses_what_no_encoder_produces(bad):
    with pytest.raises(CobsError):
        cobs_decode(bad)


@given(st.binary(max_size=2000))
def test_cobs_round_trip(data):
    encoded = cobs_encode(data)
    assert b"\x00" not in encoded
    assert len(encoded) <= max_encoded_size(len(data))
    assert cobs_decode(encoded) == data


# ------------------------------------------------------------------------------ messages

finite32 = st.floats(width=32, allow_nan=False)
u16 = st.integers(0, 0xFFFF)
messages = st.one_of(
    st.builds(
        SensorRecord,
        seq=u16,
        timestamp_ms=st.integers(0, 0xFFFF_FFFF),
        values=st.lists(finite32, min_size=1, max_size=64).map(tuple),
    ),
    st.builds(
        Result,
        seq=u16,
        window_seq=u16,
        class_index=st.integers(-0x8000, 0x7FFF),
        score=finite32,
        outputs=st.lists(finite32, max_size=32).map(tuple),
    ),
    st.builds(
        Hello,
        seq=u16,
        channels=st.integers(0, 255),
        sample_period_ms=u16,
        name=st.text(max_size=8),
    ),
    st.builds(
        ErrorReport,
        seq=u16,
        code=st.sampled_from(ErrorCode),
        ref_seq=u16,
        text=st.text(max_size=16),
    ),
)


@given(st.lists(messages, min_size=1, max_size=8))
def test_encode_decode_round_trip(batch):
    stream = b"".join(encode_frame(m) for m in batch)
    assert stream.count(0) == len(batch)  # exactly one delimiter per frame
    decoder = FrameDecoder()
    assert decoder.feed(stream) == batch
    assert (decoder.frames_ok, decoder.frames_bad, decoder.pending) == (len(batch), 0, 0)


def test_worked_example_from_the_docs():
    record = SensorRecord(seq=1, timestamp_ms=1000, values=(0.5, -1.25, 3.0))
    assert pack_frame(record).hex(" ") == (
        "01 02 01 00 e8 03 00 00 00 00 00 3f 00 00 a0 bf 00 00 40 40 79 2c"
    )
    assert encode_frame(record).hex(" ") == (
        "04 01 02 01 03 e8 03 01 01 01 01 02 3f 01 03 a0 bf 01 05 40 40 79 2c 00"
    )
    result = Result(seq=0, window_seq=1, class_index=2, score=0.875)
    assert encode_frame(result).hex(" ") == ("03 01 03 01 02 01 02 02 01 01 05 60 3f 73 ff 00")


def test_frame_layout_is_little_endian_with_trailing_crc():
    frame = pack_frame(Result(seq=0x1234, window_seq=0xBEEF, class_index=-2, score=1.5))
    version, kind, seq, window_seq, class_index, score, crc = struct.unpack("<BBHHhfH", frame)
    assert (version, kind, seq) == (1, MessageType.RESULT, 0x1234)
    assert (window_seq, class_index, score) == (0xBEEF, -2, 1.5)
    assert crc == crc16_ccitt(frame[:-2])


def test_unknown_error_codes_pass_through_as_ints():
    report = parse_frame(pack_frame(ErrorReport(seq=0, code=200, ref_seq=7, text="x")))
    assert isinstance(report, ErrorReport)
    assert report.code == 200 and not isinstance(report.code, ErrorCode)
    known = parse_frame(pack_frame(ErrorReport(seq=0, code=3, ref_seq=7)))
    assert isinstance(known, ErrorReport) and known.code is ErrorCode.PREDICT_FAILED


def _body(version: int, kind: int, payload: bytes) -> bytes:
    body = bytes([version, kind, 0, 0]) + payload
    return body + crc16_ccitt(body).to_bytes(2, "little")


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        (b"\x01\x02\x00", LengthError),
        (_body(1, 2, b"\x00" * 4), LengthError),  # a record with no values
        (_body(1, 2, b"\x00" * 10), LengthError),  # half a float
        (_body(1, 3, b"\x00" * 7), LengthError),  # RESULT too short
        (_body(1, 1, b"\x00" * 40), LengthError),  # HELLO name too long
        (_body(1, 4, b"\x00" * 2), LengthError),  # ERROR too short
        (_body(1, 9, b""), UnknownMessageType),
        (_body(0, 2, b"\x00" * 8), UnsupportedVersion),
        (_body(1, 2, b"\x00" * 8)[:-1] + b"\x55", ChecksumError),
        (_body(1, 2, b"\x00" * (MAX_FRAME_SIZE)), FrameTooLarge),
    ],
)
def test_parse_frame_errors(frame, error):
    with pytest.raises(error) as info:
        parse_frame(frame)
    assert info.value.reason and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "message",
    [
        SensorRecord(seq=0, timestamp_ms=0, values=()),
        SensorRecord(seq=0x10000, timestamp_ms=0, values=(1.0,)),
        SensorRecord(seq=0, timestamp_ms=-1, values=(1.0,)),
        SensorRecord(seq=0, timestamp_ms=0, values=(1e40,)),
        Result(seq=0, window_seq=0, class_index=0x8000, score=0.0),
        Hello(seq=0, channels=256, sample_period_ms=0),
        Hello(seq=0, channels=1, sample_period_ms=0, name="x" * 33),
        ErrorReport(seq=0, code=ErrorCode.OVERRUN, ref_seq=0, text="é" * 33),
    ],
)
def test_encode_refuses_out_of_range_fields(message):
    with pytest.raises(EncodeError):
        encode_frame(message)


def test_encode_refuses_oversized_frames():
    with pytest.raises(FrameTooLarge):
        encode_frame(SensorRecord(seq=0, timestamp_ms=0, values=(0.0,) * 300))
    big = encode_frame(
        SensorRecord(seq=0, timestamp_ms=0, values=(0.0,) * 300), max_frame_size=2048
    )
    assert FrameDecoder(max_frame_size=2048).feed(big)


# ------------------------------------------------------------------------------- decoder


def record(seq: int) -> SensorRecord:
    return SensorRecord(seq=seq, timestamp_ms=seq * 10, values=(float(seq), -1.0))


def test_decoder_reassembles_frames_split_anywhere():
    stream = b"".join(encode_frame(record(i)) for i in range(5))
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == [record(i) for i in range(5)]
    assert decoder.bytes_in == len(stream)


def test_decoder_skips_bad_frames_and_resyncs_on_next_delimiter():
    good = encode_frame(record(1))
    flipped = bytearray(good)
    flipped[12] ^= 0x40  # 0x3f -> 0x7f: a data byte, so the COBS structure survives
    decoder = FrameDecoder()
    out = decoder.feed(b"\x00\x00" + bytes(flipped) + good[:5] + b"\x00" + b"junk\x00" + good)
    assert out == [record(1)]
    assert decoder.frames_bad == 3
    assert decoder.frames_ok == 1


def test_decoder_bounds_memory_without_delimiters():
    decoder = FrameDecoder(max_frame_size=64)
    limit = max_encoded_size(64)
    for _ in range(100):
        assert decoder.feed(b"\x01" * 50) == []
        assert decoder.pending <= limit
    assert decoder.bad_by_reason == {"oversized": 1}  # one overrun, counted once
    # The frame right after the overrun's end is lost with it: its delimiter ends the discard.
    assert decoder.feed(encode_frame(record(1))) == []
    assert decoder.feed(encode_frame(record(2))) == [record(2)]
    assert decoder.frames_bad == 1


def test_decoder_reset_drops_partial_frame_but_keeps_counters():
    decoder = FrameDecoder()
    decoder.feed(b"junk\x00" + encode_frame(record(1))[:4])
    assert decoder.pending == 4
    decoder.reset()
    assert decoder.pending == 0 and decoder.frames_bad == 1
    assert decoder.feed(encode_frame(record(2))) == [record(2)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=600), max_size=8), st.integers(16, 2048))
def test_random_streams_never_raise(chunks, max_frame_size):
    decoder = FrameDecoder(max_frame_size=max_frame_size)
    for chunk in chunks:
        for message in decoder.feed(chunk):
            assert message.type in MessageType
        assert decoder.pending <= max_encoded_size(max_frame_size)
    total = sum(decoder.bad_by_reason.values())
    assert total == decoder.frames_bad


@given(st.binary(max_size=3000), messages)
def test_good_frame_after_garbage_and_delimiter_always_decodes(garbage, message):
    decoder = FrameDecoder()
    out = decoder.feed(garbage + b"\x00" + encode_frame(message))
    assert out and out[-1] == message
