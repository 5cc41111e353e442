"""The MQTT contract: topics, ids, every message type, strict parsing, deduplication.

Both the device agent and the controller rely on this module alone to decide what a topic or
a payload means, so these tests pin it: round trips keep every field (unknown ones included),
and whatever bytes arrive, parsing either succeeds or raises ProtocolError, nothing else.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgekit.errors import EdgekitError
from edgekit.protocol import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Command,
    CommandName,
    Deduplicator,
    Desired,
    Direction,
    Drift,
    Event,
    EventType,
    InferenceStats,
    Message,
    MessageKind,
    ModelRef,
    ProtocolError,
    QoS,
    Reported,
    SelfTest,
    Severity,
    Status,
    StatusState,
    SystemStats,
    Telemetry,
    Topics,
    UpdateOutcome,
    UpdateResult,
    decode,
    message_class,
    parse_message,
    parse_topic,
    validate_id,
)

REPO = Path(__file__).resolve().parents[2]
SHA = "3b" * 32
MODEL = ModelRef(name="tiny-cnn", version=7, sha256=SHA, display_version="1.2.0")

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def samples() -> list[Message]:
    """One fully populated message of every kind."""
    return [
        Status(device="cam-7", seq=1, state=StatusState.ONLINE, agent_version="0.4.0"),
        Telemetry(
            device="cam-7",
            seq=2,
            interval_s=10.0,
            uptime_s=3600.5,
            inference=InferenceStats(
                count=1200, errors=3, rejected=1, p50_ms=4.2, p95_ms=9.8, p99_ms=15.1
            ),
            model=MODEL,
            active_slot="a",
            slots={"a": "committed", "b": "empty"},
            system=SystemStats(
                cpu_percent=12.5,
                mem_total_bytes=4 << 30,
                mem_available_bytes=3 << 30,
                rss_bytes=80 << 20,
                disk_free_bytes=20 << 30,
                temperature_c=51.2,
                uptime_s=86400.0,
            ),
            drift=Drift(
                samples=500,
                input_psi={"temperature": 0.02, "vibration": 0.31},
                output_psi=0.05,
                output_distribution={"ok": 0.9, "fault": 0.1},
                baseline_distribution={"ok": 0.92, "fault": 0.08},
            ),
            self_test=SelfTest(ok=True, ts=1_700_000_000.0, detail="4/4 golden samples"),
        ),
        Event(
            device="cam-7",
            seq=3,
            event=EventType.UPDATE_FAILED,
            severity=Severity.ERROR,
            message="bundle refused: hash mismatch",
            reason="hash-mismatch",
            ref="0f" * 16,
            rollout_id="r-2024-05",
            data={"attempt": 2, "bytes": 1024, "retry": False, "note": None},
        ),
        Reported(
            device="cam-7",
            seq=4,
            current=MODEL,
            previous=ModelRef(name="tiny-cnn", version=6, sha256="aa" * 32),
            active_slot="a",
            slots={"a": "committed", "b": "previous"},
            update_state="idle",
            last_update=UpdateResult(
                rollout_id="r-2024-05",
                outcome=UpdateOutcome.COMMITTED,
                bundle="tiny-cnn",
                version=7,
                ts=1_700_000_100.0,
            ),
            agent_version="0.4.0",
        ),
        Desired(
            device="cam-7",
            seq=5,
            bundle="tiny-cnn",
            version=8,
            url="https://updates.example.com/tiny-cnn-8.ekb",
            sha256=SHA,
            size=123_456,
            rollout_id="r-2024-06",
        ),
        Command(
            device="cam-7",
            seq=6,
            command=CommandName.COLLECT_DIAGNOSTICS,
            args={"minutes": 5},
            expires=1_900_000_000.0,
        ),
    ]


def envelope(kind: str = "status", **fields_: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "schema": 1,
        "kind": kind,
        "device": "cam-7",
        "seq": 1,
        "msg_id": "a" * 32,
        "ts": 1.0,
    }
    data.update(fields_)
    return data


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()


# --- ids and topics -------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "cam-7", "Plant_1.line.2", "0", "x" * 64])
def test_valid_ids(good: str) -> None:
    assert validate_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a+b",
        "a#",
        "#",
        "+",
        "a/b",
        "$SYS",
        "a$",
        "x" * 65,
        "with space",
        "-leading",
        ".hidden",
        "nul\x00",
        "ümlaut",
        "line\n",
        None,
        7,
    ],
)
def test_ids_with_wildcards_separators_dollar_or_bad_length_are_refused(bad: Any) -> None:
    with pytest.raises(ProtocolError, match="is not 1-64 characters"):
        validate_id(bad)
    if isinstance(bad, str):
        with pytest.raises(ProtocolError):
            Topics(bad, "dev")
        with pytest.raises(ProtocolError):
            Topics("fleet", bad)


def test_topic_tree() -> None:
    topics = Topics("plant-1", "cam-7")
    assert topics.status == "edgekit/v1/plant-1/cam-7/status"
    assert topics.telemetry == "edgekit/v1/plant-1/cam-7/telemetry"
    assert topics.events == "edgekit/v1/plant-1/cam-7/events"
    assert topics.reported == "edgekit/v1/plant-1/cam-7/reported"
    assert topics.desired == "edgekit/v1/plant-1/cam-7/desired"
    assert topics.cmd == "edgekit/v1/plant-1/cam-7/cmd"
    for kind in MessageKind:
        parts = parse_topic(topics.for_kind(kind))
        assert parts == ("plant-1", "cam-7", kind)
        fleet, device, parsed_kind = parts  # unpacks as the tuple the brief asks for
        assert (fleet, device, parsed_kind) == ("plant-1", "cam-7", kind)
    assert Topics("plant-1", "cam-7") == topics
    assert len({topics, Topics("plant-1", "cam-7")}) == 1


def test_subscription_filters() -> None:
    assert Topics.subscription() == "edgekit/v1/+/+/#"
    assert Topics.subscription("plant-1") == "edgekit/v1/plant-1/+/#"
    assert Topics.subscription("plant-1", kind="status") == "edgekit/v1/plant-1/+/status"
    assert Topics.subscription("plant-1", "cam-7") == "edgekit/v1/plant-1/cam-7/+"
    with pytest.raises(ProtocolError):
        Topics.subscription("bad+fleet")


@pytest.mark.parametrize(
    "topic",
    [
        "edgekit/v1/plant-1/cam-7",
        "edgekit/v1/plant-1/cam-7/status/extra",
        "edgekit/v2/plant-1/cam-7/status",
        "other/v1/plant-1/cam-7/status",
        "edgekit/v1/plant-1/cam-7/unknown",
        "edgekit/v1/+/cam-7/status",
        "edgekit/v1/plant-1/#/status",
        "edgekit/v1//cam-7/status",
        "",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError):
        parse_topic(topic)


def test_qos_retain_and_direction_per_kind() -> None:
    retained = {kind for kind in MessageKind if kind.retained}
    assert retained == {MessageKind.STATUS, MessageKind.REPORTED, MessageKind.DESIRED}
    assert all(kind.qos is QoS.AT_LEAST_ONCE for kind in MessageKind)
    down = {kind for kind in MessageKind if kind.direction is Direction.DOWN}
    assert down == {MessageKind.DESIRED, MessageKind.CMD}


# --- messages -------------------------------------------------------------------------------


@pytest.mark.parametrize("message", samples(), ids=lambda m: m.KIND.value)
def test_round_trip_keeps_every_field(message: Message) -> None:
    payload = message.to_json()
    assert b"\n" not in payload
    again = type(message).from_json(payload)
    assert again == message
    assert parse_message(payload) == message
    assert again.to_json() == payload
    data = json.loads(payload)
    assert data["schema"] == SCHEMA_VERSION
    assert data["kind"] == message.KIND.value
    for f in fields(message):
        if f.name != "extra":
            assert f.name in data, f"{f.name} missing from the JSON"


def test_unknown_fields_are_preserved_top_level_and_nested() -> None:
    telemetry = samples()[1]
    data = json.loads(telemetry.to_json())
    data["schema"] = 2  # a newer, additive schema
    data["gpu"] = {"util": 0.5}
    data["inference"]["p999_ms"] = 30.0
    parsed = Telemetry.from_json(dumps(data))
    assert parsed.schema == 2
    assert parsed.extra == {"gpu": {"util": 0.5}}
    assert parsed.inference.extra == {"p999_ms": 30.0}
    assert json.loads(parsed.to_json()) == data


def test_construction_validates_and_normalizes() -> None:
    status = Status(device="cam-7", state="offline", reason="shutdown")  # type: ignore[arg-type]
    assert status.state is StatusState.OFFLINE
    event = Event(device="cam-7", event=EventType.ERROR, severity="warning")  # type: ignore[arg-type]
    assert event.event == "error" and type(event.event) is str
    assert event.severity is Severity.WARNING
    with pytest.raises(ProtocolError, match=r"status\.device"):
        Status(device="cam/7", state=StatusState.ONLINE)
    with pytest.raises(ProtocolError, match=r"telemetry\.seq"):
        Telemetry(device="cam-7", seq=-1)
    with pytest.raises(ProtocolError, match=r"event\.message"):
        Event(device="cam-7", event="error", message="two\nlines")
    with pytest.raises(ProtocolError, match="extra"):
        Event(device="cam-7", event="error", extra={"kind": "x"})
    with pytest.raises(ProtocolError, match="JSON values"):
        Event(device="cam-7", event="error", extra={"x": object()})


def test_with_seq_keeps_the_message_id() -> None:
    telemetry = Telemetry(device="cam-7")
    stamped = telemetry.with_seq(41)
    assert stamped.seq == 41 and stamped.msg_id == telemetry.msg_id
    assert telemetry.seq == 0
    assert Telemetry(device="cam-7").msg_id != telemetry.msg_id


def test_commands() -> None:
    command = Command(device="cam-7", command="restart", expires=100.0)
    assert command.known is CommandName.RESTART
    assert command.expired(now=101.0) and not command.expired(now=99.0)
    assert Command(device="cam-7", command="self-destruct").known is None
    assert not Command(device="cam-7", command="rollback").expired()


def test_decode_checks_kind_and_device_against_the_topic() -> None:
    status = samples()[0]
    parts, parsed = decode("edgekit/v1/plant-1/cam-7/status", status.to_json())
    assert parts.kind is MessageKind.STATUS and parsed == status
    with pytest.raises(ProtocolError, match="is from device 'cam-7'"):
        decode("edgekit/v1/plant-1/cam-8/status", status.to_json())
    with pytest.raises(ProtocolError, match=r"kind must be 'telemetry'"):
        decode("edgekit/v1/plant-1/cam-7/telemetry", status.to_json())


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"kind": "status", "kind": "status"}', "duplicate JSON key"),
        (dumps(envelope(state="online")).replace(b"1.0", b"NaN"), "NaN"),
        (dumps(envelope(state="online")).replace(b"1.0", b"Infinity"), "Infinity"),
        (dumps(envelope(state="online", seq=True)), r"status\.seq must be an integer"),
        (dumps(envelope(state="online", seq=1.5)), r"status\.seq must be an integer"),
        (dumps(envelope(state="online", seq=2**63)), r"status\.seq must be in"),
        (dumps(envelope(state="online", schema=0)), r"status\.schema must be in"),
        (dumps(envelope(state="online", msg_id="short")), r"status\.msg_id"),
        (dumps(envelope(state="sleeping")), "not one of: online, offline"),
        (dumps(envelope()), "missing 'state'"),
        (dumps({**envelope(state="online"), "kind": None}), "message.kind must be a string"),
        (dumps(envelope(kind="nope")), "message kind 'nope' is unknown"),
        (dumps(envelope(kind="telemetry", inference={"count": -1})), r"inference\.count"),
        (dumps(envelope(kind="telemetry", inference=[])), r"inference must be a JSON object"),
        (dumps(envelope(kind="telemetry", slots={"a": "Not A Name"})), r"slots\['a'\]"),
        (dumps(envelope(kind="telemetry", system={"cpu_percent": 101})), "cpu_percent"),
        (dumps(envelope(kind="telemetry", drift={"input_psi": {"": 1.0}})), "invalid key"),
        (dumps(envelope(kind="events", event="Bad Name")), r"event\.event"),
        (dumps(envelope(kind="events", event="x", data={"nested": {}})), "string, number"),
        (
            dumps(
                envelope(
                    kind="desired",
                    bundle="b",
                    version=1,
                    url="ftp://host/x",
                    sha256=SHA,
                    size=1,
                    rollout_id="r",
                )
            ),
            "not an http",
        ),
        (
            dumps(
                envelope(
                    kind="desired",
                    bundle="b",
                    version=1,
                    url="https://h/x",
                    sha256="ABC",
                    size=1,
                    rollout_id="r",
                )
            ),
            "64 lowercase hex",
        ),
        (b" " * (MAX_PAYLOAD_BYTES + 1), "the limit is"),
    ],
)
def test_strict_parsing(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        parse_message(payload)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, EdgekitError)


def test_oversized_message_cannot_be_serialized() -> None:
    huge = Event(device="cam-7", event="error", data={f"k{i}": "x" * 1000 for i in range(100)})
    with pytest.raises(ProtocolError, match="the limit is"):
        huge.to_json()


def test_newer_schema_is_accepted() -> None:
    payload = dumps(envelope(state="online", schema=7, future_field=[1, 2]))
    status = Status.from_json(payload)
    assert status.schema == 7 and status.extra == {"future_field": [1, 2]}


def test_message_class_lookup() -> None:
    assert message_class("cmd") is Command
    assert message_class(MessageKind.EVENTS) is Event
    with pytest.raises(ProtocolError):
        message_class("nope")


def test_protocol_imports_only_the_standard_library_and_edgekit() -> None:
    code = (
        "import sys, edgekit.protocol; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('paho', 'device_agent', 'cryptography', 'numpy', 'click', 'rich')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the document ---------------------------------------------------------------------------


def test_every_json_example_in_the_protocol_document_is_valid() -> None:
    """docs/mqtt-protocol.md is the contract for other implementations: its examples parse."""
    text = (REPO / "docs" / "mqtt-protocol.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    kinds = set()
    for block in blocks:
        message = parse_message(block.encode())
        kinds.add(message.KIND)
        assert json.loads(message.to_json()) == json.loads(block)
    assert kinds == set(MessageKind)


# --- deduplication --------------------------------------------------------------------------


def test_deduplicator_drops_repeats_per_device() -> None:
    dedup = Deduplicator(per_device=3)
    first = Telemetry(device="a")
    assert dedup.accept(first)
    assert not dedup.accept(first.with_seq(9))  # same msg_id, resent
    assert dedup.accept(Telemetry(device="b", msg_id=first.msg_id))  # other device
    assert dedup.accept(first, fleet="other-fleet")  # keyed by (fleet, device) when given
    assert dedup.duplicates == 1


def test_deduplicator_window_is_bounded() -> None:
    dedup = Deduplicator(per_device=3, max_devices=2)
    ids = [f"id-{i:08d}" for i in range(5)]
    for msg_id in ids:
        assert not dedup.seen("a", msg_id)
    assert dedup.seen("a", ids[-1])
    assert not dedup.seen("a", ids[0])  # evicted: beyond the window
    assert len(dedup) == 3
    dedup.seen("b", "x" * 8)
    dedup.seen("c", "x" * 8)  # evicts device "a", the least recently seen
    assert not dedup.seen("a", ids[-1])
    dedup.forget("a")
    with pytest.raises(ValueError):
        Deduplicator(per_device=0)


def test_last_will_with_an_older_seq_is_not_a_duplicate() -> None:
    dedup = Deduplicator()
    will = Status(device="a", seq=1, state=StatusState.OFFLINE, reason="connection-lost")
    for seq in range(2, 2000):
        assert dedup.accept(Telemetry(device="a", seq=seq))
    assert dedup.accept(will)


# --- fuzzing --------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _parse_or_protocol_error(payload: bytes) -> Message | None:
    try:
        return parse_message(payload)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return None


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_bytes_raise_only_protocol_error(payload: bytes) -> None:
    _parse_or_protocol_error(payload)


@FUZZ
@given(
    st.sampled_from([m.to_dict() for m in samples()]),
    st.data(),
)
def test_fuzz_mutated_messages_raise_only_protocol_error(base: dict[str, Any], data: Any) -> None:
    mutated = json.loads(json.dumps(base))
    key = data.draw(st.sampled_from(sorted(mutated)))
    action = data.draw(st.sampled_from(["replace", "delete", "nested"]))
    if action == "delete":
        del mutated[key]
    elif action == "nested" and isinstance(mutated[key], dict) and mutated[key]:
        inner = data.draw(st.sampled_from(sorted(mutated[key])))
        mutated[key][inner] = data.draw(json_values)
    else:
        mutated[key] = data.draw(json_values)
    try:
        payload = json.dumps(mutated).encode()  # NaN/Infinity are written, and must be refused
    except (ValueError, RecursionError):
        return
    parsed = _parse_or_protocol_error(payload)
    if parsed is not None:
        assert parse_message(parsed.to_json()) == parsed  # anything accepted round-trips


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["schema", "kind", "device", "seq", "msg_id", "ts", "state", "event", "inference"]
        )
        | st.text(max_size=6),
        json_values,
        max_size=10,
    )
)
def test_fuzz_objects_raise_only_protocol_error(obj: dict[str, Any]) -> None:
    try:
        payload = json.dumps(obj).encode()
    except (ValueError, RecursionError):
        return
    _parse_or_protocol_error(payload)


@FUZZ
@given(
    device=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True),
    seq=st.integers(0, 2**63 - 1),
    count=st.integers(0, 2**63 - 1),
    p50=st.none() | st.floats(0, 1e9),
    psi=st.dictionaries(
        st.text(min_size=1, max_size=16).filter(lambda s: s.isprintable()),
        st.floats(0, 1e6),
        max_size=5,
    ),
    extra=st.dictionaries(st.text(max_size=8).map(lambda s: "x-" + s), json_values, max_size=3),
)
def test_fuzz_valid_telemetry_round_trips(
    device: str,
    seq: int,
    count: int,
    p50: float | None,
    psi: dict[str, float],
    extra: dict[str, Any],
) -> None:
    try:
        json.dumps(extra, allow_nan=False)
    except ValueError:
        return
    message = Telemetry(
        device=device,
        seq=seq,
        inference=InferenceStats(count=count, p50_ms=p50),
        drift=Drift(input_psi=psi),
        extra=extra,
    )
    assert Telemetry.from_json(message.to_json()) == message
