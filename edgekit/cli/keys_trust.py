"""``edgekit keys …`` and ``edgekit trust …``: signing keys and the device trust policy."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edgekit.cli._common import PASSPHRASE_ENV, passphrase_provider
from edgekit.errors import KeyFileError
from edgekit.fsutil import atomic_write_bytes
from edgekit.keys import PublicKey, generate_key, load_public_key, load_signing_key, write_key_pair
from edgekit.trust import TrustEnvelope, TrustPolicy, apply_rotations, load_trust, verify_rotation

__all__ = ["keys", "trust"]

_KEY_NAME = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.group()
def keys() -> None:
    """Create and show Ed25519 signing keys."""


@keys.command("generate")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where NAME.key and NAME.pub go.",
)
@click.option(
    "--passphrase-env",
    metavar="VAR",
    help="Encrypt the private key with the passphrase in this environment variable.",
)
@click.option(
    "--prompt",
    "prompt_passphrase",
    is_flag=True,
    help="Encrypt the private key with a passphrase typed twice at a prompt.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keys_generate(
    name: str, directory: Path, passphrase_env: str | None, prompt_passphrase: bool, force: bool
) -> None:
    """Generate NAME.key (private, mode 0600) and NAME.pub in --dir.

    Keep NAME.key offline (an HSM, a hardware token or at least an encrypted disk); NAME.pub is
    what `edgekit trust init` puts on devices.
    """
    if not name or "/" in name or name.startswith("."):
        raise click.BadParameter("must be a plain file stem such as release-1", param_hint="NAME")
    passphrase: bytes | None = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            raise click.UsageError(f"--passphrase-env names {passphrase_env}, which is not set")
        passphrase = value.encode("utf-8")
    elif prompt_passphrase:
        passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=True).encode(
            "utf-8"
        )
    key = generate_key()
    private_path, public_path = write_key_pair(
        directory, name, key, passphrase=passphrase, overwrite=force
    )
    click.echo(f"wrote {private_path} (private, 0600{', encrypted' if passphrase else ''})")
    click.echo(f"wrote {public_path}")
    click.echo(f"key id {key.keyid}")


@keys.command("show")
@click.argument("key_file", type=_KEY_NAME)
@click.option(
    "--passphrase-env", metavar="VAR", help=f"Passphrase variable (default {PASSPHRASE_ENV})."
)
def keys_show(key_file: Path, passphrase_env: str | None) -> None:
    """Print the key id of a .pub or .key file."""
    try:
        public = load_public_key(key_file)
    except KeyFileError:
        public = load_signing_key(key_file, passphrase=passphrase_provider(passphrase_env)).public
    click.echo(public.keyid)


@click.group()
def trust() -> None:
    """Create, rotate and inspect the trust policy devices check bundles against.

    A trust file lists the public keys allowed to sign and how many must (the threshold).
    Version 1 is installed on the device when it is provisioned; later versions are accepted
    only if signed by a threshold of the current keys AND of the new keys (TUF root rotation).
    """


def _load_keys(paths: tuple[Path, ...]) -> list[tuple[str, PublicKey]]:
    return [(path.stem, load_public_key(path)) for path in paths]


@trust.command("init")
@click.option(
    "--key",
    "key_files",
    multiple=True,
    required=True,
    type=_KEY_NAME,
    help="A public key (.pub) allowed to sign; repeat for several.",
)
@click.option(
    "--threshold",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many distinct keys must sign a bundle.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write trust.json.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def trust_init(key_files: tuple[Path, ...], threshold: int, output: Path, force: bool) -> None:
    """Create version 1 of a trust policy (the device's trust anchor)."""
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists; use --force to replace it")
    policy = TrustPolicy.create(_load_keys(key_files), threshold=threshold)
    atomic_write_bytes(output, TrustEnvelope.unsigned(policy).to_bytes())
    click.echo(f"wrote {output}: version 1, {len(policy.keys)} key(s), threshold {threshold}")


@trust.command("rotate")
@click.option(
    "--trust", "trust_file", type=_KEY_NAME, required=True, help="The current trust file."
)
@click.option(
    "--key",
    "key_files",
    multiple=True,
    required=True,
    type=_KEY_NAME,
    help="A public key of the NEW policy; repeat. Leave a key out to revoke it.",
)
@click.option("--threshold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--sign-key",
    "sign_keys",
    multiple=True,
    type=_KEY_NAME,
    help="A private key to sign the new version with (old and new keys); repeat. "
    "Co-signers elsewhere can add theirs later with `edgekit trust sign`.",
)
@click.option(
    "--passphrase-env", metavar="VAR", help=f"Passphrase variable (default {PASSPHRASE_ENV})."
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def trust_rotate(
    trust_file: Path,
    key_files: tuple[Path, ...],
    threshold: int,
    sign_keys: tuple[Path, ...],
    passphrase_env: str | None,
    output: Path,
) -> None:
    """Write the next version of a trust policy, signed by the given keys."""
    current = load_trust(trust_file).policy
    policy = TrustPolicy.create(
        _load_keys(key_files), threshold=threshold, version=current.version + 1
    )
    provider = passphrase_provider(passphrase_env)
    signers = [load_signing_key(p, passphrase=provider) for p in sign_keys]
    envelope = TrustEnvelope.unsigned(policy).signed_by(*signers)
    atomic_write_bytes(output, envelope.to_bytes())
    click.echo(
        f"wrote {output}: version {policy.version}, {len(policy.keys)} key(s), "
        f"threshold {threshold}, {len(envelope.signatures)} signature(s)"
    )
    _report_acceptance(current, envelope)


def _report_acceptance(current: TrustPolicy, envelope: TrustEnvelope) -> None:
    try:
        verify_rotation(current, envelope)
    except Exception as exc:
        click.echo(f"not yet acceptable by devices on v{current.version}: {exc}")
    else:
        click.echo(f"acceptable by devices on v{current.version}")


@trust.command("sign")
@click.argument("new_trust", type=_KEY_NAME)
@click.option(
    "--key",
    "sign_keys",
    multiple=True,
    required=True,
    type=_KEY_NAME,
    help="A private key to add a signature with; repeat.",
)
@click.option(
    "--trust",
    "trust_file",
    type=_KEY_NAME,
    help="The current trust file, to report whether the result is now acceptable.",
)
@click.option(
    "--passphrase-env", metavar="VAR", help=f"Passphrase variable (default {PASSPHRASE_ENV})."
)
def trust_sign(
    new_trust: Path,
    sign_keys: tuple[Path, ...],
    trust_file: Path | None,
    passphrase_env: str | None,
) -> None:
    """Add co-signatures to a rotated trust file (in place, atomically)."""
    envelope = load_trust(new_trust)
    provider = passphrase_provider(passphrase_env)
    signed = envelope.signed_by(*(load_signing_key(p, passphrase=provider) for p in sign_keys))
    atomic_write_bytes(new_trust, signed.to_bytes())
    click.echo(f"{new_trust}: {len(signed.signatures)} signature(s)")
    if trust_file is not None:
        _report_acceptance(load_trust(trust_file).policy, signed)


@trust.command("update")
@click.option(
    "--trust",
    "trust_file",
    type=_KEY_NAME,
    required=True,
    help="The trust file to update (a device's current trust).",
)
@click.argument("new_versions", nargs=-1, required=True, type=_KEY_NAME)
@click.option("--dry-run", is_flag=True, help="Check the chain, write nothing.")
def trust_update(trust_file: Path, new_versions: tuple[Path, ...], dry_run: bool) -> None:
    """Accept NEW_VERSIONS (v+1, v+2, … in order) into --trust, as a device does.

    The whole chain is checked before the file is replaced; on any failure it is unchanged.
    """
    chain = [load_trust(p) for p in new_versions]
    if dry_run:
        current = load_trust(trust_file).policy
        for envelope in chain:
            current = verify_rotation(current, envelope)
        click.echo(f"chain accepted: would move to version {current.version}")
        return
    policy = apply_rotations(trust_file, chain)
    click.echo(f"{trust_file} is now version {policy.version}")


@trust.command("show")
@click.argument("trust_file", type=_KEY_NAME)
@click.option("--json", "as_json", is_flag=True, help="Print the decoded policy JSON.")
def trust_show(trust_file: Path, as_json: bool) -> None:
    """Show a trust file's version, threshold, keys and signatures."""
    envelope = load_trust(trust_file)
    if as_json:
        sys.stdout.write(envelope.payload.decode("utf-8"))
        return
    policy = envelope.policy
    console = Console()
    console.print(f"[bold]{trust_file}[/]: version {policy.version}, threshold {policy.threshold}")
    table = Table("key id", "name", "signed this file")
    signers = {s.keyid for s in envelope.signatures}
    for keyid in sorted(policy.keys):
        table.add_row(keyid, policy.names.get(keyid, ""), "yes" if keyid in signers else "")
    console.print(table)
    others = signers - set(policy.keys)
    if others:
        console.print(f"{len(others)} signature(s) from keys not in this version (e.g. old keys)")
