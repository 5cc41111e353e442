"""The Arduino sketch's framing code (edgekit_frame.h) against the Python implementation.

The header is plain C++11 with no Arduino dependency, so the host compiler can build it into
firmware_harness.cpp; skipped where no C++ compiler is installed.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from device_agent.serial import (
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    Hello,
    Result,
    SensorRecord,
    cobs_decode,
    encode_frame,
)

HERE = Path(__file__).parent
SKETCH = HERE.parents[2] / "firmware_examples" / "arduino_sensor"
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    exe = tmp_path_factory.mktemp("firmware") / "harness"
    flags = ["-std=c++11", "-O1", "-Wall", "-Wextra", "-Wconversion", "-pedantic", "-Werror"]
    subprocess.run(
        [CXX, *flags, f"-I{SKETCH}", str(HERE / "firmware_harness.cpp"), "-o", str(exe)],
        check=True,
        timeout=60,
    )

    def run(mode, data=b""):
        done = subprocess.run([str(exe), mode], input=data, capture_output=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run


def test_firmware_frames_decode_in_python(harness):
    decoder = FrameDecoder()
    messages = decoder.feed(harness("encode"))
    assert (decoder.frames_ok, decoder.frames_bad) == (5, 0)
    hello, first, zeros, many, error = messages
    assert hello == Hello(seq=0, channels=3, sample_period_ms=20, name="harness")
    assert first == SensorRecord(seq=1, timestamp_ms=1000, values=(0.5, -1.25, 3.0))
    assert zeros == SensorRecord(seq=2, timestamp_ms=0, values=(0.0, 0.0, 0.0))
    assert (many.seq, many.timestamp_ms, many.channels) == (65535, 2**32 - 1, 70)
    assert many.values[0] == pytest.approx(1.1) and many.values[-1] == pytest.approx(70.1)
    assert error == ErrorReport(seq=7, code=ErrorCode.OVERRUN, ref_seq=42, text="sample overrun")


def test_python_frames_parse_in_firmware_despite_noise(harness):
    stream = b"".join(
        [
            b"\x00",
            encode_frame(Result(seq=0, window_seq=1, class_index=2, score=0.875)),
            b"\x13\x37 noise without delimiter",
            b"\x00",
            encode_frame(Result(seq=1, window_seq=65535, class_index=-1, score=-2.5)),
            encode_frame(
                Result(seq=2, window_seq=3, class_index=1, score=1.0, outputs=(0.25, 1.0))
            ),
            encode_frame(Result(seq=3, window_seq=4, class_index=0, score=0.5))[3:],  # torn
            encode_frame(ErrorReport(seq=9, code=ErrorCode.PREDICT_FAILED, ref_seq=5, text="E")),
            b"\x01" * 400 + b"\x00",  # longer than the firmware's buffer
            encode_frame(Hello(seq=0, channels=0, sample_period_ms=0, name="agent")),
        ]
    )
    lines = harness("decode", stream).decode().splitlines()
    assert lines == [
        "RESULT 0 1 2 0.875",
        "RESULT 1 65535 -1 -2.5",
        "RESULT 2 3 1 1 0.25 1",
        "ERROR 9 3 5",
        "OTHER 1 14",
        "BAD 3",
    ]


def test_firmware_cobs_round_trips_through_python(harness):
    rng = random.Random(7)
    blobs = [b"", b"\x00", bytes(range(1, 255)), bytes(range(1, 256)), b"\x01" * 508]
    blobs += [b"\x02" * 254 + b"\x00" + b"\x03" * 10, b"\x05" * 253 + b"\x00"]
    blobs += [rng.randbytes(rng.randrange(0, 1100)) for _ in range(60)]
    blobs += [bytes(rng.choice((0, 1, 2)) for _ in range(rng.randrange(0, 600))) for _ in range(20)]
    request = b"".join(len(b).to_bytes(2, "little") + b for b in blobs)
    frames = harness("cobs", request).split(b"\x00")
    assert frames[-1] == b""
    assert [cobs_decode(f) for f in frames[:-1]] == blobs
