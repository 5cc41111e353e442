"""``edgekit fleet``, ``edgekit rollout`` and ``edgekit simulate``.

``fleet serve`` runs the controller (it needs the ``fleet`` extra); every other command talks
to a running controller over its REST API (``--controller``/``EDGEKIT_CONTROLLER``, token
from ``--token``/``EDGEKIT_FLEET_TOKEN``) and needs only the base install. Rollout options are
validated here by the same parsers the controller uses, so a typo fails before any request.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.cli.fleet_pki_cmds import PKI_COMMANDS
from edgekit.fleet.auth import TOKEN_ENV
from edgekit.fleet.client import CONTROLLER_ENV, DEFAULT_CONTROLLER, FleetClient
from edgekit.fleet.errors import SpecError
from edgekit.fleet.spec import (
    Gate,
    RolloutSpec,
    Selector,
    format_duration,
    parse_duration,
    parse_fraction,
    parse_waves,
)

__all__ = ["fleet", "rollout", "simulate"]

_F = TypeVar("_F", bound=Callable[..., Any])


# --- parameter types -------------------------------------------------------------------------


class _SpecType(click.ParamType):  # type: ignore[type-arg]
    """Runs one of ``edgekit.fleet.spec``'s parsers; its SpecError becomes a usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except SpecError as exc:
            self.fail(exc.message, param, ctx)


DURATION = _SpecType("duration", parse_duration)
FRACTION = _SpecType("percent", parse_fraction)
WAVES = _SpecType("waves", parse_waves)
GATE = _SpecType("gate", Gate.parse)
SELECTOR = _SpecType("selector", Selector.parse)


class _KeyValue(click.ParamType):  # type: ignore[type-arg]
    """``KEY=VALUE`` with the value converted by ``value`` (``3=45`` -> ``(3, 45.0)``)."""

    name = "key=value"

    def __init__(self, key: Callable[[str], Any], value: Callable[[str], Any]) -> None:
        self._key = key
        self._value = value

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        key, sep, item = str(value).partition("=")
        if not sep:
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        try:
            return self._key(key.strip()), self._value(item.strip())
        except ValueError as exc:
            self.fail(f"{value!r}: {exc}", param, ctx)


def _remote(command: _F) -> _F:
    """``--controller``, ``--token`` and ``--json`` on a command that calls the REST API."""
    command = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(command)
    command = click.option(
        "--token",
        envvar=TOKEN_ENV,
        show_envvar=True,
        help="API token (sent as Authorization: Bearer).",
    )(command)
    command = click.option(
        "--controller",
        envvar=CONTROLLER_ENV,
        show_envvar=True,
        default=DEFAULT_CONTROLLER,
        show_default=True,
        help="The controller's base URL.",
    )(command)
    return command


def _client(controller: str, token: str | None) -> FleetClient:
    if not token:
        raise click.UsageError(f"an API token is required: --token or {TOKEN_ENV}")
    return FleetClient(controller, token=token)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    return format_duration(max(0.0, time.time() - ts)) + " ago"


# --- edgekit fleet ---------------------------------------------------------------------------


@click.group()
def fleet() -> None:
    """Run the fleet controller and look at the device registry."""


for _command in PKI_COMMANDS:  # ca, provision, revoke, broker-config: edgekit/cli/fleet_pki_cmds.py
    fleet.add_command(_command)


@fleet.command()
@click.option("--broker", required=True, help="mqtt://HOST:PORT (mqtts:// for TLS).")
@click.option(
    "--db",
    "db_url",
    default="sqlite:///fleet.db",
    show_default=True,
    help="SQLAlchemy URL: sqlite:///PATH or postgresql://USER@HOST/DB.",
)
@click.option(
    "--artifacts",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory of the bundle store (loose *.ekb files in it are imported).",
)
@click.option("--listen", default="127.0.0.1:8080", show_default=True, help="HOST:PORT to serve.")
@click.option(
    "--public-url", help="Base URL devices download bundles from (default: http://LISTEN)."
)
@click.option("--token", envvar=TOKEN_ENV, show_envvar=True, help="API token, named 'operator'.")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="File of 'NAME TOKEN' lines (the name is the audit log's actor).",
)
@click.option("--fleet", "fleet_id", help="Serve one fleet (default: all under edgekit/v1).")
@click.option(
    "--client-id",
    envvar="EDGEKIT_CLIENT_ID",
    show_envvar=True,
    help="MQTT client id [default: edgekit-controller, or edgekit-controller-REPLICA].",
)
@click.option(
    "--replica-id",
    envvar="EDGEKIT_REPLICA_ID",
    show_envvar=True,
    help="This controller's name among replicas on one database (needed with a shared group).",
)
@click.option(
    "--shared-group",
    "--share-group",
    "share_group",
    envvar="EDGEKIT_SHARED_GROUP",
    show_envvar=True,
    help="Split the ingest between replicas: MQTT 5 shared subscriptions $share/NAME/...",
)
@click.option(
    "--lease-ttl",
    type=DURATION,
    default="10s",
    show_default=True,
    help="Engine leader lease: a dead leader is replaced within this time.",
)
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True), help="CA for mqtts://.")
@click.option(
    "--cert-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Client certificate for a broker that requires one (edgekit fleet ca controller-cert).",
)
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, exists=True),
    help="The client certificate's private key (with --cert-file).",
)
@click.option("--tick", type=DURATION, default="1s", show_default=True, help="Engine period.")
@click.option(
    "--history-interval",
    type=DURATION,
    default="60s",
    show_default=True,
    help="Keep one telemetry sample per device per interval.",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    broker: str,
    db_url: str,
    artifacts: Path,
    listen: str,
    public_url: str | None,
    token: str | None,
    token_file: Path | None,
    fleet_id: str | None,
    client_id: str | None,
    replica_id: str | None,
    share_group: str | None,
    lease_ttl: float,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    tick: float,
    history_interval: float,
    log_level: str,
) -> None:
    """Run the controller: MQTT ingest, rollout engine, REST API, artifacts, dashboard.

    \b
    Example:
      EDGEKIT_FLEET_TOKEN=$(openssl rand -hex 24) \\
      edgekit fleet serve --broker mqtt://127.0.0.1:1883 --db sqlite:///fleet.db \\
          --artifacts ./bundles --listen 0.0.0.0:8080 --public-url http://ctl.lan:8080

    \b
    Replicas (docs/scaling.md): the same command on each, one database, one broker:
      edgekit fleet serve ... --db postgresql://edgekit@db.lan/edgekit \\
          --replica-id ctl-a --shared-group edgekit

    \b
    A broker written by `edgekit fleet broker-config` (client certificates required):
      edgekit fleet serve --broker mqtts://127.0.0.1:8884 --ca-file ca/ca.crt \\
          --cert-file ctl/controller.crt --key-file ctl/controller.key ...
    """
    try:
        from edgekit.fleet.auth import TokenRing
        from edgekit.fleet.server import ServeConfig
        from edgekit.fleet.server import serve as run_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise click.UsageError(
            f"the controller needs the fleet extra (pip install 'edgekit[fleet]'): {exc}"
        ) from None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
    tokens = TokenRing.load(token=token, token_file=token_file)
    for value, hint in ((replica_id, "--replica-id"), (share_group, "--shared-group")):
        if value is not None and not value.strip():
            raise click.BadParameter("must not be empty", param_hint=hint)
    if (cert_file is None) != (key_file is None):
        raise click.UsageError("--cert-file and --key-file go together")
    if cert_file is not None and not broker.startswith(("mqtts://", "ssl://")):
        raise click.BadParameter(
            "a client certificate needs an mqtts:// broker", param_hint="--broker"
        )
    if share_group and not (replica_id or client_id):
        raise click.UsageError("--shared-group needs --replica-id (each replica its own session)")
    run_server(
        ServeConfig(
            broker=broker,
            db_url=db_url,
            artifacts=artifacts,
            tokens=tokens,
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            public_url=public_url,
            fleet=fleet_id,
            client_id=client_id,
            replica_id=replica_id,
            share_group=share_group,
            lease_ttl_s=lease_ttl,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            tick_s=tick,
            history_interval_s=history_interval,
            log_level=log_level,
        )
    )


@fleet.command()
@click.option("--fleet", "fleet_id", help="Only this fleet.")
@click.option("--target", type=SELECTOR, help="Only devices a selector picks (group=cameras).")
@click.option("--online/--offline", default=None, help="Only online (or offline) devices.")
@_remote
def devices(
    fleet_id: str | None,
    target: Selector | None,
    online: bool | None,
    controller: str,
    token: str | None,
    as_json: bool,
) -> None:
    """List devices: presence, model, labels, last seen, latest latency."""
    client = _client(controller, token)
    found = client.devices(
        fleet=fleet_id, target=None if target is None else str(target), online=online
    )
    if as_json:
        _print_json(found)
        return
    table = Table(title=f"{len(found)} devices")
    for column in ("fleet", "device", "presence", "model", "groups", "last seen", "p95 ms"):
        table.add_column(column, no_wrap=column in ("device", "presence"))
    for d in found:
        presence = "[green]online[/]" if d["online"] else "[red]offline[/]"
        current = d.get("current")
        model = f"{current['name']}:{current['version']}" if current else "-"
        telemetry = d.get("telemetry") or {}
        p95 = telemetry.get("p95_ms")
        table.add_row(
            escape(d["fleet"]),
            escape(d["device"]),
            presence,
            escape(model),
            escape(",".join(d.get("groups") or [])),
            _ago(d.get("last_seen")),
            "-" if p95 is None else f"{p95:.1f}",
        )
    Console().print(table)


@fleet.command()
@click.argument("device_ids", nargs=-1, required=True)
@click.option("--fleet", "fleet_id", required=True, help="The devices' fleet.")
@click.option("--group", "groups", multiple=True, help="Operator group (replaces the list).")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    type=_KeyValue(str, str),
    help="Operator tag NAME=VALUE (replaces the tags).",
)
@click.option("--clear-groups", is_flag=True, help="Remove every operator group.")
@_remote
def label(
    device_ids: tuple[str, ...],
    fleet_id: str,
    groups: tuple[str, ...],
    tags: tuple[tuple[str, str], ...],
    clear_groups: bool,
    controller: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Set operator groups/tags of devices (targets match them: group=NAME, tag.NAME=V)."""
    if not groups and not tags and not clear_groups:
        raise click.UsageError("give --group, --tag or --clear-groups")
    client = _client(controller, token)
    results = []
    for device_id in device_ids:
        results.append(
            client.label(
                fleet_id,
                device_id,
                groups=list(groups) if groups or clear_groups else None,
                tags=dict(tags) if tags else None,
            )
        )
    if as_json:
        _print_json(results)
    else:
        for d in results:
            click.echo(f"{d['fleet']}/{d['device']}: groups={','.join(d['groups'])}")


@fleet.command()
@_remote
def stats(controller: str, token: str | None, as_json: bool) -> None:
    """The controller's counters: messages ingested, malformed, dropped; engine ticks."""
    data = _client(controller, token).stats()
    if as_json:
        _print_json(data)
        return
    ingest = data["ingest"]
    click.echo(
        f"mqtt {data['mqtt']['broker']} connected={data['mqtt']['connected']}  "
        f"processed={ingest['processed_total']} malformed={ingest['malformed_total']} "
        f"dropped={ingest['dropped']} duplicates={ingest['duplicates']} "
        f"queue={ingest['queue_depth']} lag={ingest['lag_s']}s"
    )
    for kind, count in sorted(ingest["malformed"].items()):
        click.echo(f"  malformed {kind}: {count}")


# --- edgekit rollout -------------------------------------------------------------------------


@click.group()
def rollout() -> None:
    """Create and steer staged rollouts on a running controller."""


@rollout.command()
@click.argument("bundle")
@click.option("--fleet", "fleet_id", help="The fleet (default: the controller's own).")
@click.option("--target", type=SELECTOR, default="all", show_default=True, help="Selector.")
@click.option("--waves", type=WAVES, default="5%,25%,100%", show_default=True)
@click.option("--min-wave-time", type=DURATION, default="10m", show_default=True)
@click.option("--success-threshold", type=FRACTION, default="95%", show_default=True)
@click.option("--max-failures", type=FRACTION, default="5%", show_default=True)
@click.option("--gate", "gates", type=GATE, multiple=True, help="METRIC OP NUMBER; repeat.")
@click.option(
    "--min-inferences",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="Inferences a device must serve on the bundle before gates count it.",
)
@click.option("--device-timeout", type=DURATION, default="30m", show_default=True)
@click.option("--retries", type=click.IntRange(0, 20), default=1, show_default=True)
@click.option(
    "--on-breach",
    type=click.Choice(["pause", "abort", "rollback"]),
    default="rollback",
    show_default=True,
)
@click.option(
    "--on-timeout", type=click.Choice(["fail", "exclude"]), default="fail", show_default=True
)
@click.option("--max-wave-time", type=DURATION, help="A wave not healthy by then is a breach.")
@click.option("--paused", is_flag=True, help="Create paused; start with 'rollout resume'.")
@click.option("--name", help="A label for people.")
@_remote
def create(
    bundle: str,
    fleet_id: str | None,
    target: Selector,
    waves: tuple[float, ...],
    min_wave_time: float,
    success_threshold: float,
    max_failures: float,
    gates: tuple[Gate, ...],
    min_inferences: int,
    device_timeout: float,
    retries: int,
    on_breach: str,
    on_timeout: str,
    max_wave_time: float | None,
    paused: bool,
    name: str | None,
    controller: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Roll BUNDLE (a .ekb file, uploaded first, or an uploaded artifact's sha256 prefix or
    NAME-VERSION) out in waves.

    \b
    Example:
      edgekit rollout create tiny-3.ekb --target 'group=cameras' --waves 5%,25%,100% \\
          --min-wave-time 10m --success-threshold 95% --max-failures 5% \\
          --gate 'p95_latency_ms<=30' --gate 'error_rate<=0.01' \\
          --gate 'drift_psi<=0.2' --gate 'golden_pass==1'
    """
    client = _client(controller, token)
    path = Path(bundle)
    artifact = client.upload(path) if path.is_file() else client.artifact(bundle)
    body: dict[str, Any] = {
        "artifact": artifact["sha256"],
        "target": str(target),
        "waves": list(waves),
        "min_wave_time": min_wave_time,
        "success_threshold": success_threshold,
        "max_failures": max_failures,
        "gates": [str(g) for g in gates],
        "min_inferences": min_inferences,
        "device_timeout": device_timeout,
        "retries": retries,
        "on_breach": on_breach,
        "on_timeout": on_timeout,
        "max_wave_time": max_wave_time,
        "start_paused": paused,
        "name": name,
    }
    if fleet_id:
        body["fleet"] = fleet_id
    # The controller parses it again; parsing here first reports a mistake without a request.
    RolloutSpec.from_dict(body, default_fleet=fleet_id or "-")
    created = client.create_rollout(body)
    if as_json:
        _print_json(created)
    else:
        click.echo(
            f"rollout {created['id']}: {created['bundle']}:{created['version']} -> "
            f"{created['fleet']} ({created['spec']['target']}), {created['state']}"
        )


def _show(data: Mapping[str, Any]) -> None:
    console = Console()
    console.print(
        f"[bold]{escape(data['id'])}[/] {escape(data['bundle'])}:{data['version']} -> fleet "
        f"{escape(data['fleet'])} target {escape(data['spec']['target'])}: "
        f"[bold]{escape(data['state'])}[/] (wave {data['wave']}/{data['waves']})"
    )
    if data.get("reason"):
        console.print(f"reason: {escape(data['reason'])}")
    if data.get("min_wave_time_remaining") is not None:
        console.print(f"healthy; next wave in {format_duration(data['min_wave_time_remaining'])}")
    table = Table()
    for column in (
        "wave",
        "share",
        "devices",
        "ok",
        "failed",
        "pending",
        "excluded",
        "rolled back",
    ):
        table.add_column(column)
    for wave in data["wave_stats"]:
        table.add_row(
            str(wave["index"] + 1),
            f"{wave['share'] * 100:.0f}%",
            str(wave["devices"]),
            str(wave["succeeded"]),
            str(wave["failed"]),
            str(wave["pending"]),
            str(wave["excluded"]),
            str(wave["rolled_back"]),
        )
    late = data.get("late") or {}
    if late.get("devices"):
        table.add_row(
            "late",
            "",
            str(late["devices"]),
            str(late["succeeded"]),
            str(late["failed"]),
            str(late["pending"]),
            str(late["excluded"]),
            str(late["rolled_back"]),
        )
    console.print(table)
    for gate in data.get("gate_results") or []:
        value = gate.get("value")
        shown = "-" if value is None else f"{value:.4g}"
        console.print(
            f"gate {escape(gate['gate'])}: {gate['verdict']} "
            f"(value {shown}, {gate['devices']} devices)"
        )


@rollout.command()
@click.argument("rollout_id")
@click.option("--devices", "show_devices", is_flag=True, help="Also list every device.")
@click.option("--audit", "show_audit", is_flag=True, help="Also print the audit log.")
@_remote
def status(
    rollout_id: str,
    show_devices: bool,
    show_audit: bool,
    controller: str,
    token: str | None,
    as_json: bool,
) -> None:
    """Where a rollout stands: state, per-wave progress, gates."""
    client = _client(controller, token)
    data = client.rollout(rollout_id)
    if show_devices:
        data["devices"] = client.rollout_devices(rollout_id)
    if show_audit:
        data["audit"] = client.rollout_audit(rollout_id)
    if as_json:
        _print_json(data)
        return
    _show(data)
    for d in data.get("devices", []):
        click.echo(
            f"  wave {d['wave']} {d['device']}: {d['state']} (attempt {d['attempt']})"
            + (f" {d['reason']}" if d.get("reason") else "")
        )
    for entry in reversed(data.get("audit", [])):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["ts"]))
        click.echo(
            f"  {stamp} {entry['actor']}: {entry['action']}"
            + (f" {entry['device']}" if entry.get("device") else "")
        )


@rollout.command(name="list")
@click.option("--fleet", "fleet_id", help="Only this fleet.")
@_remote
def list_rollouts(fleet_id: str | None, controller: str, token: str | None, as_json: bool) -> None:
    """Recent rollouts, newest first."""
    found = _client(controller, token).rollouts(fleet=fleet_id)
    if as_json:
        _print_json(found)
        return
    table = Table()
    for column in ("id", "bundle", "fleet", "target", "state", "wave", "ok/devices", "created"):
        table.add_column(column, no_wrap=column in ("id", "state"))
    for r in found:
        totals = r["totals"]
        table.add_row(
            escape(r["id"]),
            escape(f"{r['bundle']}:{r['version']}"),
            escape(r["fleet"]),
            escape(r["spec"]["target"]),
            escape(r["state"]),
            f"{r['wave']}/{r['waves']}",
            f"{totals['succeeded']}/{totals['devices']}",
            _ago(r["created_at"]),
        )
    Console().print(table)


def _action(name: str, doc: str, **extra: Any) -> click.Command:
    @click.command(name=name, help=doc)
    @click.argument("rollout_id")
    @_remote
    def command(rollout_id: str, controller: str, token: str | None, as_json: bool) -> None:
        data = _client(controller, token).act(rollout_id, name, **extra)
        if as_json:
            _print_json(data)
        else:
            click.echo(f"rollout {data['id']}: {data['state']}")

    return command


rollout.add_command(_action("pause", "Stop sending the rollout to more devices."))
rollout.add_command(
    _action("resume", "Continue a paused rollout (failures so far count as acknowledged).")
)
rollout.add_command(
    _action(
        "rollback",
        "Give every touched device its previous desired state back and command a rollback "
        "where the new bundle runs.",
    )
)


@rollout.command()
@click.argument("rollout_id")
@click.option("--rollback", is_flag=True, help="Also roll back every touched device.")
@_remote
def abort(
    rollout_id: str, rollback: bool, controller: str, token: str | None, as_json: bool
) -> None:
    """Stop the rollout for good (devices keep what they run unless --rollback)."""
    data = _client(controller, token).act(rollout_id, "abort", rollback=rollback)
    if as_json:
        _print_json(data)
    else:
        click.echo(f"rollout {data['id']}: {data['state']}")


# --- edgekit simulate ------------------------------------------------------------------------


def _versions(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


@click.command()
@click.option("--devices", "count", type=click.IntRange(1, 100_000), default=10, show_default=True)
@click.option("--broker", required=True, help="mqtt://HOST:PORT")
@click.option("--fleet", "fleet_id", default="sim", show_default=True)
@click.option("--prefix", default="sim", show_default=True, help="Device ids: PREFIX-0000...")
@click.option("--interval", type=DURATION, default="10s", show_default=True, help="Telemetry.")
@click.option("--rate", type=float, default=20.0, show_default=True, help="Inferences/s.")
@click.option("--model", default="tiny", show_default=True, help="Bundle name they start with.")
@click.option("--initial-version", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--group", "groups", multiple=True, help="Group the devices declare; repeat.")
@click.option("--tag", "tags", multiple=True, type=_KeyValue(str, str), help="NAME=VALUE.")
@click.option("--fail-golden", "fail_golden", multiple=True, help="Versions failing self-test.")
@click.option("--latency", multiple=True, type=_KeyValue(int, float), help="VERSION=P95_MS.")
@click.option("--error-rate", multiple=True, type=_KeyValue(int, float), help="VERSION=SHARE.")
@click.option("--offline", multiple=True, help="Device id that starts disconnected; repeat.")
@click.option("--no-download", is_flag=True, help="Do not fetch bundles (pretend).")
@click.option("--install-time", type=DURATION, default="0.2s", show_default=True)
@click.option("--download-workers", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--duration", type=DURATION, help="Stop after this long (default: Ctrl-C).")
@click.option(
    "--stats-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the simulator's counters here as JSON every second.",
)
def simulate(
    count: int,
    broker: str,
    fleet_id: str,
    prefix: str,
    interval: float,
    rate: float,
    model: str,
    initial_version: int,
    groups: tuple[str, ...],
    tags: tuple[tuple[str, str], ...],
    fail_golden: tuple[str, ...],
    latency: tuple[tuple[int, float], ...],
    error_rate: tuple[tuple[int, float], ...],
    offline: tuple[str, ...],
    no_download: bool,
    install_time: float,
    download_workers: int,
    duration: float | None,
    stats_file: Path | None,
) -> None:
    """Simulate N devices speaking the real MQTT protocol (status with last will, telemetry,
    update progress and outcomes), for trying and load-testing a controller."""
    try:
        from edgekit.fleet.simulate import SimConfig, Simulator
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise click.UsageError(f"the simulator needs paho-mqtt: {exc}") from None
    try:
        failing = frozenset(v for text in fail_golden for v in _versions(text))
    except ValueError:
        raise click.BadParameter("versions are whole numbers", param_hint="--fail-golden") from None
    config = SimConfig(
        broker=broker,
        fleet=fleet_id,
        devices=count,
        prefix=prefix,
        interval_s=interval,
        inference_rate=rate,
        model=model,
        initial_version=initial_version,
        groups=groups,
        tags=dict(tags),
        latency_ms=dict(latency),
        error_rate=dict(error_rate),
        fail_golden=failing,
        download=not no_download,
        download_workers=download_workers,
        install_s=install_time,
        offline=frozenset(offline),
    )
    simulator = Simulator(config)

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop as cleanly on SIGTERM as on Ctrl-C
    started = time.monotonic()
    simulator.start(timeout=max(60.0, count / 20))
    click.echo(f"{count} simulated devices connected to {broker} (fleet {fleet_id})", err=True)
    try:
        while duration is None or time.monotonic() - started < duration:
            time.sleep(1.0)
            if stats_file is not None:
                tmp = stats_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(simulator.stats.to_dict()))
                tmp.replace(stats_file)
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()
    json.dump(simulator.stats.to_dict(), sys.stdout)
    click.echo()
