"""Host readings from /proc and /sys: computed right, and None (never an error) when absent."""

from __future__ import annotations

import os
from pathlib import Path

from device_agent.sysinfo import SystemProbe, SystemSample, read_cpu_times


def fake_host(root: Path, *, stat: str, zones: dict[str, str]) -> tuple[Path, Path]:
    proc, sys_root = root / "proc", root / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "stat").write_text(stat + "cpu0 1 2 3 4\nintr 5\n")
    (proc / "meminfo").write_text(
        "MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     400 kB\n"
    )
    (proc / "self" / "statm").write_text("1000 25 10 1 0 50 0\n")
    (proc / "uptime").write_text("123.45 67.80\n")
    for name, value in zones.items():
        zone = sys_root / "class" / "thermal" / name
        zone.mkdir(parents=True)
        (zone / "temp").write_text(value + "\n")
    return proc, sys_root


def test_cpu_memory_disk_temperature_uptime(tmp_path: Path) -> None:
    proc, sys_root = fake_host(
        tmp_path,
        stat="cpu  100 0 50 800 50 0 0 0 0 0\n",
        zones={"thermal_zone0": "45000", "thermal_zone1": "52500", "thermal_zone2": "-273150"},
    )
    probe = SystemProbe(tmp_path, proc=proc, sys_root=sys_root)
    (proc / "stat").write_text("cpu  200 0 100 850 50 0 0 0 0 0\n")
    sample = probe.sample()
    # busy 300-150 = 150 of total 1200-1000 = 200 jiffies
    assert sample.cpu_percent == 75.0
    assert sample.mem_total_bytes == 1000 * 1024
    assert sample.mem_available_bytes == 400 * 1024
    assert sample.rss_bytes == 25 * os.sysconf("SC_PAGE_SIZE")
    assert sample.uptime_s == 123.45
    assert sample.temperature_c == 52.5  # the hottest plausible zone
    assert sample.disk_free_bytes is not None and sample.disk_free_bytes > 0
    assert probe.cpu_percent() is None  # no tick elapsed since the last sample


def test_missing_sources_give_none(tmp_path: Path) -> None:
    probe = SystemProbe(tmp_path / "missing", proc=tmp_path / "no-proc", sys_root=tmp_path / "no")
    assert probe.sample() == SystemSample()
    assert read_cpu_times(tmp_path / "no-proc") is None


def test_old_kernels_without_memavailable(tmp_path: Path) -> None:
    proc, sys_root = fake_host(tmp_path, stat="cpu 1 2 3 4 5 6 7 8\n", zones={})
    (proc / "meminfo").write_text(
        "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 150 kB\n"
    )
    sample = SystemProbe(tmp_path, proc=proc, sys_root=sys_root).sample()
    assert sample.mem_available_bytes == 300 * 1024
    assert sample.temperature_c is None


def test_garbage_is_ignored(tmp_path: Path) -> None:
    proc, sys_root = fake_host(
        tmp_path, stat="intr 1 2 3\n", zones={"thermal_zone0": "hot", "thermal_zone1": "999999"}
    )
    (proc / "uptime").write_text("soon")
    (proc / "self" / "statm").write_text("")
    sample = SystemProbe(tmp_path, proc=proc, sys_root=sys_root).sample()
    assert sample.cpu_percent is None
    assert sample.temperature_c is None and sample.uptime_s is None and sample.rss_bytes is None


def test_this_host() -> None:
    sample = SystemProbe("/").sample()
    assert sample.mem_total_bytes is None or sample.mem_total_bytes > 0
    assert sample.disk_free_bytes is not None
    assert set(sample.as_dict()) == {
        "cpu_percent",
        "mem_total_bytes",
        "mem_available_bytes",
        "rss_bytes",
        "disk_free_bytes",
        "temperature_c",
        "uptime_s",
    }
