# ruff: noqa: ANN001, ANN201, ANN202, ANN204, SIM105
# MicroPython has no `typing`, no `from __future__` and no `contextlib` built in: this file
# carries no annotations and suppresses exceptions with try/except.
"""An ESP32 that speaks the edgekit MQTT protocol (topic tree v1, schema 1) with MicroPython.

It reads an analog sensor, runs a tiny "model" on it (a threshold, standing in for whatever
the board computes), and reports like an edgekit agent does:

* a retained ``status`` ``online`` after each connect, and a retained ``offline`` last will
  (``reason: connection-lost``) that the broker publishes when the board dies or drops off;
* ``telemetry`` every ``interval_s`` seconds: inference count, errors, latency percentiles,
  model, uptime, free memory, free flash, chip temperature.

Every payload carries ``schema``, ``kind``, ``device``, a ``seq`` that only grows (even across
reboots: blocks of numbers are reserved in flash) and a random ``msg_id``, so the controller
deduplicates the board's messages exactly like the agent's. Messages that could not be sent
wait in a small RAM queue (``queue_max``) and are resent, with the same ``msg_id``, after the
reconnect; the oldest are dropped when it is full (a board has no room for a real outbox).

The protocol is specified in docs/mqtt-protocol.md; the payload builders below are tested on
the host against edgekit's own validator (tests/device_agent/mqtt/test_esp32_example.py).
"""

import gc
import json
import os
import time

try:
    from binascii import hexlify
except ImportError:  # very small ports
    from ubinascii import hexlify

CONFIG = {
    "wifi_ssid": "your-ssid",
    "wifi_password": "your-password",
    "broker": "192.168.1.10",
    "port": 1883,
    "user": None,
    "password": None,
    "ssl": False,
    "fleet": "plant-1",
    "device": None,  # None: "esp32-" + the chip's unique id in hex
    "interval_s": 10,
    "sensor_pin": 34,  # an ADC1 pin (ADC2 is unusable while Wi-Fi is on)
    "threshold": 0.6,  # of full scale: above it the "model" says "alert"
    "sample_ms": 100,
    "queue_max": 20,
    "model": {"name": "threshold", "version": 1, "sha256": "0" * 64, "display_version": None},
    "seq_file": "edgekit_seq.txt",
}

SCHEMA = 1
AGENT_VERSION = "esp32-micropython-example/1"
# MicroPython's epoch is 2000-01-01 on older ports and 1970 on newer ones.
EPOCH_OFFSET = 946684800 if time.gmtime(0)[0] == 2000 else 0
# Before NTP sync the clock starts at the epoch; the protocol says ts 0 = "no clock yet".
CLOCK_VALID_AFTER = 1672531200  # 2023-01-01
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


def unix_time():
    now = time.time() + EPOCH_OFFSET
    return float(now) if now >= CLOCK_VALID_AFTER else 0.0


def new_msg_id():
    return hexlify(os.urandom(16)).decode()


def topic(fleet, device, kind):
    return "edgekit/v1/" + fleet + "/" + device + "/" + kind


class SeqCounter:
    """Per-device ``seq`` that grows across reboots without writing flash for every message:
    a block of ``block`` numbers is reserved in ``path`` and used up before the next write.
    A reboot skips the rest of the block (gaps are allowed; going backwards is not)."""

    def __init__(self, path, block=100):
        self.path = path
        self.block = block
        try:
            with open(path) as handle:
                start = int(handle.read().strip() or "1")
        except (OSError, ValueError):
            start = 1
        self.next = start
        self.limit = start
        self._reserve()

    def _reserve(self):
        self.limit = self.next + self.block
        with open(self.path, "w") as handle:
            handle.write(str(self.limit))

    def take(self):
        if self.next >= self.limit:
            self._reserve()
        value = self.next
        self.next += 1
        return value


class LatencyStats:
    """Inference counters and a fixed-bucket latency histogram (as the agent's metrics)."""

    def __init__(self, bounds=LATENCY_BUCKETS_MS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0
        self.errors = 0

    def observe(self, ms, ok=True):
        if not ok:
            self.errors += 1
            return
        index = 0
        while index < len(self.bounds) and ms > self.bounds[index]:
            index += 1
        self.counts[index] += 1
        self.total += 1

    def quantile(self, q):
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for index, count in enumerate(self.counts):
            if count and seen + count >= rank:
                low = self.bounds[index - 1] if index > 0 else 0.0
                high = self.bounds[index] if index < len(self.bounds) else self.bounds[-1] * 2
                return round(low + (high - low) * max(rank - seen, 0.0) / count, 3)
            seen += count
        return self.bounds[-1]

    def as_dict(self):
        return {
            "count": self.total + self.errors,
            "errors": self.errors,
            "rejected": 0,
            "p50_ms": self.quantile(0.50),
            "p95_ms": self.quantile(0.95),
            "p99_ms": self.quantile(0.99),
        }


def envelope(kind, device, seq):
    return {
        "schema": SCHEMA,
        "kind": kind,
        "device": device,
        "seq": seq,
        "msg_id": new_msg_id(),
        "ts": unix_time(),
    }


def status_payload(device, seq, state, reason=None):
    message = envelope("status", device, seq)
    message["state"] = state
    message["reason"] = reason
    message["agent_version"] = AGENT_VERSION
    return json.dumps(message)


def telemetry_payload(device, seq, stats, interval_s, uptime_s, model, system):
    message = envelope("telemetry", device, seq)
    message["interval_s"] = float(interval_s)
    message["uptime_s"] = float(uptime_s)
    message["inference"] = stats.as_dict()
    message["model"] = model
    message["active_slot"] = None
    message["slots"] = {}
    message["system"] = system
    message["drift"] = None
    message["self_test"] = None
    return json.dumps(message)


# --- hardware (imported lazily so the payload code also runs on a PC) ------------------------


def device_id():
    import machine

    return "esp32-" + hexlify(machine.unique_id()).decode()


def chip_temperature():
    try:
        import esp32
    except ImportError:
        return None
    if hasattr(esp32, "mcu_temperature"):  # ESP32-S2/S3/C3...: degrees Celsius
        return float(esp32.mcu_temperature())
    if hasattr(esp32, "raw_temperature"):  # the original ESP32: Fahrenheit, roughly
        return round((esp32.raw_temperature() - 32) / 1.8, 1)
    return None


def system_stats():
    gc.collect()
    free = gc.mem_free()
    try:
        stat = os.statvfs("/")
        flash_free = stat[0] * stat[4]
    except (OSError, AttributeError):
        flash_free = None
    return {
        "cpu_percent": None,
        "mem_total_bytes": free + gc.mem_alloc(),
        "mem_available_bytes": free,
        "rss_bytes": None,
        "disk_free_bytes": flash_free,
        "temperature_c": chip_temperature(),
        "uptime_s": time.ticks_ms() / 1000.0,
    }


def connect_wifi(config, timeout_s=30):
    import network

    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(config["wifi_ssid"], config["wifi_password"])
        deadline = time.ticks_add(time.ticks_ms(), timeout_s * 1000)
        while not wlan.isconnected() and time.ticks_diff(deadline, time.ticks_ms()) > 0:
            time.sleep_ms(200)
    if wlan.isconnected():
        try:
            import ntptime

            ntptime.settime()
        except (ImportError, OSError):
            pass  # telemetry carries ts 0 until the clock is set
    return wlan.isconnected()


class Reporter:
    """MQTT session with last will, retained status and a small resend queue."""

    def __init__(self, config, device, seq):
        self.config = config
        self.device = device
        self.seq = seq
        self.client = None
        self.queue = []  # (topic, payload, retain), oldest first
        # umqtt.simple sends no PINGREQ by itself: publishing telemetry more often than the
        # keepalive (30 s) is what keeps the session alive.
        self.dropped = 0
        self.backoff_ms = 1000
        self.next_attempt = time.ticks_ms()

    def topic(self, kind):
        return topic(self.config["fleet"], self.device, kind)

    def connect(self):
        from umqtt.simple import MQTTClient

        config = self.config
        client = MQTTClient(
            "edgekit-" + config["fleet"] + "-" + self.device,
            config["broker"],
            port=config["port"],
            user=config["user"],
            password=config["password"],
            keepalive=30,
            ssl=config["ssl"],
        )
        will = status_payload(self.device, self.seq.take(), "offline", "connection-lost")
        client.set_last_will(self.topic("status"), will, retain=True, qos=1)
        client.connect(clean_session=False)
        # umqtt's socket blocks forever by default: a half-open connection would hang the
        # board inside publish() waiting for a PUBACK. With a timeout it raises OSError.
        client.sock.settimeout(10)
        client.publish(
            self.topic("status"), status_payload(self.device, self.seq.take(), "online"), True, 1
        )
        self.client = client
        self.backoff_ms = 1000

    def ensure_connected(self):
        if self.client is not None:
            return True
        if time.ticks_diff(self.next_attempt, time.ticks_ms()) > 0:
            return False
        try:
            self.connect()
            return True
        except OSError:
            self.client = None
            # Exponential backoff with jitter, capped at one minute.
            jitter = int.from_bytes(os.urandom(2), "big") % (self.backoff_ms // 2 + 1)
            self.next_attempt = time.ticks_add(time.ticks_ms(), self.backoff_ms - jitter)
            self.backoff_ms = min(self.backoff_ms * 2, 60000)
            return False

    def send(self, kind, payload, retain=False):
        self.queue.append((self.topic(kind), payload, retain))
        while len(self.queue) > self.config["queue_max"]:
            self.queue.pop(0)
            self.dropped += 1
        self.flush()

    def flush(self):
        while self.queue and self.ensure_connected():
            item = self.queue[0]
            try:
                self.client.publish(item[0], item[1], item[2], 1)  # waits for the PUBACK
            except OSError:
                self.disconnect()
                return
            self.queue.pop(0)

    def disconnect(self):
        if self.client is not None:
            try:
                self.client.sock.close()  # no DISCONNECT: the broker publishes the will
            except Exception:
                pass
        self.client = None


def classify(value, threshold):
    """The stand-in model: 1 ("alert") above the threshold, else 0 ("ok")."""
    return 1 if value > threshold else 0


def run(config=CONFIG, max_cycles=None):
    """Sample, classify, report; ``max_cycles`` (telemetry periods) ends the loop in tests."""
    import machine

    device = config["device"] or device_id()
    connect_wifi(config)
    seq = SeqCounter(config["seq_file"])
    reporter = Reporter(config, device, seq)
    reporter.ensure_connected()
    adc = machine.ADC(machine.Pin(config["sensor_pin"]))
    adc.atten(machine.ADC.ATTN_11DB)  # full 0-3.3 V range
    stats = LatencyStats()
    started = time.ticks_ms()
    next_report = time.ticks_add(started, config["interval_s"] * 1000)
    cycles = 0
    while max_cycles is None or cycles < max_cycles:
        begin = time.ticks_us()
        try:
            classify(adc.read_u16() / 65535, config["threshold"])
            stats.observe(time.ticks_diff(time.ticks_us(), begin) / 1000.0)
        except Exception:
            stats.observe(0.0, ok=False)
        if time.ticks_diff(time.ticks_ms(), next_report) >= 0:
            next_report = time.ticks_add(next_report, config["interval_s"] * 1000)
            uptime_s = time.ticks_diff(time.ticks_ms(), started) / 1000.0
            payload = telemetry_payload(
                device,
                seq.take(),
                stats,
                config["interval_s"],
                uptime_s,
                config["model"],
                system_stats(),
            )
            reporter.send("telemetry", payload)
            cycles += 1
        time.sleep_ms(config["sample_ms"])


if __name__ == "__main__":
    run()
