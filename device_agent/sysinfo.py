"""Host health for telemetry: CPU, memory, disk, temperature, uptime. Standard library only.

Read straight from Linux's ``/proc`` and ``/sys`` instead of depending on psutil, which has no
wheels for some boards the agent runs on and would be the agent's only compiled dependency for
five numbers. Every reading is optional: a value the board does not expose (no thermal zone in
a container, no ``/proc`` on macOS during development) is ``None``, never an exception, because
telemetry must keep flowing on odd hardware.

CPU usage is a *delta* between two samples of ``/proc/stat`` (the kernel only keeps totals since
boot), so :class:`SystemProbe` keeps the previous sample and the first call reports ``None``.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuTimes", "SystemProbe", "SystemSample", "read_cpu_times"]

#: Thermal zones report millidegrees Celsius; readings outside this range are sensor errors
#: (some boards report -273150 or 0xFFFF... for an absent sensor).
_PLAUSIBLE_C = (-60.0, 200.0)


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate CPU jiffies from the first line of ``/proc/stat``."""

    busy: int
    total: int


@dataclass(frozen=True)
class SystemSample:
    """One reading of the host; field names match ``edgekit.protocol.SystemStats``."""

    cpu_percent: float | None = None
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    rss_bytes: int | None = None
    disk_free_bytes: int | None = None
    temperature_c: float | None = None
    uptime_s: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "cpu_percent": self.cpu_percent,
            "mem_total_bytes": self.mem_total_bytes,
            "mem_available_bytes": self.mem_available_bytes,
            "rss_bytes": self.rss_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "temperature_c": self.temperature_c,
            "uptime_s": self.uptime_s,
        }


def read_cpu_times(proc: Path = Path("/proc")) -> CpuTimes | None:
    """``user nice system idle iowait irq softirq steal`` from ``/proc/stat``; idle and iowait
    count as idle. guest/guest_nice are already included in user/nice, so they are skipped."""
    try:
        with open(proc / "stat", encoding="ascii") as handle:
            first = handle.readline().split()
    except (OSError, UnicodeDecodeError):
        return None
    if not first or first[0] != "cpu" or len(first) < 5:
        return None
    try:
        values = [int(v) for v in first[1:9]]
    except ValueError:
        return None
    total = sum(values)
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return CpuTimes(busy=total - idle, total=total)


def _read_meminfo(proc: Path) -> dict[str, int]:
    result: dict[str, int] = {}
    try:
        with open(proc / "meminfo", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    scale = 1024 if len(parts) > 1 and parts[1] == "kB" else 1
                    result[key.strip()] = int(parts[0]) * scale
    except (OSError, UnicodeDecodeError):
        return {}
    return result


def _read_rss(proc: Path) -> int | None:
    """Resident set size of this process (``/proc/self/statm``, in pages)."""
    try:
        fields = (proc / "self" / "statm").read_text(encoding="ascii").split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _read_uptime(proc: Path) -> float | None:
    try:
        return float((proc / "uptime").read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _read_temperature(sys_root: Path) -> float | None:
    """The hottest thermal zone in degrees Celsius: the one that throttles the board first."""
    hottest: float | None = None
    try:
        zones = sorted((sys_root / "class" / "thermal").glob("thermal_zone*"))
    except OSError:
        return None
    for zone in zones:
        try:
            celsius = int((zone / "temp").read_text(encoding="ascii").strip()) / 1000.0
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if _PLAUSIBLE_C[0] <= celsius <= _PLAUSIBLE_C[1]:
            hottest = celsius if hottest is None else max(hottest, celsius)
    return hottest


class SystemProbe:
    """Samples the host; keep one per agent and call :meth:`sample` once per telemetry period.

    ``state_dir`` is where the agent keeps its bundles and outbox: its file system is the one
    whose free space matters. ``proc`` and ``sys_root`` exist for tests (fake trees).
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        proc: str | Path = "/proc",
        sys_root: str | Path = "/sys",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.proc = Path(proc)
        self.sys_root = Path(sys_root)
        self._lock = threading.Lock()
        self._last_cpu = read_cpu_times(self.proc)

    def cpu_percent(self) -> float | None:
        """Busy share of all CPUs since the previous call (or construction), 0-100."""
        current = read_cpu_times(self.proc)
        with self._lock:
            previous, self._last_cpu = self._last_cpu, current
        if current is None or previous is None:
            return None
        total = current.total - previous.total
        if total <= 0:
            return None  # no tick elapsed (or the counters went backwards): no information
        busy = min(max(current.busy - previous.busy, 0), total)
        return round(100.0 * busy / total, 2)

    def disk_free_bytes(self) -> int | None:
        try:
            return shutil.disk_usage(self.state_dir).free
        except OSError:
            return None

    def sample(self) -> SystemSample:
        meminfo = _read_meminfo(self.proc)
        available = meminfo.get("MemAvailable")
        if available is None and "MemFree" in meminfo:
            # Kernels before 3.14 lack MemAvailable; free + page cache is the usual estimate.
            available = meminfo["MemFree"] + meminfo.get("Buffers", 0) + meminfo.get("Cached", 0)
        return SystemSample(
            cpu_percent=self.cpu_percent(),
            mem_total_bytes=meminfo.get("MemTotal"),
            mem_available_bytes=available,
            rss_bytes=_read_rss(self.proc),
            disk_free_bytes=self.disk_free_bytes(),
            temperature_c=_read_temperature(self.sys_root),
            uptime_s=_read_uptime(self.proc),
        )
