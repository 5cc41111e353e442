"""SerialBridge end to end over real pseudo-terminals, with a simulated device on the far side."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from device_agent.serial import (
    PROTOCOL_VERSION,
    ErrorCode,
    SensorRecord,
    SerialBridge,
    cobs_encode,
    crc16_ccitt,
    encode_frame,
    pack_frame,
)

WINDOW, HOP, CHANNELS = 4, 2, 3

# Every wait below has its own 5 s timeout; this bounds anything that might still hang.
pytestmark = pytest.mark.timeout(30)


def expected_results(model, records, *, window=WINDOW, hop=HOP):
    """(window_seq, class_index, score) for every window a contiguous run of records yields."""
    out = []
    for end in range(window - 1, len(records), hop):
        rows = np.array([r.values for r in records[end - window + 1 : end + 1]])
        index, score = model.expected(rows)
        out.append((records[end].seq, index, score))
    return out


def assert_results(results, expected):
    assert [(r.window_seq, r.class_index) for r in results] == [(s, i) for s, i, _ in expected]
    assert [r.score for r in results] == pytest.approx([sc for _, _, sc in expected], rel=1e-6)


def settled(bridge, wait_until):
    """Counters once every window has been answered (a RESULT is counted after its write)."""

    def done():
        c = bridge.counters()
        return c.results_sent + c.predict_errors == c.windows

    wait_until(done, what="every window answered")
    return bridge.counters()


def rows(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, CHANNELS)).round(3)


def raw_frame(version, kind, seq, payload):
    body = bytes([version, kind]) + seq.to_bytes(2, "little") + payload
    return cobs_encode(body + crc16_ccitt(body).to_bytes(2, "little")) + b"\x00"


def test_results_come_back_for_every_window(device, make_bridge, model, wait_until):
    bridge = make_bridge()
    wait_until(lambda: bridge.connected, what="bridge connected")

    records = device.send_records(rows(12))
    expected = expected_results(model, records)
    assert len(expected) == 5
    results = device.wait_results(len(expected))

    assert_results(results, expected)
    assert len({r.class_index for r in results}) > 1, "weak check: every window gave one class"
    assert [r.seq for r in results] == list(range(5))
    assert all(r.outputs == () for r in results)
    c = settled(bridge, wait_until)
    assert (c.frames_ok, c.frames_bad, c.records, c.windows) == (12, 0, 12, 5)
    assert (c.results_sent, c.predict_errors, c.connects, c.reconnects) == (5, 0, 1, 0)


def test_corrupted_frames_are_counted_and_skipped(device, make_bridge, model, wait_until):
    bridge = make_bridge()
    wait_until(lambda: bridge.connected, what="bridge connected")

    spare = SensorRecord(seq=999, timestamp_ms=0, values=(1.0, 2.0, 3.0))
    flipped = bytearray(pack_frame(spare))
    flipped[7] ^= 0x04  # a bit flipped in transit, inside the payload
    encoded = encode_frame(spare)
    oversized = SensorRecord(seq=999, timestamp_ms=0, values=(1.0,) * 300)
    bad_frames = [
        cobs_encode(flipped) + b"\x00",  # bad-crc
        encoded[: len(encoded) // 2] + b"\x00",  # truncated
        bytes(range(1, 256)) * 12 + b"\x00",  # garbage with no delimiter for 3 KiB
        encode_frame(oversized, max_frame_size=4096),  # well-formed but over the size limit
        raw_frame(PROTOCOL_VERSION, 0x7E, 0, b"\x01\x02"),  # unknown type
        raw_frame(PROTOCOL_VERSION + 1, 0x02, 0, b"\x00" * 8),  # unsupported version
        raw_frame(PROTOCOL_VERSION, 0x02, 0, b"\x00" * 6),  # record payload of the wrong size
    ]
    records = []
    for i, row in enumerate(rows(16)):
        record = device.record(row)
        records.append(record)
        device.write(encode_frame(record))
        if i < len(bad_frames):
            device.write(bad_frames[i])

    expected = expected_results(model, records)
    results = device.wait_results(len(expected))
    assert_results(results, expected)
    c = settled(bridge, wait_until)
    assert c.frames_ok == 16
    assert c.frames_bad == len(bad_frames)
    assert sum(c.bad_by_reason.values()) == len(bad_frames)
    for reason in ("bad-crc", "oversized", "unknown-type", "bad-version", "bad-length"):
        assert c.bad_by_reason.get(reason, 0) >= 1, (reason, c.bad_by_reason)
    assert c.bad_by_reason["oversized"] == 2
    assert (c.sequence_gaps, c.records_rejected, c.predict_errors) == (0, 0, 0)


def test_unplug_and_replug_reconnects_and_continues(device, make_bridge, model, wait_until):
    bridge = make_bridge()
    wait_until(lambda: bridge.connected, what="bridge connected")
    first = device.send_records(rows(6, seed=1))
    device.wait_results(2)

    device.unplug()  # the port path disappears and the pty is destroyed
    wait_until(lambda: bridge.counters().disconnects == 1, what="disconnect noticed")
    wait_until(lambda: bridge.counters().open_failures >= 2, what="reopen attempts fail")
    assert not bridge.connected
    assert bridge.last_error is not None

    device.plug()  # a new pty behind the same path
    wait_until(lambda: bridge.connected and bridge.counters().reconnects == 1, what="reconnect")
    second = device.send_records(rows(6, seed=2))

    results = device.wait_results(4)
    # The window restarts after a reconnect: no window mixes records from both connections.
    expected = expected_results(model, first) + expected_results(model, second)
    assert_results(results, expected)
    c = settled(bridge, wait_until)
    assert (c.connects, c.reconnects, c.disconnects, c.results_sent) == (2, 1, 1, 4)
    assert c.frames_bad == 0


def test_bridge_keeps_retrying_a_vanished_port_and_stops_promptly(make_bridge, wait_until):
    master, slave = os.openpty()
    path = os.ttyname(slave)
    bridge = make_bridge(port=path)
    wait_until(lambda: bridge.connected, what="bridge connected")
    os.close(master)
    os.close(slave)
    wait_until(lambda: bridge.counters().disconnects == 1, what="disconnect noticed")
    wait_until(lambda: bridge.counters().open_failures >= 3, what="reopen attempts")
    assert bridge.running

    started = time.monotonic()
    bridge.stop(timeout=5.0)
    assert not bridge.running
    assert time.monotonic() - started < 1.0


def test_predict_errors_are_counted_and_the_loop_goes_on(device, make_bridge, model, wait_until):
    calls = []

    def flaky(x):
        calls.append(x)
        if len(calls) in (2, 3):
            raise RuntimeError("boom")
        return model(x)

    bridge = make_bridge(predict=flaky)
    wait_until(lambda: bridge.connected, what="bridge connected")
    records = device.send_records(rows(12, seed=3))
    expected = expected_results(model, records)

    results = device.wait_results(3)
    wait_until(lambda: len(device.errors()) == 2, what="2 ERROR frames")
    assert_results(results, [expected[0], expected[3], expected[4]])
    errors = device.errors()
    assert [e.ref_seq for e in errors] == [expected[1][0], expected[2][0]]
    assert all(e.code is ErrorCode.PREDICT_FAILED and e.text == "RuntimeError" for e in errors)
    c = settled(bridge, wait_until)
    assert (c.windows, c.predict_errors, c.results_sent) == (5, 2, 3)
    assert "boom" in (bridge.last_error or "")
    assert bridge.running


def test_unusable_model_output_is_a_predict_error(device, make_bridge, wait_until):
    bridge = make_bridge(output_name="probabilities")  # the model only has "logits"
    wait_until(lambda: bridge.connected, what="bridge connected")
    device.send_records(rows(4))
    wait_until(lambda: len(device.errors()) == 1, what="ERROR frame")
    assert device.errors()[0].text == "BadModelOutput"
    assert bridge.counters().predict_errors == 1
    assert device.results() == []


def test_raw_outputs_are_sent_when_asked(device, make_bridge, model, wait_until):
    bridge = make_bridge(send_outputs=True)
    wait_until(lambda: bridge.connected, what="bridge connected")
    records = device.send_records(rows(4))
    (result,) = device.wait_results(1)
    window = np.array([r.values for r in records], dtype=np.float32)
    logits = model(window)["logits"][0]
    assert result.outputs == pytest.approx(logits.tolist(), rel=1e-6)
    assert result.class_index == int(np.argmax(logits))


def test_wrong_channel_count_and_device_restart(device, make_bridge, model, wait_until):
    bridge = make_bridge()
    wait_until(lambda: bridge.connected, what="bridge connected")
    device.send_records(rows(2))
    device.send_record([1.0, 2.0])  # wrong channel count: refused, and its seq is now a gap
    after_gap = device.send_records(rows(4, seed=4))
    (result,) = device.wait_results(1)
    assert_results([result], expected_results(model, after_gap))
    c = settled(bridge, wait_until)
    assert (c.records, c.records_rejected, c.sequence_gaps) == (6, 1, 1)

    device.send_records(rows(1))  # half a window, then the device reboots
    device.send_hello()
    rebooted = device.send_records(rows(4, seed=5))
    assert rebooted[0].seq == 0
    results = device.wait_results(2)
    assert_results(results[1:], expected_results(model, rebooted))
    c = settled(bridge, wait_until)
    assert (c.hellos, c.sequence_gaps) == (1, 1)  # a restart announced by HELLO is no gap
    assert bridge.device is not None and bridge.device.name == "sim"
    assert bridge.device.channels == CHANNELS


def test_invalid_configuration_is_refused_up_front():
    with pytest.raises(ValueError):
        SerialBridge("loop://", predict=lambda x: {}, window=0)
    with pytest.raises(ValueError):
        SerialBridge("loop://", predict=lambda x: {}, window=4, reconnect_interval=0)


def test_context_manager_runs_and_stops_the_thread(wait_until):
    """Any pyserial URL works as a port; loop:// needs no hardware at all."""
    bridge = SerialBridge("loop://", predict=lambda x: {"y": x.sum(keepdims=True)}, window=1)
    with bridge:
        wait_until(lambda: bridge.connected, what="loop:// open")
        with pytest.raises(RuntimeError):
            bridge.start()
    assert not bridge.running
    assert not bridge.connected
    assert bridge.counters().connects == 1
