"""Peak memory of loading and running a model: the resident-set growth it causes.

How it is measured (Linux): the kernel's peak-RSS counter (``VmHWM``) is reset by writing ``5``
to ``/proc/self/clear_refs``; the current RSS is read as the baseline; the session is created and
run once at batch 1 and once at batch N; the peak RSS minus the baseline is reported.

Two modes:

* ``subprocess`` (default): a fresh Python process imports numpy and the runtime library
  (onnxruntime, or the TFLite interpreter's library) first, so that their own cost is in the
  baseline, and then loads and runs the model on zero-filled inputs of the real shapes.
  Isolated and repeatable: nothing that earlier sessions freed can be reused.
* ``inprocess``: the same in the calling process; cheaper, but it *underestimates* when memory
  freed by earlier sessions is still held by the allocator and reused.

Where ``clear_refs`` cannot be written the growth of the current RSS (after - before) is reported
instead, and ``method`` says so. On non-Linux systems the number is ``None``.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "MemoryMode",
    "MemoryStats",
    "measure_memory",
]

MemoryMode = Literal["subprocess", "inprocess", "off"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class MemoryStats:
    """RSS growth caused by loading + running a session; ``None`` when unavailable."""

    peak_rss_delta_bytes: int | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def rss_growth(action: Callable[[], None]) -> MemoryStats:
    """Run ``action`` and report the peak RSS growth it caused in this process."""
    gc.collect()
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    if before is None:
        action()
        return MemoryStats(None, "unavailable (no /proc/self/status)")
    action()
    if reset:
        peak = _status_kib("VmHWM")
        method = "peak RSS (VmHWM) minus RSS before loading"
    else:
        peak = _status_kib("VmRSS")
        method = "RSS after minus RSS before (peak counter not resettable)"
    if peak is None:
        return MemoryStats(None, "unavailable")
    return MemoryStats(max(0, peak - before) * 1024, method)


FeedShapes = Sequence[Mapping[str, tuple[Sequence[int], str]]]
"""Feeds to run, each ``{input_name: (shape, dtype_name)}`` (zero-filled in the probe)."""


def _load_and_run(model_path: str, feeds: FeedShapes, threads: int | None, runtime: str) -> None:
    import numpy as np

    from .runtime import open_runner

    runner = open_runner(model_path, runtime=runtime, threads=threads)
    for feed in feeds:
        arrays = {
            name: np.zeros(tuple(shape), dtype=dtype) for name, (shape, dtype) in feed.items()
        }
        runner.run(arrays)
    del runner


def measure_memory(
    model_path: str | Path,
    feeds: FeedShapes,
    *,
    mode: MemoryMode = "subprocess",
    threads: int | None = 1,
    timeout: float = 120.0,
    runtime: str = "onnxruntime",
) -> MemoryStats:
    """Peak RSS growth of loading ``model_path`` and running each feed once (see module doc).

    ``runtime``: ``onnxruntime`` or ``tflite`` (feeds are float-facing, see
    :class:`~converters.runtime.ModelRunner`).
    """
    if mode == "off":
        return MemoryStats(None, "off")
    if mode == "inprocess":
        stats = rss_growth(lambda: _load_and_run(str(model_path), feeds, threads, runtime))
        return MemoryStats(stats.peak_rss_delta_bytes, f"in-process: {stats.method}")
    request = json.dumps(
        {
            "model": str(model_path),
            "feeds": [{k: [list(v[0]), v[1]] for k, v in f.items()} for f in feeds],
            "threads": threads,
            "runtime": runtime,
        }
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "converters.memory"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return MemoryStats(None, f"subprocess failed: {type(exc).__name__}")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return MemoryStats(None, f"subprocess failed: {last}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        delta = data["peak_rss_delta_bytes"]
        return MemoryStats(None if delta is None else int(delta), f"subprocess: {data['method']}")
    except (ValueError, KeyError, IndexError):
        return MemoryStats(None, "subprocess failed: unreadable answer")


def _main() -> None:
    """Probe entry point: read a request on stdin, print one JSON line of MemoryStats."""
    request = json.loads(sys.stdin.read())
    # Import everything the load path needs before the baseline is taken: only the model's own
    # cost must show in the delta.
    import numpy  # noqa: F401

    from . import runtime

    kind = request.get("runtime", runtime.RUNTIME_ONNX)
    if kind == runtime.RUNTIME_TFLITE:
        from device_agent.runtime import quant  # noqa: F401
        from device_agent.runtime.tflite import load_interpreter_class

        load_interpreter_class()
    else:
        import onnxruntime  # noqa: F401

    feeds = [{k: (tuple(v[0]), str(v[1])) for k, v in f.items()} for f in request["feeds"]]
    stats = rss_growth(lambda: _load_and_run(request["model"], feeds, request["threads"], kind))
    print(json.dumps(stats.to_dict()))


if __name__ == "__main__":
    _main()
