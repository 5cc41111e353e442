"""``edgekit fleet ca …``, ``provision``, ``revoke`` and ``broker-config``: fleet identities.

The operator's side of per-device identity (docs/security.md, "Fleet identity"): a CA per
fleet, a certificate per device whose common name is the device id, a broker configuration
whose ACL confines every certificate to its own topics, and revocation. The library is
:mod:`edgekit.fleet.pki` and :mod:`edgekit.fleet.broker_config`, imported when a command runs
so that ``edgekit --help`` stays quick. Arguments are validated by parameter types before any
key is read; library errors arrive typed and are printed as one line by the top-level group.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgekit.cli._common import passphrase_provider
from edgekit.protocol import ProtocolError, validate_id

if TYPE_CHECKING:
    from edgekit.fleet.pki import BrokerEndpoint, FleetCA

__all__ = ["PKI_COMMANDS", "broker_config", "ca", "provision", "revoke"]


# --- parameter types -------------------------------------------------------------------------


class _IdType(click.ParamType):  # type: ignore[type-arg]
    """A fleet or device id: a topic level, by the protocol's own rule."""

    name = "id"

    def __init__(self, what: str) -> None:
        self._what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return validate_id(value, what=self._what)
        except ProtocolError as exc:
            self.fail(exc.message, param, ctx)


class _HostType(click.ParamType):  # type: ignore[type-arg]
    name = "host"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from edgekit.fleet.errors import PkiError
        from edgekit.fleet.pki import validate_host

        try:
            return validate_host(value)
        except PkiError as exc:
            self.fail(exc.message, param, ctx)


class _BrokerType(click.ParamType):  # type: ignore[type-arg]
    name = "mqtts://host:port"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> BrokerEndpoint:
        from edgekit.fleet.errors import PkiError
        from edgekit.fleet.pki import BrokerEndpoint

        if isinstance(value, BrokerEndpoint):
            return value
        try:
            return BrokerEndpoint.parse(str(value))
        except PkiError as exc:
            self.fail(exc.message, param, ctx)


class _SerialType(click.ParamType):  # type: ignore[type-arg]
    name = "hex"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).lower().removeprefix("0x").replace(":", "")
        try:
            return int(text, 16)
        except ValueError:
            self.fail(f"{value!r} is not a hexadecimal serial number", param, ctx)


DEVICE_ID = _IdType("device id")
FLEET_ID = _IdType("fleet id")
NAME_ID = _IdType("name")
HOST = _HostType()
BROKER = _BrokerType()
SERIAL = _SerialType()
DIRECTORY = click.Path(file_okay=False, path_type=Path)
CA_DIRECTORY = click.Path(file_okay=False, exists=True, path_type=Path)

_CA_OPTION = click.option(
    "--ca", "ca_dir", type=CA_DIRECTORY, required=True, help="The fleet CA directory."
)
_PASSPHRASE_OPTION = click.option(
    "--passphrase-env",
    metavar="VAR",
    help="Variable holding the CA key's passphrase (default EDGEKIT_KEY_PASSPHRASE).",
)


def _open(ca_dir: Path, passphrase_env: str | None) -> FleetCA:
    from edgekit.fleet.pki import FleetCA

    return FleetCA.open(ca_dir, passphrase=passphrase_provider(passphrase_env))


def _until(when: Any) -> str:
    return str(when.strftime("%Y-%m-%d"))


# --- edgekit fleet ca ------------------------------------------------------------------------


@click.group()
def ca() -> None:
    """The fleet certificate authority: certificates for devices, the broker, the controller.

    \b
    Operator steps (docs/fleet.md, "Device identity"):
      edgekit fleet ca init --dir ca --fleet plant-1
      edgekit fleet ca server-cert --ca ca --host mqtt.lan -o broker
      edgekit fleet ca controller-cert --ca ca -o controller
      edgekit fleet broker-config --ca ca -o broker --install-dir /etc/mosquitto/edgekit
      edgekit fleet provision cam-7 --ca ca --broker mqtts://mqtt.lan:8883 \\
          --trust trust.json -o cam-7
    """


@ca.command("init")
@click.option("--dir", "directory", type=DIRECTORY, required=True, help="Where to create it.")
@click.option("--fleet", "fleet_id", type=FLEET_ID, help="The fleet it issues for.")
@click.option(
    "--days",
    type=click.IntRange(1, 36600),
    default=3650,
    show_default=True,
    help="Validity of the CA certificate.",
)
@click.option(
    "--passphrase-env",
    metavar="VAR",
    help="Encrypt the CA key with the passphrase in this environment variable.",
)
def ca_init(directory: Path, fleet_id: str | None, days: int, passphrase_env: str | None) -> None:
    """Create a fleet CA: its key (0600), certificate, an empty CRL and its records.

    Refuses to touch a directory that already holds one. Without --fleet, the first
    provision or broker-config binds it to a fleet: one CA serves exactly one fleet.
    """
    from edgekit.fleet.pki import FleetCA

    passphrase: bytes | None = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise click.UsageError(f"--passphrase-env names {passphrase_env}, which is not set")
        passphrase = value.encode("utf-8")
    made = FleetCA.init(directory, fleet=fleet_id, days=days, passphrase=passphrase)
    bound = f"fleet {made.fleet}" if made.fleet else "no fleet yet"
    click.echo(
        f"created the fleet CA in {directory} ({bound}, valid until {_until(made.not_after)}): "
        f"ca.key (private, 0600{', encrypted' if passphrase else ''}), ca.crt, crl.pem, ca.json"
    )


def _refuse_existing(out: Path, stem: str, force: bool) -> None:
    """Checked before issuing, so a refused command leaves no certificate behind in the CA."""
    if force:
        return
    for name in (f"{stem}.crt", f"{stem}.key"):
        if (out / name).exists():
            raise click.UsageError(f"{out / name} exists; refusing to overwrite it (--force)")


@ca.command("server-cert")
@_CA_OPTION
@click.option(
    "--host",
    "hosts",
    type=HOST,
    multiple=True,
    required=True,
    help="A name or address clients use to reach the broker; repeat for each.",
)
@click.option("--days", type=click.IntRange(1, 36600), default=825, show_default=True)
@click.option("-o", "--out", "out", type=DIRECTORY, required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Overwrite server.crt/server.key there.")
@_PASSPHRASE_OPTION
def server_cert(
    ca_dir: Path,
    hosts: tuple[str, ...],
    days: int,
    out: Path,
    force: bool,
    passphrase_env: str | None,
) -> None:
    """Issue the broker's TLS certificate: OUT/server.crt, server.key (0600), ca.crt."""
    from edgekit.fleet.pki import write_credentials

    authority = _open(ca_dir, passphrase_env)
    _refuse_existing(out, "server", force)
    issued = authority.issue_server(hosts, days=days)
    write_credentials(
        out, issued, stem="server", ca_certificate=authority.certificate_pem(), overwrite=True
    )
    click.echo(
        f"issued the broker certificate {issued.record.serial_hex} for {', '.join(hosts)} "
        f"(valid until {_until(issued.record.not_after)}): {out}/server.crt, server.key (0600)"
    )


@ca.command("controller-cert")
@_CA_OPTION
@click.option(
    "--name",
    type=NAME_ID,
    default="main",
    show_default=True,
    help="Replica name: the identity is controller:NAME.",
)
@click.option("--days", type=click.IntRange(1, 36600), default=825, show_default=True)
@click.option("-o", "--out", "out", type=DIRECTORY, required=True, help="Output directory.")
@click.option("--force", is_flag=True, help="Overwrite controller.crt/controller.key there.")
@_PASSPHRASE_OPTION
def controller_cert(
    ca_dir: Path, name: str, days: int, out: Path, force: bool, passphrase_env: str | None
) -> None:
    """Issue a controller client certificate (CN controller:NAME), allowed every topic of the
    fleet by the ACL. Re-run broker-config afterwards so the ACL names it."""
    from edgekit.fleet.pki import write_credentials

    authority = _open(ca_dir, passphrase_env)
    _refuse_existing(out, "controller", force)
    issued = authority.issue_controller(name, days=days)
    write_credentials(
        out, issued, stem="controller", ca_certificate=authority.certificate_pem(), overwrite=True
    )
    click.echo(
        f"issued {issued.record.name} ({issued.record.serial_hex}, valid until "
        f"{_until(issued.record.not_after)}): {out}/controller.crt, controller.key (0600)"
    )


@ca.command("list")
@_CA_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ca_list(ca_dir: Path, as_json: bool) -> None:
    """Every certificate the CA issued, with its state."""
    from edgekit.fleet.pki import FleetCA

    authority = FleetCA.open(ca_dir)
    records = authority.records()
    if as_json:
        doc = {"fleet": authority.fleet, "certificates": [r.to_dict() for r in records]}
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    click.echo(
        f"fleet {authority.fleet or '(not bound)'}; CA valid until {_until(authority.not_after)}"
    )
    for record in records:
        state = (
            f"revoked ({record.reason.value if record.reason else 'unspecified'})"
            if (record.revoked)
            else f"until {_until(record.not_after)}"
        )
        click.echo(f"{record.kind.value:<10} {record.name:<40} {record.serial_hex}  {state}")


# --- edgekit fleet provision / revoke / broker-config ----------------------------------------


@click.command()
@click.argument("device", type=DEVICE_ID)
@_CA_OPTION
@click.option("--fleet", "fleet_id", type=FLEET_ID, help="The device's fleet (default: the CA's).")
@click.option("--broker", type=BROKER, required=True, help="mqtts://HOST:PORT devices connect to.")
@click.option(
    "--trust",
    "trust_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    required=True,
    help="The trust file the device verifies bundles with.",
)
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output directory (with --bundle: the archive file).",
)
@click.option("--bundle", is_flag=True, help="Write one tar archive instead of a directory.")
@click.option(
    "--force",
    is_flag=True,
    help="Re-provision a device that has a certificate (the old one is revoked).",
)
@click.option("--days", type=click.IntRange(1, 36600), default=1825, show_default=True)
@click.option(
    "--broker-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A broker-config output directory whose crl.pem and acl to update.",
)
@_PASSPHRASE_OPTION
def provision(
    device: str,
    ca_dir: Path,
    fleet_id: str | None,
    broker: BrokerEndpoint,
    trust_file: Path,
    out: Path,
    bundle: bool,
    force: bool,
    days: int,
    broker_dir: Path | None,
    passphrase_env: str | None,
) -> None:
    """Issue DEVICE's key and certificate (CN = DEVICE) and write what the device needs:
    agent.toml, ca.crt, device.crt, device.key (0600) and trust.json.

    \b
    Example:
      edgekit fleet provision cam-7 --ca ca --broker mqtts://mqtt.lan:8883 \\
          --trust trust.json -o cam-7
      scp cam-7/* root@cam-7:/etc/edgekit/     # then: systemctl restart edgekit-agent
    """
    from edgekit.fleet.pki import provision_device

    authority = _open(ca_dir, passphrase_env)
    done = provision_device(
        authority,
        device,
        fleet=fleet_id,
        broker=broker,
        trust_file=trust_file,
        output=out,
        bundle=bundle,
        force=force,
        days=days,
    )
    what = "archive" if bundle else "directory"
    click.echo(
        f"provisioned {done.device} (fleet {done.fleet}): certificate {done.record.serial_hex}, "
        f"valid until {_until(done.record.not_after)}; {what} {done.output}"
    )
    if done.revoked:
        serials = ", ".join(r.serial_hex for r in done.revoked)
        click.echo(f"revoked the previous certificate(s) {serials}")
    # A device id revoked before is denied by the broker's ACL until the ACL is regenerated.
    revoked_before = any(
        r.name == done.device and r.revoked and r.serial not in {x.serial for x in done.revoked}
        for r in authority.records()
    )
    if broker_dir is not None:
        from edgekit.fleet.broker_config import update_revocations

        written = update_revocations(authority, broker_dir)
        click.echo(f"updated {', '.join(str(p) for p in written)}; reload the broker (SIGHUP)")
    elif done.revoked or revoked_before:
        click.echo(
            "the broker needs the new crl.pem and acl: run this with --broker-dir (or "
            "'edgekit fleet broker-config'), copy them to the broker and reload it (SIGHUP)"
        )


@click.command()
@click.argument("device", type=DEVICE_ID, required=False)
@_CA_OPTION
@click.option("--serial", type=SERIAL, help="Revoke this one certificate instead (any kind).")
@click.option(
    "--reason",
    type=click.Choice(["unspecified", "key-compromise", "superseded", "cessation-of-operation"]),
    default="unspecified",
    show_default=True,
)
@click.option(
    "--broker-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A broker-config output directory whose crl.pem and acl to update.",
)
@_PASSPHRASE_OPTION
def revoke(
    device: str | None,
    ca_dir: Path,
    serial: int | None,
    reason: str,
    broker_dir: Path | None,
    passphrase_env: str | None,
) -> None:
    """Revoke DEVICE's certificates (or --serial) and re-sign CA/crl.pem.

    The broker refuses the certificate once it has reloaded the CRL (SIGHUP); with
    --broker-dir the ACL there also denies the device every topic, which cuts off a
    connection that is already open at the same reload.

    \b
    Example:
      edgekit fleet revoke cam-7 --ca ca --reason key-compromise --broker-dir broker
      rsync broker/crl.pem broker/acl mqtt.lan:/etc/mosquitto/edgekit/ && \\
          ssh mqtt.lan systemctl reload mosquitto
    """
    from edgekit.fleet.broker_config import update_revocations
    from edgekit.fleet.pki import RevocationReason

    if (device is None) == (serial is None):
        raise click.UsageError("name a DEVICE or give --serial (one of the two)")
    authority = _open(ca_dir, passphrase_env)
    done = authority.revoke(device=device, serial=serial, reason=RevocationReason(reason))
    if done:
        for record in done:
            click.echo(f"revoked {record.kind.value} {record.name} ({record.serial_hex})")
    else:
        click.echo("already revoked; the CRL was signed again")
    click.echo(f"wrote {ca_dir}/crl.pem")
    if broker_dir is not None:
        written = update_revocations(authority, broker_dir)
        click.echo(f"updated {', '.join(str(p) for p in written)}; reload the broker (SIGHUP)")


@click.command(name="broker-config")
@_CA_OPTION
@click.option("--fleet", "fleet_id", type=FLEET_ID, help="The fleet (default: the CA's).")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--bind", type=HOST, help="Address to listen on (default: every interface).")
@click.option(
    "--controller-port",
    type=click.IntRange(1, 65535),
    help="Also a listener for controller replicas (several connections per certificate).",
)
@click.option(
    "--controller-bind",
    type=HOST,
    default="127.0.0.1",
    show_default=True,
    help="Address of the controller listener: keep it off the devices' network.",
)
@click.option(
    "-o",
    "--out",
    "out",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    help="Directory holding server.crt/server.key (from ca server-cert); files go there.",
)
@click.option(
    "--install-dir",
    type=click.Path(path_type=Path),
    help="Where the files will be on the broker host (default: OUT).",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default="/var/lib/mosquitto",
    show_default=True,
    help="mosquitto's persistence directory.",
)
def broker_config(
    ca_dir: Path,
    fleet_id: str | None,
    port: int,
    bind: str | None,
    controller_port: int | None,
    controller_bind: str,
    out: Path,
    install_dir: Path | None,
    data_dir: Path,
) -> None:
    """Write a mosquitto configuration: TLS with client certificates required, the CN as the
    identity, and an ACL confining each device to its own topics (mosquitto.conf, acl,
    ca.crt, crl.pem in OUT).

    \b
    Example:
      edgekit fleet broker-config --ca ca -o broker --install-dir /etc/mosquitto/edgekit
      scp broker/* mqtt.lan:/etc/mosquitto/edgekit/
      mosquitto -c /etc/mosquitto/edgekit/mosquitto.conf
    """
    from edgekit.fleet.broker_config import write_broker_config
    from edgekit.fleet.pki import FleetCA

    done = write_broker_config(
        FleetCA.open(ca_dir),
        out,
        fleet=fleet_id,
        port=port,
        bind=bind,
        install_dir=install_dir,
        data_dir=data_dir,
        controller_port=controller_port,
        controller_bind=controller_bind,
    )
    click.echo(
        f"wrote {', '.join(p.name for p in done.written)} in {out} for fleet {done.fleet} "
        f"(controllers: {', '.join(done.controllers)}"
        + (f"; denied: {', '.join(done.denied)}" if done.denied else "")
        + ")"
    )


#: Added to ``edgekit fleet`` by :mod:`edgekit.cli.fleet_cmds`.
PKI_COMMANDS: tuple[click.Command, ...] = (ca, provision, revoke, broker_config)
