"""The bundle verifier: the one place that decides whether a bundle is accepted.

Reading is a single forward pass over the archive, in constant memory:

1. ``manifest.json`` must be the first entry and ``signatures.json`` the second; both are small and
   size-limited. The signatures are checked against the trust policy over the exact manifest
   bytes *before* anything else in the bundle is looked at, so untrusted bytes never reach the
   JSON parser of the manifest or the disk.
2. The signed manifest is parsed and judged: format, expiry, anti-rollback version, device
   compatibility.
3. Every further entry must be a flat regular file listed in the manifest, seen once, no longer
   than declared; it is hashed while it streams (and, when installing, written to a private
   staging directory in the same pass). Files the manifest lists but the archive lacks are missing.
4. Only when all of that holds is the staging directory renamed into place. Installed bytes are
   the bytes that were hashed: nothing is read twice, so nothing can be swapped in between.

Any failure raises a :class:`~edgekit.errors.VerificationError` subclass and leaves the
destination as it was. This module imports only the standard library and ``cryptography``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from edgekit._jsonutil import loads_strict
from edgekit.archive import Entry, TarReader
from edgekit.errors import (
    Expired,
    ExtraFile,
    HashMismatch,
    Incompatible,
    Malformed,
    MissingFile,
    Rollback,
    TooLarge,
    VerificationError,
)
from edgekit.fsutil import fsync_dir
from edgekit.keys import MANIFEST_PAYLOAD_TYPE, Signature
from edgekit.manifest import MANIFEST_NAME, SIGNATURES_NAME, Manifest, normalize_arch
from edgekit.trust import TrustPolicy

__all__ = [
    "DeviceProfile",
    "Limits",
    "VerifiedBundle",
    "check_compatible",
    "read_signatures",
    "verify_bundle",
]


@dataclass(frozen=True)
class Limits:
    """Upper bounds that keep a hostile bundle from exhausting memory or disk ("endless data")."""

    max_manifest: int = 1024 * 1024
    max_signatures: int = 256 * 1024
    max_signature_count: int = 64
    max_file_size: int = 64 * 1024**3
    max_files: int = 64


@dataclass(frozen=True)
class DeviceProfile:
    """What the installing device offers; ``None`` fields are not checked."""

    architecture: str | None = None
    agent_version: str | None = None
    runtimes: Mapping[str, str] | None = None  # runtime name -> library version
    opsets: Mapping[str, int] | None = None  # ONNX domain -> highest opset the runtime runs

    @classmethod
    def this_machine(cls, **kwargs: object) -> DeviceProfile:
        return cls(architecture=platform.machine(), **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class VerifiedBundle:
    """The outcome of a successful verification."""

    manifest: Manifest
    manifest_bytes: bytes
    signed_by: tuple[str, ...]
    directory: Path | None = None  # where the files were installed, when asked to install
    sizes: Mapping[str, int] = field(default_factory=dict)


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = ""
        for char in piece:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits) if digits else 0)
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def check_compatible(manifest: Manifest, device: DeviceProfile) -> None:
    """Raise :class:`Incompatible` if ``device`` cannot run ``manifest``'s model."""
    targets = manifest.targets
    if device.architecture and targets.architectures:
        arch = normalize_arch(device.architecture)
        if arch not in targets.architectures:
            raise Incompatible(
                f"bundle targets {', '.join(targets.architectures)}, this device is {arch}"
            )
    too_old = (
        device.agent_version is not None
        and targets.min_agent_version is not None
        and _version_tuple(device.agent_version) < _version_tuple(targets.min_agent_version)
    )
    if too_old:
        raise Incompatible(
            f"bundle needs agent {targets.min_agent_version} or newer, "
            f"this device runs {device.agent_version}"
        )
    if device.runtimes is not None:
        have = device.runtimes.get(manifest.runtime)
        if have is None:
            offered = ", ".join(sorted(device.runtimes)) or "none"
            raise Incompatible(
                f"bundle needs runtime {manifest.runtime}, this device has {offered}"
            )
        if targets.runtime_version and _version_tuple(have) < _version_tuple(
            targets.runtime_version
        ):
            raise Incompatible(
                f"bundle needs {manifest.runtime} {targets.runtime_version} or newer, "
                f"this device has {have}"
            )
    if device.opsets is not None:
        for domain, needed in targets.opsets.items():
            offered_opset = device.opsets.get(domain)
            if offered_opset is not None and offered_opset < needed:
                raise Incompatible(
                    f"bundle needs opset {needed} of {domain}, "
                    f"this runtime supports {offered_opset}"
                )


def read_signatures(data: bytes, *, limits: Limits) -> tuple[Signature, ...]:
    doc = loads_strict(data, what=SIGNATURES_NAME, max_size=limits.max_signatures)
    raw = doc.get("signatures")
    if not isinstance(raw, list):
        raise Malformed(f"{SIGNATURES_NAME} must hold a 'signatures' list")
    if len(raw) > limits.max_signature_count:
        raise TooLarge(
            f"{SIGNATURES_NAME} has {len(raw)} signatures, the limit is "
            f"{limits.max_signature_count}"
        )
    return tuple(Signature.from_dict(item) for item in raw)


def _expect_small(reader: TarReader, name: str, limit: int, position: str) -> bytes:
    entry = reader.next_entry()
    if entry is None or entry.name != name:
        found = "the end of the archive" if entry is None else repr(entry.name)
        raise MissingFile(f"{name} must be the {position} entry of a bundle; found {found}")
    if entry.size > limit:
        raise TooLarge(f"{name} is {entry.size} bytes, the limit is {limit}")
    return reader.read_data(limit)


class _Staging:
    """A private directory beside the destination; renamed into place only on success."""

    def __init__(self, destination: Path) -> None:
        if destination.exists() or destination.is_symlink():
            raise FileExistsError(f"install destination {destination} already exists")
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.destination = destination
        self.path = Path(
            tempfile.mkdtemp(
                prefix=f".{destination.name}.", suffix=".partial", dir=destination.parent
            )
        )

    def create(self, name: str) -> BinaryIO:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path / name, flags, 0o644)
        return os.fdopen(fd, "wb")

    def write_small(self, name: str, data: bytes) -> None:
        with self.create(name) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def commit(self) -> None:
        fsync_dir(self.path)
        os.rename(self.path, self.destination)
        fsync_dir(self.destination.parent)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def verify_bundle(
    path: str | os.PathLike[str],
    trust: TrustPolicy,
    *,
    installed_version: int | None = None,
    device: DeviceProfile | None = None,
    now: datetime | None = None,
    install_to: str | os.PathLike[str] | None = None,
    limits: Limits | None = None,
) -> VerifiedBundle:
    """Verify the bundle at ``path``; with ``install_to``, also install its files there.

    ``install_to`` must not exist yet; on success it is a directory holding ``manifest.json``,
    ``signatures.json`` and every listed file, fsynced. On failure it still does not exist.
    """
    limits = limits or Limits()
    now = now or datetime.now(timezone.utc)
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in finally
    except OSError as exc:
        raise MissingFile(f"cannot open bundle {os.fspath(path)}: {exc.strerror}") from None
    staging: _Staging | None = None
    try:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise Malformed(f"{os.fspath(path)} is not a regular file")
        reader = TarReader(handle)
        manifest_bytes = _expect_small(reader, MANIFEST_NAME, limits.max_manifest, "first")
        signatures_bytes = _expect_small(reader, SIGNATURES_NAME, limits.max_signatures, "second")
        signatures = read_signatures(signatures_bytes, limits=limits)
        signed_by = trust.check(
            manifest_bytes, signatures, payload_type=MANIFEST_PAYLOAD_TYPE, what="bundle manifest"
        )
        manifest = Manifest.from_bytes(manifest_bytes, max_size=limits.max_manifest)
        _judge(manifest, installed_version=installed_version, device=device, now=now, limits=limits)
        if install_to is not None:
            staging = _Staging(Path(install_to))
            staging.write_small(MANIFEST_NAME, manifest_bytes)
            staging.write_small(SIGNATURES_NAME, signatures_bytes)
        sizes = _check_files(reader, manifest, staging)
        if staging is not None:
            staging.commit()
            directory: Path | None = staging.destination
            staging = None
        else:
            directory = None
        return VerifiedBundle(
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            signed_by=signed_by,
            directory=directory,
            sizes=sizes,
        )
    except VerificationError:
        raise
    except RecursionError:
        raise Malformed("bundle metadata is nested too deeply") from None
    finally:
        handle.close()
        if staging is not None:
            staging.discard()


def _judge(
    manifest: Manifest,
    *,
    installed_version: int | None,
    device: DeviceProfile | None,
    now: datetime,
    limits: Limits,
) -> None:
    if now >= manifest.expires:
        raise Expired(
            f"bundle {manifest.name} v{manifest.version} expired at {manifest.expires.isoformat()}"
        )
    if installed_version is not None and manifest.version <= installed_version:
        relation = "the same as" if manifest.version == installed_version else "older than"
        raise Rollback(
            f"bundle version {manifest.version} is {relation} the installed version "
            f"{installed_version}"
        )
    if device is not None:
        check_compatible(manifest, device)
    if len(manifest.files) > limits.max_files:
        raise TooLarge(f"bundle lists {len(manifest.files)} files, the limit is {limits.max_files}")
    for name, entry in manifest.files.items():
        if entry.size > limits.max_file_size:
            raise TooLarge(
                f"{name} is declared as {entry.size} bytes, the limit is {limits.max_file_size}"
            )


def _check_files(reader: TarReader, manifest: Manifest, staging: _Staging | None) -> dict[str, int]:
    seen: dict[str, int] = {}
    while (entry := reader.next_entry()) is not None:
        declared = manifest.files.get(entry.name)
        if entry.name in seen or entry.name in (MANIFEST_NAME, SIGNATURES_NAME):
            raise Malformed(f"archive holds {entry.name} more than once")
        if declared is None:
            raise ExtraFile(f"archive holds {entry.name}, which the manifest does not list")
        if entry.size > declared.size:
            raise TooLarge(
                f"{entry.name} is {entry.size} bytes in the archive, the manifest declares "
                f"{declared.size}"
            )
        if entry.size < declared.size:
            raise HashMismatch(
                f"{entry.name} is {entry.size} bytes, the manifest declares {declared.size}"
            )
        digest = _stream(reader, entry, staging)
        if digest != declared.sha256:
            raise HashMismatch(
                f"{entry.name} sha256 is {digest[:16]}…, the manifest says {declared.sha256[:16]}…"
            )
        seen[entry.name] = entry.size
    missing = sorted(set(manifest.files) - set(seen))
    if missing:
        raise MissingFile(f"bundle lacks {', '.join(missing)}, listed in the manifest")
    return seen


def _stream(reader: TarReader, entry: Entry, staging: _Staging | None) -> str:
    digest = hashlib.sha256()
    if staging is None:
        for chunk in reader.iter_data():
            digest.update(chunk)
        return digest.hexdigest()
    with staging.create(entry.name) as out:
        for chunk in reader.iter_data():
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()
