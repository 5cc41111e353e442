"""Run a model on sensor data arriving over a serial port and send the answers back.

:class:`SerialBridge` owns one port and one loop: read bytes, decode frames, assemble windows,
call ``predict``, write RESULT frames. It is built for a device that gets unplugged, reset and
fed noise, because that is the normal life of a USB-serial microcontroller on a shop floor:

* a bad frame is counted and skipped (see :class:`~device_agent.serial.framing.FrameDecoder`);
* a ``predict`` that raises, or returns something that is not a score vector, is counted,
  logged (rate-limited) and answered with an ERROR frame for that window; the loop goes on;
* a port that fails (``SerialException`` or ``OSError``: unplugged, EIO from a pty whose other
  side closed, a path that vanished) is closed and reopened with exponential backoff until the
  bridge is stopped; a partial frame and a partial window never survive a reconnect;
* a device that stops reading cannot wedge the loop: writes have a timeout, a timed-out RESULT
  is dropped and counted, and the next frame starts with an extra 0x00 so the device's
  decoder resynchronizes after the torn frame.

Inference runs on the reader thread, so ``predict`` must take less time than ``hop`` sample
periods on average; the OS serial buffer (typically 4 KiB) absorbs short stalls.

Counters are exposed through :meth:`SerialBridge.counters` for telemetry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import serial

from device_agent.serial.errors import BadModelOutput
from device_agent.serial.framing import (
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    MAX_TEXT_BYTES,
    ErrorCode,
    ErrorReport,
    FrameDecoder,
    Hello,
    Message,
    Result,
    SensorRecord,
    encode_frame,
)
from device_agent.serial.windows import Window, WindowAssembler

__all__ = ["BridgeCounters", "PredictFn", "SerialBridge"]

logger = logging.getLogger(__name__)

PredictFn = Callable[[npt.NDArray[np.float32]], Mapping[str, npt.ArrayLike]]
"""What the bridge calls with each window: the runtime layer's ``predict`` fits as is."""

_RESULT_FIXED = HEADER_SIZE + 8 + 2  # header, window_seq/class_index/score, CRC
_LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class BridgeCounters:
    """A snapshot of the bridge's counters (monotonic over the bridge's life)."""

    frames_ok: int = 0
    """Frames that decoded to a message."""
    frames_bad: int = 0
    """Frames refused by the decoder; ``bad_by_reason`` splits them by error reason."""
    bad_by_reason: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    records: int = 0
    """SENSOR_RECORDs accepted into windows."""
    records_rejected: int = 0
    """SENSOR_RECORDs refused for a wrong channel count."""
    sequence_gaps: int = 0
    """Jumps in the record sequence (lost frames, refused records, device restarts)."""
    windows: int = 0
    """Windows handed to ``predict``."""
    results_sent: int = 0
    predict_errors: int = 0
    """Windows for which ``predict`` raised or returned an unusable output."""
    write_timeouts: int = 0
    """Frames dropped because the device did not drain its input in time."""
    connects: int = 0
    """Successful port opens, the first one included."""
    reconnects: int = 0
    """Successful opens after a connection was lost (``connects - 1`` once it has ever run)."""
    disconnects: int = 0
    """Open connections that failed with a port error."""
    open_failures: int = 0
    hellos: int = 0
    """HELLO frames received (each one means the device (re)started)."""
    errors_received: int = 0
    """ERROR frames received from the device."""
    unexpected: int = 0
    """Well-formed frames of a type the host does not accept (e.g. a RESULT echoed back)."""


class SerialBridge:
    """Feed windows of sensor records from ``port`` to ``predict`` and send RESULTs back.

    ``port`` is anything :func:`serial.serial_for_url` opens: ``/dev/ttyACM0``, a pty path, a
    symlink such as ``/dev/serial/by-id/...`` (recommended: it survives re-enumeration), or a
    URL like ``loop://``.

    The RESULT for a window carries the argmax of the model output ``output_name`` (the first
    output in the mapping when ``None``) and its score; with ``send_outputs`` the whole output
    vector too, when it fits in a frame. ``window``, ``hop``, ``channels``, ``flatten``,
    ``batch`` and ``reset_on_gap`` configure the :class:`WindowAssembler`.
    """

    def __init__(
        self,
        port: str,
        *,
        predict: PredictFn,
        window: int,
        hop: int | None = None,
        baudrate: int = 115_200,
        channels: int | None = None,
        flatten: bool = False,
        batch: bool = False,
        reset_on_gap: bool = True,
        output_name: str | None = None,
        send_outputs: bool = False,
        reconnect_interval: float = 0.5,
        max_reconnect_interval: float = 5.0,
        read_timeout: float = 0.05,
        write_timeout: float = 1.0,
        max_frame_size: int = MAX_FRAME_SIZE,
        serial_options: Mapping[str, Any] | None = None,
    ) -> None:
        if reconnect_interval <= 0 or max_reconnect_interval < reconnect_interval:
            raise ValueError("need 0 < reconnect_interval <= max_reconnect_interval")
        if read_timeout <= 0 or write_timeout <= 0:
            raise ValueError("read_timeout and write_timeout must be > 0")
        self.port = port
        self.baudrate = baudrate
        self.output_name = output_name
        self.send_outputs = send_outputs
        self.reconnect_interval = reconnect_interval
        self.max_reconnect_interval = max_reconnect_interval
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_frame_size = max_frame_size
        self.serial_options: dict[str, Any] = dict(serial_options or {})
        self._predict = predict
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._windows = WindowAssembler(
            window,
            hop=hop,
            channels=channels,
            flatten=flatten,
            batch=batch,
            reset_on_gap=reset_on_gap,
        )
        self._max_outputs = (max_frame_size - _RESULT_FIXED) // 4

        self._tx_seq = 0
        self._resync_next_write = False
        self._last_log: dict[str, float] = {}
        self._connected = False
        self._device: Hello | None = None
        self._last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

        self._results_sent = 0
        self._predict_errors = 0
        self._write_timeouts = 0
        self._connects = 0
        self._reconnects = 0
        self._disconnects = 0
        self._open_failures = 0
        self._hellos = 0
        self._errors_received = 0
        self._unexpected = 0

    # ---------------------------------------------------------------------------- status

    @property
    def connected(self) -> bool:
        """Whether the port is open right now."""
        return self._connected

    @property
    def running(self) -> bool:
        """Whether the thread started by :meth:`start` is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def device(self) -> Hello | None:
        """The last HELLO the device sent, if any (its name, channel count, sample period)."""
        return self._device

    @property
    def last_error(self) -> str | None:
        """The most recent port or predict error, as one line, for status displays."""
        return self._last_error

    def counters(self) -> BridgeCounters:
        """Snapshot the counters; safe to call from any thread while the loop runs.

        Fields are read one after another without pausing the loop, so two fields may differ
        by the few events that happened in between.
        """
        dec, win = self._decoder, self._windows
        return BridgeCounters(
            frames_ok=dec.frames_ok,
            frames_bad=dec.frames_bad,
            bad_by_reason=dict(dec.bad_by_reason),
            bytes_in=dec.bytes_in,
            records=win.records,
            records_rejected=win.rejected,
            sequence_gaps=win.gaps,
            windows=win.windows,
            results_sent=self._results_sent,
            predict_errors=self._predict_errors,
            write_timeouts=self._write_timeouts,
            connects=self._connects,
            reconnects=self._reconnects,
            disconnects=self._disconnects,
            open_failures=self._open_failures,
            hellos=self._hellos,
            errors_received=self._errors_received,
            unexpected=self._unexpected,
        )

    # -------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Run the loop on a daemon thread until :meth:`stop`."""
        if self.running:
            raise RuntimeError("bridge is already running")
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name=f"serial-bridge:{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to finish and wait up to ``timeout`` seconds for it; closes the port.

        The loop notices within ``read_timeout`` plus the duration of a ``predict`` call.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("serial bridge on %s did not stop within %.1fs", self.port, timeout)
            else:
                self._thread = None

    def __enter__(self) -> SerialBridge:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def run(self, stop_event: threading.Event) -> None:
        """Open, pump and reopen the port until ``stop_event`` is set (blocks the caller)."""
        delay = self.reconnect_interval
        ever_connected = False
        while not stop_event.is_set():
            try:
                port = self._open()
            except (serial.SerialException, OSError) as exc:
                # A ValueError (bad URL scheme, bad baud rate) is a configuration error that no
                # retry can fix, so it is left to propagate.
                self._open_failures += 1
                self._last_error = f"open {self.port}: {exc}"
                self._log_limited("open", logging.WARNING, "%s; retrying", self._last_error)
                stop_event.wait(delay)
                delay = min(delay * 2, self.max_reconnect_interval)
                continue

            self._connects += 1
            if ever_connected:
                self._reconnects += 1
            ever_connected = True
            delay = self.reconnect_interval
            self._last_log.pop("open", None)
            logger.info("serial bridge connected to %s", self.port)
            try:
                self._pump(port, stop_event)
            except (serial.SerialException, OSError) as exc:
                self._disconnects += 1
                self._last_error = f"{self.port}: {exc}"
                logger.warning("serial port lost (%s); reconnecting", self._last_error)
                stop_event.wait(self.reconnect_interval)
            finally:
                self._connected = False
                self._close(port)

    # ------------------------------------------------------------------------------- port

    def _open(self) -> Any:
        port = serial.serial_for_url(
            self.port,
            baudrate=self.baudrate,
            timeout=self.read_timeout,
            write_timeout=self.write_timeout,
            **self.serial_options,
        )
        # Nothing from before this connection may leak into it: a partial frame would be
        # refused anyway, but a partial window would silently join two connections.
        self._decoder.reset()
        self._windows.reset()
        self._resync_next_write = True
        self._connected = True
        return port

    @staticmethod
    def _close(port: Any) -> None:
        try:
            port.close()
        except (serial.SerialException, OSError) as exc:
            logger.debug("closing serial port failed: %s", exc)

    def _pump(self, port: Any, stop_event: threading.Event) -> None:
        while not stop_event.is_set():
            # Block for at least one byte (up to read_timeout), then take whatever is queued.
            data = port.read(max(1, port.in_waiting))
            if data:
                for message in self._decoder.feed(data):
                    self._handle(message, port)

    def _send(self, port: Any, message: Message) -> bool:
        frame = encode_frame(message, max_frame_size=self.max_frame_size)
        if self._resync_next_write:
            frame = b"\x00" + frame
        try:
            port.write(frame)
        except serial.SerialTimeoutException:
            # Part of the frame may be on the wire; lead the next one with a delimiter.
            self._write_timeouts += 1
            self._resync_next_write = True
            self._log_limited("write", logging.WARNING, "write to %s timed out", self.port)
            return False
        self._resync_next_write = False
        self._tx_seq = (self._tx_seq + 1) & 0xFFFF
        return True

    # ---------------------------------------------------------------------------- messages

    def _handle(self, message: Message, port: Any) -> None:
        if isinstance(message, SensorRecord):
            window = self._windows.push(message)
            if window is not None:
                self._infer(window, port)
        elif isinstance(message, Hello):
            self._hellos += 1
            self._device = message
            # A HELLO means the device (re)booted: its sequence numbers started over.
            self._windows.reset()
            expected = self._windows.channels
            if expected is not None and message.channels not in (0, expected):
                logger.warning(
                    "device %r announces %d channels; the model window expects %d",
                    message.name,
                    message.channels,
                    expected,
                )
            logger.info(
                "device %r: %d channels every %d ms",
                message.name,
                message.channels,
                message.sample_period_ms,
            )
        elif isinstance(message, ErrorReport):
            self._errors_received += 1
            self._log_limited(
                f"device-error-{int(message.code)}",
                logging.WARNING,
                "device reported error %d at seq %d: %s",
                int(message.code),
                message.ref_seq,
                message.text,
            )
        else:
            self._unexpected += 1
            logger.debug("ignoring %s frame from the device", message.type.name)

    def _infer(self, window: Window, port: Any) -> None:
        try:
            outputs = self._predict(window.data)
            result = self._to_result(window, outputs)
        except Exception as exc:
            # Any failure of the model is a per-window event, never a reason to stop reading.
            self._predict_errors += 1
            self._last_error = f"predict: {type(exc).__name__}: {exc}"
            self._log_limited(
                f"predict-{type(exc).__name__}",
                logging.WARNING,
                "predict failed for window ending at seq %d: %s",
                window.last_seq,
                self._last_error,
                exc_info=True,
            )
            text = type(exc).__name__.encode("ascii", "replace")[:MAX_TEXT_BYTES].decode()
            report = ErrorReport(
                seq=self._tx_seq, code=ErrorCode.PREDICT_FAILED, ref_seq=window.last_seq, text=text
            )
            self._send(port, report)
            return
        if self._send(port, result):
            self._results_sent += 1

    def _to_result(self, window: Window, outputs: Mapping[str, npt.ArrayLike]) -> Result:
        if self.output_name is not None:
            if self.output_name not in outputs:
                raise BadModelOutput(
                    f"model has no output {self.output_name!r}; it has {sorted(outputs)}"
                )
            value = outputs[self.output_name]
        else:
            if not outputs:
                raise BadModelOutput("predict returned no outputs")
            value = next(iter(outputs.values()))
        scores = np.asarray(value, dtype=np.float32)
        while scores.ndim > 1 and scores.shape[0] == 1:
            scores = scores[0]  # drop batch axes of size 1
        if scores.ndim > 1:
            raise BadModelOutput(f"output shape {scores.shape} is not a vector of scores")
        scores = scores.reshape(-1)
        if scores.size == 0:
            raise BadModelOutput("output is empty")
        if scores.size > 0x8000:
            raise BadModelOutput(f"{scores.size} classes do not fit the int16 class index")
        index = int(np.argmax(scores))
        raw: tuple[float, ...] = ()
        if self.send_outputs:
            if scores.size <= self._max_outputs:
                raw = tuple(float(v) for v in scores)
            else:
                self._log_limited(
                    "outputs-too-long",
                    logging.WARNING,
                    "output has %d values, a frame holds %d; sending the class and score only",
                    scores.size,
                    self._max_outputs,
                )
        return Result(
            seq=self._tx_seq,
            window_seq=window.last_seq,
            class_index=index,
            score=float(scores[index]),
            outputs=raw,
        )

    # ----------------------------------------------------------------------------- logging

    def _log_limited(
        self, key: str, level: int, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        """Log ``msg`` at ``level`` once per ``_LOG_EVERY_S`` for ``key``, else at DEBUG.

        A device streaming at 100 Hz into a broken model would otherwise write 100 tracebacks
        a second to the device's flash.
        """
        now = time.monotonic()
        last = self._last_log.get(key)
        if last is None or now - last >= _LOG_EVERY_S:
            self._last_log[key] = now
            logger.log(level, msg, *args, exc_info=exc_info)
        else:
            logger.debug(msg, *args)
