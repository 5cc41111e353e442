"""10,000 devices on one machine: two controller replicas on PostgreSQL keep up with the fleet.

Targets (issue: fleet in the open, scale-out), all on loopback, one mosquitto broker:

* **connections**: 10,000 simulated devices (``edgekit simulate``, one MQTT 5 connection each,
  split over ``--sim-processes`` processes) connected at once;
* **ingest**: each device reports every 10 s (1,000 messages/s in all); two controller
  replicas (``--shared-group``, one PostgreSQL database) store what the devices publish at
  >= 0.99x the publish rate and >= 0.99x what a bare ``mosquitto_sub`` on the same topics
  receives in the same window, with **no growing backlog**: published minus stored, sampled
  every 2 s, has a slope that is a negligible share of the publish rate;
* **registry**: the device list of the 10,000 devices in under 200 ms (p95) on PostgreSQL:
  through the REST API (pages of 1,000, the API's default page, and all 10,000 in one
  response) and directly (:meth:`Registry.list_devices`), against a bare ``SELECT`` of the
  same rows in the same rounds; measured while the fleet reports, and again with the
  simulators paused (SIGSTOP), which leaves the registry alone with whatever else the machine
  runs.

The ingest windows start once the replicas have caught up with the connection burst (every
device's status, reported and first telemetry at once; how long that took is printed). Each
figure is the median of ``--windows`` windows (ingest) or of ``--runs`` listings (registry),
with every value printed. The CPU each process used over the windows is read from ``/proc``,
with the whole machine's (a shared host's other work competes; ``not_this_fleet``); what one
simulator process can drive is its devices per CPU-second used.

    python benchmarks/bench_fleet_scale.py                  # 6 to 12 minutes
    python benchmarks/bench_fleet_scale.py --devices 2000 --windows 2 --window 20

If the machine cannot hold the connections (descriptors, memory, the broker refusing), the
script says how many connected and where it stopped, and measures the rest with those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The source tree first (tests/edgekit must not shadow the package), tests/support after it.
sys.path[:0] = [str(ROOT)]
sys.path.append(str(ROOT / "tests"))

from support.mosquitto import Broker, LineCounter, find_client, find_mosquitto, free_port  # noqa: E402
from support.postgres import PostgresServer, find_pg_bindir  # noqa: E402

from edgekit.fleet.client import FleetClient  # noqa: E402
from edgekit.fleet.db import Database  # noqa: E402
from edgekit.fleet.registry import Registry  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"
FLEET = "bench"
INGEST_RATIO_TARGET = 0.99
LIST_P95_TARGET_MS = 200.0
PAGE = 1000
UPSTREAM = ("status", "telemetry", "events", "reported")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- processes and their cost ----------------------------------------------------------------


def raise_fd_limit() -> int:
    """One descriptor per device connection, in the broker and in the simulators: the soft
    limit (1,024 by default) goes up to the hard limit, which children inherit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1_048_576
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return int(wanted)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (``/proc/PID/stat`` fields 14 and 15)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine (``/proc/stat``): other work on a shared
    host competes with the fleet, and the figures are read against it."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return float(sum(fields) - idle), float(sum(fields))


def postgres_pids() -> list[int]:
    """The PostgreSQL server's processes (the postmaster forks one per connection)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == "postgres":
                    pids.append(int(entry))
    return pids


class CpuMeter:
    """CPU used by named groups of processes between :meth:`start` and :meth:`stop`."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._t0 = 0.0
        self.result: dict[str, float] = {}

    def _read(self) -> dict[str, dict[int, float]]:
        return {name: {p: cpu_seconds(p) for p in pids()} for name, pids in self.groups.items()}

    def start(self) -> None:
        self._start = self._read()
        self._machine = machine_busy()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Cores used per group (CPU seconds per wall second), the whole machine's busy
        cores, and what of that is other processes' (not this fleet's)."""
        end = self._read()
        busy, total = machine_busy()
        wall = time.monotonic() - self._t0
        self.result = {
            name: round(
                sum(end[name].get(p, 0.0) - self._start[name].get(p, 0.0) for p in end[name])
                / wall,
                3,
            )
            for name in self.groups
        }
        cpus = os.cpu_count() or 1
        machine = (busy - self._machine[0]) / max(1.0, total - self._machine[1]) * cpus
        self.result["machine_busy"] = round(machine, 3)
        self.result["not_this_fleet"] = round(
            machine - sum(v for k, v in self.result.items() if k != "machine_busy"), 3
        )
        return self.result


def broker_connections(broker: Broker) -> int | None:
    """``$SYS/broker/clients/connected`` as the broker itself counts it."""
    binary = find_client("mosquitto_sub")
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [
                binary,
                "-h",
                broker.host,
                "-p",
                str(broker.port),
                "-C",
                "1",
                "-W",
                "15",
                "-t",
                "$SYS/broker/clients/connected",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
        return int(out) if out.isdigit() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def get_json(base: str, path: str, **params: Any) -> Any:
    """One authenticated GET of the REST API (the CLI's client has no paging options)."""
    query = urllib.parse.urlencode(params)
    request = urllib.request.Request(
        f"{base}{path}?{query}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return 0.0
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def wait(predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except Exception:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# --- the run ---------------------------------------------------------------------------------


class Fleet:
    """Broker, database, controllers, simulators and the reference subscriber of one run."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.controllers: list[tuple[subprocess.Popen[bytes], FleetClient]] = []
        self.sims: list[tuple[subprocess.Popen[bytes], Path, int]] = []
        self.broker: Broker | None = None
        self.pg: PostgresServer | None = None
        self.counter: LineCounter | None = None
        self.db_url = ""
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    @contextlib.contextmanager
    def running(self) -> Iterator[Fleet]:
        try:
            yield self
        finally:
            for proc in reversed(self.procs):
                if proc.poll() is None:
                    proc.terminate()
            for proc in reversed(self.procs):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            if self.counter is not None:
                self.counter.close()
            if self.broker is not None:
                self.broker.kill()
            if self.pg is not None:
                self.pg.stop()

    def start_infrastructure(self) -> None:
        mosquitto = find_mosquitto()
        if mosquitto is None:
            raise SystemExit("mosquitto is missing (Debian package mosquitto)")
        bindir = find_pg_bindir()
        if bindir is None:
            raise SystemExit("PostgreSQL server binaries are missing (Debian package postgresql)")
        self.pg = PostgresServer(bindir)
        self.pg.start()
        self.db_url = self.pg.create_database("fleet")
        self.broker = Broker(
            self.workdir / "broker",
            binary=mosquitto,
            persistence=False,
            options=[
                "max_connections -1",
                "max_queued_messages 200000",
                "sys_interval 2",
                "connection_messages false",
            ],
        )
        self.broker.start()

    def start_controllers(self) -> None:
        assert self.broker is not None
        for index in range(self.args.replicas):
            port = free_port()
            log = (self.workdir / f"controller-{index}.log").open("wb")
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "edgekit", "fleet", "serve",
                    "--broker", f"mqtt://{self.broker.host}:{self.broker.port}",
                    "--db", self.db_url,
                    "--artifacts", str(self.workdir / "artifacts"),
                    "--listen", f"127.0.0.1:{port}",
                    "--token", TOKEN,
                    "--fleet", FLEET,
                    "--replica-id", f"r{index}",
                    "--shared-group", "edgekit",
                    "--log-level", "warning",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            log.close()
            self.procs.append(proc)
            client = FleetClient(f"http://127.0.0.1:{port}", token=TOKEN, timeout=60)
            self.controllers.append((proc, client))
        for _proc, client in self.controllers:
            wait(lambda c=client: c.stats()["ready"], timeout=120, what="the controllers")
        wait(
            lambda: any(c.stats()["replica"]["leader"] for _, c in self.controllers),
            timeout=60,
            what="a leader",
        )

    def start_simulators(self) -> None:
        assert self.broker is not None
        total, parts = self.args.devices, self.args.sim_processes
        for index in range(parts):
            count = total // parts + (1 if index < total % parts else 0)
            stats_file = self.workdir / f"sim-{index}.json"
            log = (self.workdir / f"sim-{index}.log").open("wb")
            proc = subprocess.Popen(
                [
                    sys.executable, "-m", "edgekit", "simulate",
                    "--devices", str(count),
                    "--prefix", f"s{index}",
                    "--broker", f"mqtt://{self.broker.host}:{self.broker.port}",
                    "--fleet", FLEET,
                    "--interval", f"{self.args.interval}s",
                    "--group", "cameras",
                    "--no-download",
                    "--stats-file", str(stats_file),
                ],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )  # fmt: skip
            log.close()
            self.procs.append(proc)
            self.sims.append((proc, stats_file, count))

    def client(self, index: int = 0) -> FleetClient:
        return self.controllers[index % len(self.controllers)][1]

    def published(self) -> int:
        """Upstream messages the simulators say they published (their stats files)."""
        total = 0
        for _proc, stats_file, _count in self.sims:
            with contextlib.suppress(OSError, ValueError):
                stats = json.loads(stats_file.read_text())
                total += stats["telemetry"] + stats["events"] + stats["reported"]
        return total

    def stored(self) -> tuple[int, int, float]:
        """Messages processed by all replicas, their summed queue depth, the largest lag."""
        processed = depth = 0
        lag = 0.0
        for _proc, client in self.controllers:
            ingest = client.stats()["ingest"]
            processed += ingest["processed_total"] + ingest["malformed_total"]
            depth += ingest["queue_depth"]
            lag = max(lag, ingest["lag_s"])
        return processed, depth, lag


def connect_phase(fleet: Fleet, results: dict[str, Any]) -> int:
    args = fleet.args
    started = time.monotonic()
    fleet.start_simulators()
    online = 0
    history = []
    deadline = time.monotonic() + args.connect_timeout
    while time.monotonic() < deadline:
        time.sleep(5.0)
        online = fleet.client().summary(fleet=FLEET)["online"]
        history.append((round(time.monotonic() - started), online))
        dead = [p.pid for p, _, _ in fleet.sims if p.poll() is not None]
        if online >= args.devices or dead:
            break
    results["connect"] = {
        "devices": args.devices,
        "online_in_registry": online,
        "broker_connections": broker_connections(fleet.broker) if fleet.broker else None,
        "seconds": round(time.monotonic() - started, 1),
        "online_over_time": history[-12:],
        "sim_processes": args.sim_processes,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    if online < args.devices:
        tails = {}
        for index, (proc, _stats, _count) in enumerate(fleet.sims):
            log = fleet.workdir / f"sim-{index}.log"
            with contextlib.suppress(OSError):
                tails[f"sim-{index} (exit {proc.poll()})"] = log.read_text()[-600:]
        results["connect"]["stopped_at"] = tails
        print(f"only {online} of {args.devices} devices connected", file=sys.stderr)
    return online


def catch_up_phase(fleet: Fleet, results: dict[str, Any]) -> None:
    """The connection burst (every device's status, reported and first telemetry at once)
    leaves a backlog; the windows measure the steady state, so first wait until the replicas
    have caught up: queues nearly empty and lag under a second, three samples in a row."""
    started = time.monotonic()
    calm = 0
    peak_depth, peak_lag = 0, 0.0
    while time.monotonic() - started < fleet.args.catch_up_timeout and calm < 3:
        time.sleep(2.0)
        _stored, depth, lag = fleet.stored()
        peak_depth, peak_lag = max(peak_depth, depth), max(peak_lag, lag)
        calm = calm + 1 if depth < 200 and lag < 1.0 else 0
    results["catch_up"] = {
        "caught_up": calm >= 3,
        "seconds": round(time.monotonic() - started, 1),
        "queue_depth_peak": peak_depth,
        "lag_s_peak": round(peak_lag, 2),
    }


def ingest_phase(fleet: Fleet, results: dict[str, Any]) -> None:
    """``--windows`` windows of ``--window`` seconds: rates, ratios and the backlog."""
    args = fleet.args
    assert fleet.counter is not None
    groups: dict[str, Callable[[], list[int]]] = {}
    for i, (proc, _stats, _count) in enumerate(fleet.sims):
        groups[f"simulator-{i}"] = lambda pid=proc.pid: [pid]
    for i, (proc, _client) in enumerate(fleet.controllers):
        groups[f"controller-{i}"] = lambda pid=proc.pid: [pid]
    broker_pid = fleet.broker.pid if fleet.broker is not None else None
    groups["mosquitto"] = lambda: [broker_pid] if broker_pid else []
    groups["postgresql"] = postgres_pids
    meter = CpuMeter(groups)
    windows = []
    series = []
    t_origin = time.monotonic()
    pub_origin, (stored_origin, _, _) = fleet.published(), fleet.stored()
    meter.start()
    for _ in range(args.windows):
        pub0, sub0 = fleet.published(), fleet.counter.value()
        stored0, _, _ = fleet.stored()
        t0 = time.monotonic()
        depths, lags = [], []
        while time.monotonic() - t0 < args.window:
            time.sleep(2.0)
            stored, depth, lag = fleet.stored()
            published = fleet.published()
            depths.append(depth)
            lags.append(lag)
            series.append(
                {
                    "t_s": round(time.monotonic() - t_origin, 1),
                    "published": published - pub_origin,
                    "stored": stored - stored_origin,
                    "backlog": (published - pub_origin) - (stored - stored_origin),
                    "queue_depth": depth,
                    "lag_s": lag,
                }
            )
        pub1, sub1 = fleet.published(), fleet.counter.value()
        stored1, _, _ = fleet.stored()
        elapsed = time.monotonic() - t0
        pub_rate = (pub1 - pub0) / elapsed
        sub_rate = (sub1 - sub0) / elapsed
        ing_rate = (stored1 - stored0) / elapsed
        windows.append(
            {
                "seconds": round(elapsed, 1),
                "publish_msgs_per_s": round(pub_rate, 1),
                "mosquitto_sub_msgs_per_s": round(sub_rate, 1),
                "controllers_msgs_per_s": round(ing_rate, 1),
                "ratio_vs_publish": round(ing_rate / pub_rate, 4) if pub_rate else None,
                "ratio_vs_mosquitto_sub": round(ing_rate / sub_rate, 4) if sub_rate else None,
                "queue_depth_max": max(depths, default=0),
                "lag_s_max": round(max(lags, default=0.0), 3),
            }
        )
    cores = meter.stop()
    results["load_avg_1m_after_ingest"] = round(os.getloadavg()[0], 2)
    pub_rates = [w["publish_msgs_per_s"] for w in windows]
    growth = slope([(p["t_s"], p["backlog"]) for p in series])
    per_controller = [c.stats()["ingest"] for _, c in fleet.controllers]
    results["ingest"] = {
        "windows": windows,
        "median_ratio_vs_publish": statistics.median(w["ratio_vs_publish"] or 0.0 for w in windows),
        "median_ratio_vs_mosquitto_sub": statistics.median(
            w["ratio_vs_mosquitto_sub"] or 0.0 for w in windows
        ),
        "median_publish_msgs_per_s": statistics.median(pub_rates),
        "backlog_slope_msgs_per_s": round(growth, 2),
        "backlog_slope_share_of_publish_rate": round(growth / statistics.median(pub_rates), 4)
        if statistics.median(pub_rates)
        else None,
        "backlog_series": series,
        "per_replica_processed": [s["processed_total"] for s in per_controller],
        "per_replica_stale": [s["stale_total"] for s in per_controller],
        "dropped": sum(s["dropped"] for s in per_controller),
        "db_errors": sum(s["db_errors"] for s in per_controller),
    }
    sims = {
        f"simulator-{i}": {
            "devices": count,
            "cores": cores[f"simulator-{i}"],
            "devices_per_core_at_interval": round(count / cores[f"simulator-{i}"])
            if cores[f"simulator-{i}"]
            else None,
            "rss_mb": round(rss_mb(p.pid), 1),
        }
        for i, (p, _, count) in enumerate(fleet.sims)
    }
    results["cpu_cores_used"] = cores
    results["simulators"] = sims
    results["controllers_rss_mb"] = [round(rss_mb(p.pid), 1) for p, _ in fleet.controllers]


def registry_phase(fleet: Fleet, devices: int) -> dict[str, Any]:
    """The device list, through the REST API of each replica and directly; a bare SELECT of
    the same rows, in the same rounds, is the reference."""
    args = fleet.args
    meter = CpuMeter({})
    meter.start()
    load = os.getloadavg()[0]
    pages = max(1, -(-devices // PAGE))
    rest_pages: list[float] = []
    rest_walks: list[float] = []
    rest_full: list[float] = []
    for run in range(args.runs):
        base = fleet.client(run).base_url
        walk0 = time.perf_counter()
        for page in range(pages):
            t0 = time.perf_counter()
            found = get_json(base, "/api/v1/devices", fleet=FLEET, limit=PAGE, offset=page * PAGE)
            rest_pages.append((time.perf_counter() - t0) * 1000)
            assert found["count"] == min(PAGE, devices - page * PAGE), found["count"]
        rest_walks.append((time.perf_counter() - walk0) * 1000)
        t0 = time.perf_counter()
        found = get_json(base, "/api/v1/devices", fleet=FLEET, limit=devices)
        rest_full.append((time.perf_counter() - t0) * 1000)
        assert found["count"] == devices
    db = Database(fleet.db_url)
    registry = Registry(db)
    direct_pages: list[float] = []
    direct_full: list[float] = []
    bare_full: list[float] = []
    try:
        for _ in range(args.runs):
            for page in range(pages):
                t0 = time.perf_counter()
                registry.list_devices(fleet=FLEET, limit=PAGE, offset=page * PAGE)
                direct_pages.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            listed = registry.list_devices(fleet=FLEET, limit=devices)
            direct_full.append((time.perf_counter() - t0) * 1000)
            assert len(listed) == devices
            t0 = time.perf_counter()
            with db.engine.connect() as connection:
                rows = connection.exec_driver_sql(
                    "SELECT * FROM devices WHERE fleet = %(f)s ORDER BY fleet, device",
                    {"f": FLEET},
                ).fetchall()
            bare_full.append((time.perf_counter() - t0) * 1000)
            assert len(rows) == devices
    finally:
        db.dispose()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "p50_ms": round(statistics.median(values), 1),
            "p95_ms": round(percentile(values, 95), 1),
            "samples": len(values),
        }

    bare = statistics.median(bare_full)
    return {
        "machine_busy_cores": meter.stop()["machine_busy"],
        "load_avg_1m_at_start": round(load, 2),
        "devices": devices,
        "rest_page_of_1000": summary(rest_pages),
        "rest_all_pages_walk": summary(rest_walks),
        "rest_one_response_all": summary(rest_full),
        "direct_page_of_1000": summary(direct_pages),
        "direct_all": summary(direct_full),
        "bare_select_all": summary(bare_full),
        "ratio_direct_all_vs_bare_select": round(statistics.median(direct_full) / bare, 2),
        "ratio_rest_all_vs_bare_select": round(statistics.median(rest_full) / bare, 2),
        "target_p95_ms": LIST_P95_TARGET_MS,
    }


@contextlib.contextmanager
def devices_paused(fleet: Fleet) -> Iterator[None]:
    """SIGSTOP the simulators: the registry measured without the ingest competing (a paused
    device sends nothing; resumed within the 30 s keepalive, it is not even disconnected)."""
    for proc, _stats, _count in fleet.sims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3.0)
        yield
    finally:
        for proc, _stats, _count in fleet.sims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg(),
        },
        "settings": {
            "devices": args.devices,
            "interval_s": args.interval,
            "replicas": args.replicas,
            "sim_processes": args.sim_processes,
            "windows": args.windows,
            "window_s": args.window,
        },
    }
    raise_fd_limit()
    fleet = Fleet(args, workdir)
    with fleet.running():
        fleet.start_infrastructure()
        fleet.start_controllers()
        assert fleet.broker is not None
        fleet.counter = LineCounter(fleet.broker, FLEET, mqtt5=True)
        time.sleep(1.0)
        online = connect_phase(fleet, results)
        catch_up_phase(fleet, results)
        ingest_phase(fleet, results)
        results["registry"] = {"while_ingesting": registry_phase(fleet, online)}
        with devices_paused(fleet):
            results["registry"]["devices_paused"] = registry_phase(fleet, online)
        ingest = results["ingest"]
        registry = results["registry"]["devices_paused"]
        results["pass"] = {
            "connections": online >= args.devices,
            "ingest_keeps_up": ingest["median_ratio_vs_publish"] >= INGEST_RATIO_TARGET
            and ingest["median_ratio_vs_mosquitto_sub"] >= INGEST_RATIO_TARGET,
            "no_growing_backlog": (ingest["backlog_slope_share_of_publish_rate"] or 0) < 0.01,
            "registry_page_p95_rest": registry["rest_page_of_1000"]["p95_ms"] < LIST_P95_TARGET_MS,
            "registry_page_p95_direct": registry["direct_page_of_1000"]["p95_ms"]
            < LIST_P95_TARGET_MS,
            "registry_page_p95_rest_while_ingesting": results["registry"]["while_ingesting"][
                "rest_page_of_1000"
            ]["p95_ms"]
            < LIST_P95_TARGET_MS,
            "registry_all_in_one_p95_direct": registry["direct_all"]["p95_ms"] < LIST_P95_TARGET_MS,
            "registry_all_in_one_p95_rest": registry["rest_one_response_all"]["p95_ms"]
            < LIST_P95_TARGET_MS,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry period, s")
    parser.add_argument("--sim-processes", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--windows", type=int, default=3, help="ingest windows (median)")
    parser.add_argument("--window", type=float, default=40.0, help="seconds per window")
    parser.add_argument("--runs", type=int, default=5, help="registry listings (median, p95)")
    parser.add_argument("--catch-up-timeout", type=float, default=300.0)
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-scale-"))
    try:
        results = run(args, workdir)
    finally:
        if args.keep:
            print(f"work dir: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
