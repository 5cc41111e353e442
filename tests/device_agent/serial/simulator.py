"""A fake microcontroller on the master side of a real pseudo-terminal.

The bridge under test opens the pty's slave side through a stable path (a symlink, like
``/dev/serial/by-id/...`` on a real system), so "unplug" can make that path vanish and "plug"
can bring it back pointing at a brand-new pty, exactly what the bridge sees when a USB serial
adapter is pulled and re-inserted.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path

from device_agent.serial.framing import (
    ErrorReport,
    FrameDecoder,
    Hello,
    Message,
    Result,
    SensorRecord,
    encode_frame,
)

__all__ = ["DeviceSimulator", "wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.005)


class DeviceSimulator:
    """Writes framed sensor records to a pty and collects the frames the host sends back."""

    def __init__(self, link: Path, *, channels: int, name: str = "sim") -> None:
        self.link = link
        self.channels = channels
        self.name = name
        self.seq = 0
        self.timestamp_ms = 0
        self.decoder = FrameDecoder()
        self.received: list[Message] = []
        self._lock = threading.Lock()
        self._master: int | None = None
        self._slave: int | None = None
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ plug / unplug

    def plug(self) -> str:
        """Create a new pty and point the link at it; return the slave's real path."""
        assert self._master is None, "already plugged"
        master, slave = os.openpty()
        # Raw mode before anyone reads: no echo, no CR/LF translation of binary frames.
        tty.setraw(slave)
        # Keep our slave fd open so the master never sees EIO while the bridge reconnects.
        self._master, self._slave = master, slave
        tmp = self.link.with_name(self.link.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        os.replace(tmp, self.link)
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, args=(master, self._stop))
        self._reader.daemon = True
        self._reader.start()
        return os.ttyname(slave)

    def unplug(self) -> None:
        """Remove the link and destroy the pty, like pulling the USB cable."""
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        if self._reader is not None:
            self._stop.set()
            self._reader.join(5.0)
            self._reader = None
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None
        self.decoder.reset()

    close = unplug

    # ----------------------------------------------------------------------- sending

    def write(self, data: bytes) -> None:
        """Write raw bytes (frames, garbage) to the host."""
        assert self._master is not None, "not plugged"
        view = memoryview(data)
        while view:
            written = os.write(self._master, view)
            view = view[written:]

    def record(self, values: Sequence[float] | None = None) -> SensorRecord:
        """The next record in sequence (advancing seq and a 10 ms clock), not yet sent."""
        vals = tuple(float(v) for v in (values if values is not None else [0.0] * self.channels))
        rec = SensorRecord(seq=self.seq, timestamp_ms=self.timestamp_ms, values=vals)
        self.seq = (self.seq + 1) & 0xFFFF
        self.timestamp_ms += 10
        return rec

    def send_record(self, values: Sequence[float] | None = None) -> SensorRecord:
        rec = self.record(values)
        self.write(encode_frame(rec))
        return rec

    def send_records(self, rows: Sequence[Sequence[float]]) -> list[SensorRecord]:
        """Send several records in one write (as a fast device would)."""
        recs = [self.record(row) for row in rows]
        self.write(b"".join(encode_frame(r) for r in recs))
        return recs

    def send_hello(self, sample_period_ms: int = 10) -> None:
        """Announce a (re)boot: record numbering and the clock start over."""
        self.seq = 0
        self.timestamp_ms = 0
        hello = Hello(
            seq=0, channels=self.channels, sample_period_ms=sample_period_ms, name=self.name
        )
        self.write(b"\x00" + encode_frame(hello))

    # ---------------------------------------------------------------------- receiving

    def _read_loop(self, master: int, stop: threading.Event) -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master], [], [], 0.02)
            if not ready:
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            messages = self.decoder.feed(data)
            with self._lock:
                self.received.extend(messages)

    def messages(self) -> list[Message]:
        with self._lock:
            return list(self.received)

    def results(self) -> list[Result]:
        return [m for m in self.messages() if isinstance(m, Result)]

    def errors(self) -> list[ErrorReport]:
        return [m for m in self.messages() if isinstance(m, ErrorReport)]

    def wait_results(self, count: int, timeout: float = 5.0) -> list[Result]:
        wait_until(lambda: len(self.results()) >= count, timeout, f"{count} RESULT frames")
        return self.results()
