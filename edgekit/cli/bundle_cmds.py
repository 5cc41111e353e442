"""``edgekit sign``, ``edgekit verify`` and ``edgekit inspect``."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.bundle import add_signatures, build_bundle, read_bundle
from edgekit.cli._common import (
    PASSPHRASE_ENV,
    ExpiresType,
    NonNegativeInt,
    RuntimeType,
    passphrase_provider,
)
from edgekit.keys import MANIFEST_PAYLOAD_TYPE, load_signing_key
from edgekit.manifest import Targets, format_time, normalize_arch
from edgekit.trust import load_trust
from edgekit.verify import DeviceProfile, verify_bundle

__all__ = ["inspect", "sign", "verify"]

_EXISTING_FILE = click.Path(dir_okay=False, exists=True, path_type=Path)


@click.command()
@click.argument("source", type=_EXISTING_FILE)
@click.option(
    "--key",
    "key_files",
    multiple=True,
    required=True,
    type=_EXISTING_FILE,
    help="Private key (.key) to sign with; repeat for several signatures.",
)
@click.option(
    "--add",
    "add_mode",
    is_flag=True,
    help="SOURCE is an existing bundle: add co-signatures to it (in place).",
)
@click.option("--name", help="Bundle name, e.g. digits-classifier.")
@click.option(
    "--version",
    "version",
    type=NonNegativeInt(),
    help="Monotonic integer version; devices refuse anything not newer.",
)
@click.option("--display-version", help="Human version string shown to people, e.g. 2.1.0-rc1.")
@click.option("--runtime", type=RuntimeType(), help="onnx|tflite; inferred from the file.")
@click.option("--golden", type=_EXISTING_FILE, help="golden.npz for the on-device self-test.")
@click.option("--baseline", type=_EXISTING_FILE, help="baseline.json for drift detection.")
@click.option("--report", type=_EXISTING_FILE, help="report.json from conversion.")
@click.option(
    "--file",
    "extra_files",
    multiple=True,
    type=_EXISTING_FILE,
    help="Another file to ship (e.g. labels.txt); repeat.",
)
@click.option("--expires", type=ExpiresType(), help="UTC time or duration (default 365d).")
@click.option(
    "--arch",
    "architectures",
    multiple=True,
    help="Allowed architecture (x86_64, aarch64, armv7l…); repeat. Default: any.",
)
@click.option("--min-agent-version", help="Oldest edgekit agent that may install this.")
@click.option("--min-runtime-version", help="Oldest runtime library version, e.g. 1.17.")
@click.option(
    "--passphrase-env", metavar="VAR", help=f"Passphrase variable (default {PASSPHRASE_ENV})."
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output .ekb (default NAME-VERSION.ekb beside the model).",
)
def sign(
    source: Path,
    key_files: tuple[Path, ...],
    add_mode: bool,
    name: str | None,
    version: int | None,
    display_version: str | None,
    runtime: str | None,
    golden: Path | None,
    baseline: Path | None,
    report: Path | None,
    extra_files: tuple[Path, ...],
    expires: datetime | None,
    architectures: tuple[str, ...],
    min_agent_version: str | None,
    min_runtime_version: str | None,
    passphrase_env: str | None,
    output: Path | None,
) -> None:
    """Package a ready model file into a signed bundle, or co-sign a bundle with --add.

    \b
    Examples:
      edgekit sign model.onnx --key keys/release.key --name digits --version 3 -o digits-3.ekb
      edgekit sign digits-3.ekb --key keys/second.key --add
    """
    provider = passphrase_provider(passphrase_env)
    signers = [load_signing_key(path, passphrase=provider) for path in key_files]
    if add_mode:
        given = [n for n, v in (("--name", name), ("--version", version), ("-o", output)) if v]
        if given:
            raise click.UsageError(
                f"--add signs an existing bundle; {', '.join(given)} do not apply"
            )
        added = add_signatures(source, signers)
        click.echo(f"added {len(added)} signature(s) to {source}")
        return
    missing = [flag for flag, value in (("--name", name), ("--version", version)) if value is None]
    if missing:
        raise click.UsageError(f"signing a model needs {' and '.join(missing)}")
    assert name is not None and version is not None
    out = output or source.with_name(f"{name}-{version}.ekb")
    manifest = build_bundle(
        source,
        out,
        name=name,
        version=version,
        keys=signers,
        runtime=runtime,
        display_version=display_version,
        golden=golden,
        baseline=baseline,
        report=report,
        extra_files=extra_files,
        expires=expires,
        targets=Targets(
            architectures=tuple(normalize_arch(a) for a in architectures),
            min_agent_version=min_agent_version,
            runtime_version=min_runtime_version,
        ),
    )
    click.echo(
        f"wrote {out}: {manifest.name} v{manifest.version} ({manifest.runtime}), "
        f"{len(manifest.files)} file(s), {len(signers)} signature(s), "
        f"expires {format_time(manifest.expires)}"
    )


@click.command()
@click.argument("bundle", type=_EXISTING_FILE)
@click.option(
    "--trust",
    "trust_file",
    type=_EXISTING_FILE,
    required=True,
    help="The trust policy to check signatures against.",
)
@click.option(
    "--installed-version",
    type=NonNegativeInt(),
    help="Refuse a bundle that is not newer than this version (anti-rollback).",
)
@click.option("--arch", help="Check the bundle targets this architecture.")
@click.option(
    "--runtime",
    "runtimes",
    multiple=True,
    help="A runtime the device has, as NAME or NAME=VERSION (e.g. onnxruntime=1.17); "
    "repeat. When given, the bundle's runtime must be among them.",
)
@click.option("--agent-version", help="Check the bundle accepts this agent version.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def verify(
    bundle: Path,
    trust_file: Path,
    installed_version: int | None,
    arch: str | None,
    runtimes: tuple[str, ...],
    agent_version: str | None,
    as_json: bool,
) -> None:
    """Check BUNDLE's signatures, hashes, version, expiry and targets.

    Exits 0 when valid. Otherwise exits 1 and prints one line: REJECTED [reason]: details.
    """
    policy = load_trust(trust_file).policy
    device = None
    if arch or runtimes or agent_version:
        offered: dict[str, str] = {}
        for item in runtimes:
            runtime_name, _, runtime_version = item.partition("=")
            runtime_name = "onnxruntime" if runtime_name == "onnx" else runtime_name
            offered[runtime_name] = runtime_version or "0"
        device = DeviceProfile(
            architecture=arch, agent_version=agent_version, runtimes=offered or None
        )
    result = verify_bundle(bundle, policy, installed_version=installed_version, device=device)
    manifest = result.manifest
    if as_json:
        json.dump(
            {
                "valid": True,
                "name": manifest.name,
                "version": manifest.version,
                "signed_by": list(result.signed_by),
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
        return
    click.echo(
        f"OK: {manifest.name} v{manifest.version} signed by {len(result.signed_by)} "
        f"trusted key(s) (threshold {policy.threshold}), {len(result.sizes)} file(s) verified"
    )


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


@click.command()
@click.argument("bundle", type=_EXISTING_FILE)
@click.option(
    "--json", "as_json", is_flag=True, help="Print manifest, signatures and files as JSON."
)
@click.option(
    "--trust",
    "trust_file",
    type=_EXISTING_FILE,
    help="Also say which signatures verify against this trust policy.",
)
@click.option("--check", is_flag=True, help="Hash every file and compare with the manifest.")
def inspect(bundle: Path, as_json: bool, trust_file: Path | None, check: bool) -> None:
    """Show a bundle's manifest, signatures and files without installing it.

    Without --trust this does NOT establish that the bundle is genuine; use `edgekit verify`.
    """
    contents = read_bundle(bundle, check_hashes=check)
    keys = load_trust(trust_file).policy.keys if trust_file else None
    sig_rows = []
    for signature in contents.signatures:
        status = "not checked (no --trust)"
        if keys is not None:
            key = keys.get(signature.keyid)
            if key is None:
                status = "unknown key"
            elif key.verify(MANIFEST_PAYLOAD_TYPE, contents.manifest_bytes, signature):
                status = "valid, trusted"
            else:
                status = "INVALID"
        sig_rows.append({"keyid": signature.keyid, "status": status})
    manifest = contents.manifest
    files = [
        {
            "name": entry.name,
            "size": entry.size,
            "sha256": manifest.files[entry.name].sha256
            if manifest and entry.name in manifest.files
            else None,
            **(
                {"hash_ok": contents.hashes.get(entry.name) == manifest.files[entry.name].sha256}
                if check and manifest and entry.name in manifest.files
                else {}
            ),
        }
        for entry in contents.entries
    ]
    if as_json:
        json.dump(
            {
                "manifest": json.loads(contents.manifest_bytes) if manifest else None,
                "manifest_error": contents.manifest_error,
                "signatures": sig_rows,
                "files": files,
                "problems": contents.problems,
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return
    console = Console()
    if manifest is None:
        console.print(f"[red]manifest unreadable:[/] {escape(str(contents.manifest_error))}")
        sys.exit(1)
    overview = Table(show_header=False, title=f"{bundle.name}", title_justify="left")
    overview.add_column(style="bold")
    overview.add_column()
    shown_version = str(manifest.version)
    if manifest.display_version:
        shown_version += f" ({manifest.display_version})"
    for label, value in (
        ("name", manifest.name),
        ("version", shown_version),
        ("runtime", manifest.runtime),
        ("model", manifest.model),
        ("created", format_time(manifest.created)),
        ("expires", format_time(manifest.expires)),
        ("architectures", ", ".join(manifest.targets.architectures) or "any"),
        ("min agent", manifest.targets.min_agent_version or "any"),
        ("opsets", ", ".join(f"{d} {v}" for d, v in manifest.targets.opsets.items()) or "-"),
        ("tools", ", ".join(f"{k} {v}" for k, v in manifest.tools.items())),
    ):
        overview.add_row(label, escape(value))
    console.print(overview)
    tensors = Table(
        "", "name", "dtype", "shape", "quantization", title="tensors", title_justify="left"
    )
    for kind, specs in (("in", manifest.inputs), ("out", manifest.outputs)):
        for spec in specs:
            quant = ""
            if spec.quantization:
                quant = (
                    f"scale {spec.quantization.get('scale')} "
                    f"zero {spec.quantization.get('zero_point')}"
                )
            shape = "[" + ", ".join("?" if d is None else str(d) for d in spec.shape) + "]"
            tensors.add_row(
                kind, escape(spec.name), escape(spec.dtype), escape(shape), escape(quant)
            )
    console.print(tensors)
    file_table = Table(
        "file", "size", "sha256", *(["hash"] if check else []), title="files", title_justify="left"
    )
    for row in files:
        cells = [
            str(row["name"]),
            _human(int(str(row["size"]))),
            str(row["sha256"] or "UNLISTED")[:16],
        ]
        if check:
            cells.append("ok" if row.get("hash_ok") else "MISMATCH")
        file_table.add_row(*cells)
    console.print(file_table)
    sig_table = Table("key id", "status", title="signatures", title_justify="left")
    for sig_row in sig_rows:
        sig_table.add_row(sig_row["keyid"], sig_row["status"])
    console.print(sig_table)
    for problem in contents.problems:
        console.print(f"[red]problem:[/] {escape(problem)}")
