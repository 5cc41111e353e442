"""Assemble a stream of SENSOR_RECORDs into fixed-size model inputs.

A model for sensor data looks at a window of ``W`` consecutive samples of ``C`` channels; the
device sends one sample per frame. :class:`WindowAssembler` keeps the last ``W`` records and
emits a window every ``H`` (hop) records: ``H < W`` gives overlapping, sliding windows (lower
latency, more inferences), ``H == W`` gives back-to-back windows, ``H > W`` skips records.

Two guards keep windows meaningful rather than merely well-shaped:

* a record whose channel count differs from the model's is refused and counted, never padded
  or truncated into a window;
* with ``reset_on_gap`` (the default) a jump in the record sequence number, which means
  frames were lost on the wire (or refused above) or the device restarted, empties the buffer,
  so no window ever stitches together samples that were not consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device_agent.serial.framing import SensorRecord

__all__ = ["Window", "WindowAssembler"]

_SEQ_MASK = 0xFFFF


@dataclass(frozen=True, slots=True)
class Window:
    """One model input and where it came from in the record stream.

    ``data`` is float32 of shape ``(W, C)``, or ``(W * C,)`` when flattened, with a leading
    axis of 1 when a batch axis was asked for. It is a fresh array the caller may keep.
    """

    data: npt.NDArray[np.float32]
    first_seq: int
    last_seq: int
    timestamp_ms: int
    """Device timestamp of the newest record in the window."""


class WindowAssembler:
    """Sliding windows of ``window`` records, one emitted every ``hop`` accepted records.

    ``channels=None`` learns the channel count from the first record and keeps it for the life
    of the assembler (a model's input shape does not change at runtime).
    """

    def __init__(
        self,
        window: int,
        *,
        hop: int | None = None,
        channels: int | None = None,
        flatten: bool = False,
        batch: bool = False,
        reset_on_gap: bool = True,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        hop = window if hop is None else hop
        if hop < 1:
            raise ValueError(f"hop must be >= 1, got {hop}")
        if channels is not None and channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.window = window
        self.hop = hop
        self.channels = channels
        self.flatten = flatten
        self.batch = batch
        self.reset_on_gap = reset_on_gap

        self._buf: npt.NDArray[np.float32] | None = None
        self._next = 0  # ring index the next record is written to
        self._filled = 0
        self._until_emit = window
        self._last_seq: int | None = None
        self._seqs: list[int] = [0] * window

        self.records = 0
        """Records accepted into the buffer."""
        self.rejected = 0
        """Records refused for a wrong channel count."""
        self.gaps = 0
        """Sequence discontinuities seen (lost frames, refused records, device restarts)."""
        self.windows = 0
        """Windows emitted."""

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the emitted arrays, once the channel count is known."""
        if self.channels is None:
            return None
        core: tuple[int, ...] = (
            (self.window * self.channels,) if self.flatten else (self.window, self.channels)
        )
        return (1, *core) if self.batch else core

    @property
    def buffered(self) -> int:
        """Records currently held towards the next window."""
        return self._filled

    def reset(self) -> None:
        """Start over (after a reconnect or a device restart); counters and channels are kept."""
        self._next = 0
        self._filled = 0
        self._until_emit = self.window
        self._last_seq = None

    def push(self, record: SensorRecord) -> Window | None:
        """Add one record; return the window it completes, if any."""
        if self.channels is None:
            self.channels = record.channels
        if record.channels != self.channels:
            self.rejected += 1
            return None
        if self._last_seq is not None and record.seq != (self._last_seq + 1) & _SEQ_MASK:
            self.gaps += 1
            if self.reset_on_gap:
                self.reset()
        if self._buf is None:
            self._buf = np.empty((self.window, self.channels), dtype=np.float32)

        self._buf[self._next] = record.values
        self._seqs[self._next] = record.seq
        self._next = (self._next + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        self._last_seq = record.seq
        self.records += 1

        self._until_emit -= 1
        if self._until_emit > 0 or self._filled < self.window:
            return None
        self._until_emit = self.hop
        self.windows += 1
        # The oldest record sits at the write index once the ring is full.
        data = np.concatenate((self._buf[self._next :], self._buf[: self._next]))
        if self.flatten:
            data = data.reshape(-1)
        if self.batch:
            data = data[np.newaxis]
        return Window(
            data=data,
            first_seq=self._seqs[self._next],
            last_seq=record.seq,
            timestamp_ms=record.timestamp_ms,
        )
