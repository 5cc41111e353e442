"""WindowAssembler: window shapes, hop, channel checks and sequence-gap handling."""

from __future__ import annotations

import numpy as np
import pytest

from device_agent.serial import SensorRecord, WindowAssembler


def rec(seq: int, *values: float) -> SensorRecord:
    return SensorRecord(seq=seq & 0xFFFF, timestamp_ms=seq * 10, values=values or (seq, -seq))


def push_all(assembler, records):
    return [w for w in (assembler.push(r) for r in records) if w is not None]


def test_sliding_windows_with_hop():
    asm = WindowAssembler(4, hop=2)
    windows = push_all(asm, [rec(i) for i in range(10)])
    assert [(w.first_seq, w.last_seq) for w in windows] == [(0, 3), (2, 5), (4, 7), (6, 9)]
    first = windows[0].data
    assert first.dtype == np.float32 and first.shape == (4, 2)
    np.testing.assert_array_equal(first[:, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(windows[-1].data[:, 1], [-6, -7, -8, -9])
    assert windows[-1].timestamp_ms == 90
    assert (asm.records, asm.windows, asm.channels, asm.shape) == (10, 4, 2, (4, 2))


def test_windows_are_independent_copies():
    asm = WindowAssembler(2, hop=1)
    windows = push_all(asm, [rec(i) for i in range(4)])
    windows[0].data[:] = 99
    np.testing.assert_array_equal(windows[1].data[:, 0], [1, 2])


def test_default_hop_is_back_to_back_and_large_hop_skips():
    back_to_back = push_all(WindowAssembler(3), [rec(i) for i in range(9)])
    assert [w.last_seq for w in back_to_back] == [2, 5, 8]
    skipping = push_all(WindowAssembler(2, hop=5), [rec(i) for i in range(12)])
    assert [(w.first_seq, w.last_seq) for w in skipping] == [(0, 1), (5, 6), (10, 11)]


def test_flatten_and_batch_layouts():
    flat = push_all(WindowAssembler(3, flatten=True), [rec(i) for i in range(3)])[0]
    np.testing.assert_array_equal(flat.data, [0, 0, 1, -1, 2, -2])
    batched = WindowAssembler(3, flatten=True, batch=True)
    assert push_all(batched, [rec(i) for i in range(3)])[0].data.shape == (1, 6)
    assert batched.shape == (1, 6)
    assert push_all(WindowAssembler(3, batch=True), [rec(i) for i in range(3)])[0].data.shape == (
        1,
        3,
        2,
    )


def test_wrong_channel_count_is_refused_and_counted():
    asm = WindowAssembler(2, hop=1, channels=2, reset_on_gap=False)
    assert asm.push(rec(0, 1.0, 2.0, 3.0)) is None
    windows = push_all(asm, [rec(1), rec(2)])
    assert asm.rejected == 1 and [w.last_seq for w in windows] == [2]


def test_learned_channel_count_sticks():
    asm = WindowAssembler(2, hop=1)
    asm.push(rec(0, 1.0))
    asm.push(rec(1, 1.0, 2.0))
    assert (asm.channels, asm.rejected) == (1, 1)


def test_gap_resets_the_window():
    asm = WindowAssembler(3, hop=1)
    windows = push_all(asm, [rec(0), rec(1), rec(2), rec(3), rec(7), rec(8), rec(9)])
    assert [(w.first_seq, w.last_seq) for w in windows] == [(0, 2), (1, 3), (7, 9)]
    assert asm.gaps == 1


def test_gap_without_reset_keeps_sliding():
    asm = WindowAssembler(3, hop=1, reset_on_gap=False)
    windows = push_all(asm, [rec(0), rec(1), rec(2), rec(5), rec(6)])
    assert [(w.first_seq, w.last_seq) for w in windows] == [(0, 2), (1, 5), (2, 6)]
    assert asm.gaps == 1


def test_sequence_wraps_without_a_gap():
    asm = WindowAssembler(4, hop=1)
    windows = push_all(asm, [rec(s) for s in range(0xFFFE, 0x10003)])
    assert asm.gaps == 0
    assert [(w.first_seq, w.last_seq) for w in windows] == [(0xFFFE, 1), (0xFFFF, 2)]


def test_reset_starts_a_fresh_window():
    asm = WindowAssembler(3, hop=1)
    push_all(asm, [rec(0), rec(1)])
    asm.reset()
    assert asm.buffered == 0
    windows = push_all(asm, [rec(40), rec(41), rec(42)])
    assert [w.first_seq for w in windows] == [40] and asm.gaps == 0


@pytest.mark.parametrize(
    "kwargs", [{"window": 0}, {"window": 2, "hop": 0}, {"window": 2, "channels": 0}]
)
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        WindowAssembler(**kwargs)
