"""The ESP32 MicroPython example speaks exactly the protocol: checked by edgekit's validator.

The example's main loop runs here under CPython with the board stubbed out (machine, network,
umqtt.simple and MicroPython's tick functions): every payload it publishes, its last will
included, must pass ``edgekit.protocol.decode`` for the topic it was published on.
"""

from __future__ import annotations

import importlib.util
import sys
import time as _time
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest

from edgekit.protocol import MessageKind, Status, StatusState, Telemetry, decode

EXAMPLE = Path(__file__).resolve().parents[3] / "firmware_examples" / "esp32_micropython"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("edgekit_esp32_example", EXAMPLE / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeTime:
    """MicroPython's ``time`` on top of a fake millisecond counter."""

    def __init__(self) -> None:
        self.ms = 0

    time = staticmethod(_time.time)
    gmtime = staticmethod(_time.gmtime)

    def ticks_ms(self) -> int:
        return self.ms

    def ticks_us(self) -> int:
        return self.ms * 1000

    @staticmethod
    def ticks_diff(a: int, b: int) -> int:
        return a - b

    @staticmethod
    def ticks_add(a: int, b: int) -> int:
        return a + b

    def sleep_ms(self, ms: int) -> None:
        self.ms += ms


class FakeClient:
    """umqtt.simple.MQTTClient recording what the example does."""

    instances: ClassVar[list[FakeClient]] = []
    fail_next_publish = 0

    def __init__(self, client_id: str, server: str, **options: Any) -> None:
        self.client_id, self.server, self.options = client_id, server, options
        self.will: tuple[str, bytes, bool, int] | None = None
        self.published: list[tuple[str, str, bool, int]] = []
        self.clean_session: bool | None = None
        self.sock = types.SimpleNamespace(settimeout=lambda s: None, close=lambda: None)
        FakeClient.instances.append(self)

    def set_last_will(self, topic: str, msg: str, retain: bool = False, qos: int = 0) -> None:
        self.will = (topic, msg, retain, qos)

    def connect(self, clean_session: bool = True) -> None:
        self.clean_session = clean_session

    def publish(self, topic: str, msg: str, retain: bool = False, qos: int = 0) -> None:
        if FakeClient.fail_next_publish:
            FakeClient.fail_next_publish -= 1
            raise OSError("connection reset")
        self.published.append((topic, msg, retain, qos))


@pytest.fixture
def board(monkeypatch, tmp_path: Path) -> Any:
    FakeClient.instances = []
    FakeClient.fail_next_publish = 0
    adc = types.SimpleNamespace(atten=lambda a: None, read_u16=lambda: 50000)
    adc_class = type("ADC", (), {"ATTN_11DB": 3, "__new__": lambda cls, pin: adc})
    machine = types.SimpleNamespace(
        unique_id=lambda: bytes.fromhex("240ac4123456"), ADC=adc_class, Pin=lambda pin: pin
    )
    wlan = types.SimpleNamespace(active=lambda on: None, isconnected=lambda: True)
    network = types.SimpleNamespace(STA_IF=0, WLAN=lambda mode: wlan)
    umqtt = types.ModuleType("umqtt")
    simple = types.ModuleType("umqtt.simple")
    simple.MQTTClient = FakeClient  # type: ignore[attr-defined]
    esp32 = types.SimpleNamespace(mcu_temperature=lambda: 41)
    for name, module in {
        "machine": machine,
        "network": network,
        "umqtt": umqtt,
        "umqtt.simple": simple,
        "ntptime": types.SimpleNamespace(settime=lambda: None),
        "esp32": esp32,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    example = load_example()
    example.time = FakeTime()
    example.gc = types.SimpleNamespace(
        collect=lambda: None, mem_free=lambda: 90_000, mem_alloc=lambda: 30_000
    )
    monkeypatch.chdir(tmp_path)
    return example


def config(example: Any, **changes: Any) -> dict[str, Any]:
    settings = dict(example.CONFIG)
    settings.update(interval_s=1, sample_ms=100, **changes)
    return settings


def test_every_message_of_the_example_passes_the_protocol_validator(board: Any) -> None:
    board.run(config(board), max_cycles=3)
    client = FakeClient.instances[-1]
    assert client.clean_session is False
    assert client.client_id == "edgekit-plant-1-esp32-240ac4123456"
    assert client.will is not None
    will_topic, will_payload, will_retain, will_qos = client.will
    _, will = decode(will_topic, will_payload)
    assert isinstance(will, Status)
    assert will.state is StatusState.OFFLINE and will.reason == "connection-lost"
    assert will_retain and will_qos == 1

    kinds = []
    seqs = [will.seq]
    ids = {will.msg_id}
    for topic, payload, retain, qos in client.published:
        parts, message = decode(topic, payload)
        assert parts.fleet == "plant-1" and parts.device == "esp32-240ac4123456"
        assert qos == 1 and retain == parts.kind.retained
        kinds.append(parts.kind)
        seqs.append(message.seq)
        ids.add(message.msg_id)
        if isinstance(message, Telemetry):
            assert message.inference.count > 0 and message.inference.p50_ms is not None
            assert message.system.temperature_c == 41.0
            assert message.system.mem_available_bytes == 90_000
            assert message.model is not None and message.model.name == "threshold"
            assert message.ts > 1_600_000_000
    assert kinds == [MessageKind.STATUS] + [MessageKind.TELEMETRY] * 3
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(ids) == len(seqs)


def test_sequence_numbers_keep_growing_across_reboots(board: Any) -> None:
    first = board.SeqCounter("seq.txt", block=5)
    taken = [first.take() for _ in range(7)]
    rebooted = board.SeqCounter("seq.txt", block=5)
    assert rebooted.take() > max(taken)
    assert taken == list(range(1, 8))


def test_unsent_messages_are_resent_with_the_same_id(board: Any) -> None:
    settings = config(board)
    reporter = board.Reporter(settings, "esp32-1", board.SeqCounter("seq.txt"))
    assert reporter.ensure_connected()
    FakeClient.fail_next_publish = 1
    stats = board.LatencyStats()
    stats.observe(1.5)
    payload = board.telemetry_payload("esp32-1", 99, stats, 10, 5.0, settings["model"], {})
    reporter.send("telemetry", payload)
    assert reporter.client is None and len(reporter.queue) == 1  # kept for later
    board.time.ms += 5_000  # past the backoff
    reporter.flush()
    sent = FakeClient.instances[-1].published
    assert sent[-1][1] == payload  # same bytes, same msg_id: the receiver deduplicates
    decode(sent[-1][0], sent[-1][1])


def test_latency_percentiles_match_the_agent_convention(board: Any) -> None:
    stats = board.LatencyStats()
    assert stats.as_dict()["p50_ms"] is None
    for ms in (0.2, 0.3, 0.4, 3.0):
        stats.observe(ms)
    stats.observe(0, ok=False)
    summary = stats.as_dict()
    assert summary["count"] == 5 and summary["errors"] == 1
    assert 0.1 <= summary["p50_ms"] <= 0.5
    assert 2.5 <= summary["p99_ms"] <= 5.0
