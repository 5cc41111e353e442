"""Building, co-signing and reading bundles on the workstation (the producing side).

A bundle is written in one pass over the model: the manifest's length does not depend on the
hashes it will hold (sha256 hex is fixed-length, sizes are known up front), so the files are
streamed into the archive after a reserved gap, hashed as they are copied, and the manifest and
signatures are written into the gap at the end. The output appears atomically (temp file, fsync,
rename) and is byte-for-byte reproducible from the same inputs and timestamps.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgekit._jsonutil import dumps, loads_strict
from edgekit._version import __version__
from edgekit.archive import BLOCK, Entry, TarReader, TarWriter, padded
from edgekit.errors import BundleError, EdgekitError, HashMismatch, Malformed, MissingFile
from edgekit.fsutil import atomic_write
from edgekit.keys import MANIFEST_PAYLOAD_TYPE, Signature, SigningKey
from edgekit.manifest import (
    MANIFEST_NAME,
    RESERVED_NAMES,
    SIGNATURES_NAME,
    FileEntry,
    Manifest,
    Targets,
    TensorSpec,
    validate_file_name,
)
from edgekit.verify import Limits, read_signatures

__all__ = [
    "BASELINE_NAME",
    "GOLDEN_NAME",
    "REPORT_NAME",
    "BundleContents",
    "add_signatures",
    "build_bundle",
    "read_bundle",
    "signatures_bytes",
]

GOLDEN_NAME = "golden.npz"
BASELINE_NAME = "baseline.json"
REPORT_NAME = "report.json"
DEFAULT_LIFETIME = timedelta(days=365)
_PLACEHOLDER_SHA = "0" * 64


def signatures_bytes(signatures: Sequence[Signature]) -> bytes:
    return dumps({"signatures": [s.to_dict() for s in signatures]})


def _check_json_file(path: Path, what: str) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        loads_strict(data, what=f"{what} {path.name}", max_size=64 * 1024 * 1024)
    except EdgekitError as exc:
        raise BundleError(exc.message) from None


def _check_golden(path: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """A golden set is an ``.npz`` the device can use: ``input:NAME`` for every model input,
    ``output:NAME`` for at least one model output, optional ``atol:NAME`` tolerances.

    Checked here, on the workstation, because a device can only refuse a bad golden set by
    refusing the whole update.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"golden file {path} is not an .npz archive: {exc}") from None
    if not names or not all(n.endswith(".npy") for n in names):
        raise BundleError(f"golden file {path} must hold only .npy arrays")
    keys = [n[: -len(".npy")] for n in names]
    kinds: dict[str, set[str]] = {"input": set(), "output": set(), "atol": set()}
    for key in keys:
        kind, _, tensor = key.partition(":")
        if kind not in kinds or not tensor:
            raise BundleError(
                f"golden file {path.name}: array {key!r} is not input:NAME, output:NAME "
                "or atol:NAME"
            )
        kinds[kind].add(tensor)
    if inputs and kinds["input"] != set(inputs):
        raise BundleError(
            f"golden file {path.name} has inputs {sorted(kinds['input'])}, "
            f"the model takes {sorted(inputs)}"
        )
    unknown = (kinds["output"] | kinds["atol"]) - set(outputs) if outputs else set()
    if unknown or not kinds["output"]:
        raise BundleError(
            f"golden file {path.name} must hold output:NAME arrays for the model's outputs "
            f"{sorted(outputs)}; found {sorted(kinds['output'])}"
        )


@dataclass
class _Source:
    name: str
    path: Path
    handle: io.BufferedReader
    size: int


def _open_sources(files: Mapping[str, Path]) -> list[_Source]:
    sources: list[_Source] = []
    try:
        for name, path in files.items():
            try:
                handle = open(path, "rb")  # noqa: SIM115 - closed by the caller
            except OSError as exc:
                raise BundleError(f"cannot read {path}: {exc.strerror}") from None
            # Size from the open handle, so it describes the very file that is copied.
            size = os.fstat(handle.fileno()).st_size
            sources.append(_Source(name, Path(path), handle, size))
            if not os.path.isfile(path):
                raise BundleError(f"{path} is not a regular file")
    except BaseException:
        for source in sources:
            source.handle.close()
        raise
    return sources


def build_bundle(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    name: str,
    version: int,
    keys: Sequence[SigningKey],
    runtime: str | None = None,
    display_version: str | None = None,
    golden: str | os.PathLike[str] | None = None,
    baseline: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    extra_files: Sequence[str | os.PathLike[str]] = (),
    created: datetime | None = None,
    expires: datetime | None = None,
    targets: Targets | None = None,
    inputs: Sequence[TensorSpec] | None = None,
    outputs: Sequence[TensorSpec] | None = None,
    tools: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Manifest:
    """Package ``model`` and its companions into a signed bundle at ``output``.

    The runtime, inputs, outputs and opsets are read from the model file unless given.
    """
    from edgekit.modelinfo import detect_runtime, read_model_info  # devices never build bundles

    if not keys:
        raise BundleError("at least one signing key is needed")
    model_path = Path(model)
    files: dict[str, Path] = {}
    try:
        files[validate_file_name(model_path.name)] = model_path
    except Malformed:
        raise BundleError(
            f"model file name {model_path.name!r} must be a flat name of [A-Za-z0-9._+-]"
        ) from None
    # The golden set is checked against the model's inputs and outputs further down.
    for file_name, path, json_kind in (
        (GOLDEN_NAME, golden, None),
        (BASELINE_NAME, baseline, "baseline"),
        (REPORT_NAME, report, "report"),
    ):
        if path is not None:
            if json_kind is not None:
                _check_json_file(Path(path), json_kind)
            files[file_name] = Path(path)
    for path in map(Path, extra_files):
        try:
            validate_file_name(path.name)
        except Malformed as exc:
            raise BundleError(exc.message) from None
        if path.name in files or path.name in RESERVED_NAMES:
            raise BundleError(f"two bundle files would be named {path.name}")
        files[path.name] = path
    if len(files) != len({n.lower() for n in files}):
        raise BundleError("bundle file names differ only in case; that breaks on some devices")

    try:
        detected: str | None = detect_runtime(model_path)
    except EdgekitError:
        detected = None  # e.g. an ONNX file without the .onnx suffix: the parser decides
    if runtime is not None and detected is not None and detected != runtime:
        raise BundleError(f"{model_path.name} is a {detected} model, not {runtime}")
    try:
        info = read_model_info(model_path, runtime or detected)
    except EdgekitError as exc:
        raise BundleError(exc.message) from None
    input_names = [t.name for t in inputs] if inputs is not None else [t.name for t in info.inputs]
    output_names = (
        [t.name for t in outputs] if outputs is not None else [t.name for t in info.outputs]
    )
    if golden is not None:
        _check_golden(Path(golden), input_names, output_names)
    created = (created or datetime.now(timezone.utc)).replace(microsecond=0)
    expires = expires or created + DEFAULT_LIFETIME
    base_targets = targets or Targets()
    if info.opsets and not base_targets.opsets:
        base_targets = replace(base_targets, opsets=dict(info.opsets))
    all_tools = {"edgekit": __version__, "python": platform.python_version(), **(tools or {})}

    sources = _open_sources(files)
    try:
        draft = Manifest(
            name=name,
            version=version,
            display_version=display_version,
            created=created,
            expires=expires,
            runtime=info.runtime,
            model=model_path.name,
            inputs=tuple(inputs)
            if inputs is not None
            else tuple(TensorSpec.from_dict(t.to_dict(), where="input") for t in info.inputs),
            outputs=tuple(outputs)
            if outputs is not None
            else tuple(TensorSpec.from_dict(t.to_dict(), where="output") for t in info.outputs),
            targets=base_targets,
            files={s.name: FileEntry(_PLACEHOLDER_SHA, s.size) for s in sources},
            tools=all_tools,
            extra=dict(extra or {}),
        )
        try:
            # Round-trip through the validating parser: what we sign must be what a device accepts.
            Manifest.from_bytes(draft.to_bytes())
        except Malformed as exc:
            raise BundleError(exc.message) from None
        manifest = _write(Path(output), draft, sources, keys)
    finally:
        for source in sources:
            source.handle.close()
    return manifest


def _write(
    output: Path, draft: Manifest, sources: list[_Source], keys: Sequence[SigningKey]
) -> Manifest:
    draft_bytes = draft.to_bytes()
    draft_sigs = signatures_bytes([Signature(k.keyid, "0" * 128) for k in keys])
    data_start = 2 * BLOCK + padded(len(draft_bytes)) + padded(len(draft_sigs))
    mtime = int(draft.created.timestamp())
    digests: dict[str, str] = {}
    if not output.parent.is_dir():
        raise BundleError(f"output directory {output.parent} does not exist")
    with atomic_write(output) as out:
        out.seek(data_start)
        writer = TarWriter(out, mtime=mtime)
        for source in sources:
            try:
                digests[source.name] = writer.add_stream(source.name, source.size, source.handle)
            except OSError as exc:
                raise BundleError(f"{source.path}: {exc}") from None
        writer.close()
        manifest = replace(
            draft,
            files={n: replace(e, sha256=digests[n]) for n, e in draft.files.items()},
        )
        manifest_bytes = manifest.to_bytes()
        sigs = signatures_bytes([k.sign(MANIFEST_PAYLOAD_TYPE, manifest_bytes) for k in keys])
        if len(manifest_bytes) != len(draft_bytes) or len(sigs) != len(draft_sigs):
            raise AssertionError("manifest layout changed size while hashing")  # a bug, not input
        out.seek(0)
        head = TarWriter(out, mtime=mtime)
        head.add_bytes(MANIFEST_NAME, manifest_bytes)
        head.add_bytes(SIGNATURES_NAME, sigs)
        if out.tell() != data_start:
            raise AssertionError("bundle header region overlaps the data")
    return manifest


@dataclass
class BundleContents:
    """What a bundle holds, read without trusting it (for ``inspect`` and co-signing)."""

    manifest_bytes: bytes
    manifest: Manifest | None
    manifest_error: str | None
    signatures: tuple[Signature, ...]
    entries: list[Entry] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    data_offset: int = 0  # where the first entry after signatures.json starts

    @property
    def problems(self) -> list[str]:
        """Integrity problems found (hashes are checked only when read with check_hashes)."""
        found: list[str] = []
        if self.manifest is None:
            return [self.manifest_error or "manifest unreadable"]
        names = [e.name for e in self.entries]
        for name, declared in self.manifest.files.items():
            if name not in names:
                found.append(f"missing {name}")
            elif self.hashes and self.hashes.get(name) != declared.sha256:
                found.append(f"hash mismatch in {name}")
        found.extend(f"unlisted {n}" for n in names if n not in self.manifest.files)
        return found


def read_bundle(path: str | os.PathLike[str], *, check_hashes: bool = False) -> BundleContents:
    """Read a bundle's metadata and entry list; optionally hash every file."""
    limits = Limits()
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise MissingFile(f"cannot open bundle {os.fspath(path)}: {exc.strerror}") from None
    with handle:
        reader = TarReader(handle)
        first = reader.next_entry()
        if first is None or first.name != MANIFEST_NAME:
            raise MissingFile(f"{os.fspath(path)} does not start with {MANIFEST_NAME}")
        manifest_bytes = reader.read_data(limits.max_manifest)
        second = reader.next_entry()
        if second is None or second.name != SIGNATURES_NAME:
            raise MissingFile(f"{os.fspath(path)} has no {SIGNATURES_NAME} after the manifest")
        signatures = read_signatures(reader.read_data(limits.max_signatures), limits=limits)
        manifest: Manifest | None = None
        error: str | None = None
        try:
            manifest = Manifest.from_bytes(manifest_bytes)
        except EdgekitError as exc:
            error = exc.message
        contents = BundleContents(manifest_bytes, manifest, error, signatures)
        contents.data_offset = second.offset + padded(second.size)
        while (entry := reader.next_entry()) is not None:
            contents.entries.append(entry)
            if check_hashes:
                digest = hashlib.sha256()
                for chunk in reader.iter_data():
                    digest.update(chunk)
                contents.hashes[entry.name] = digest.hexdigest()
            else:
                reader.skip_data()
    return contents


def add_signatures(path: str | os.PathLike[str], keys: Sequence[SigningKey]) -> tuple[str, ...]:
    """Co-sign the bundle at ``path`` in place (atomically); return the key ids added.

    The co-signer vouches for the files too, so every hash is checked before signing.
    """
    contents = read_bundle(path, check_hashes=True)
    if contents.manifest is None:
        raise BundleError(f"cannot co-sign: {contents.manifest_error}")
    if contents.problems:
        raise HashMismatch(f"cannot co-sign a damaged bundle: {'; '.join(contents.problems)}")
    have = {s.keyid for s in contents.signatures}
    new = [k for k in keys if k.keyid not in have]
    if not new:
        raise BundleError("every given key has already signed this bundle")
    signatures = (
        *contents.signatures,
        *(k.sign(MANIFEST_PAYLOAD_TYPE, contents.manifest_bytes) for k in new),
    )
    target = Path(path)
    mtime = int(contents.manifest.created.timestamp())
    with open(target, "rb") as source, atomic_write(target, mode=0o644) as out:
        head = TarWriter(out, mtime=mtime)
        head.add_bytes(MANIFEST_NAME, contents.manifest_bytes)
        head.add_bytes(SIGNATURES_NAME, signatures_bytes(signatures))
        source.seek(contents.data_offset)
        remaining = os.fstat(source.fileno()).st_size - contents.data_offset
        out.flush()
        try:
            while remaining > 0:
                # Kernel-side copy: co-signing a multi-GB bundle does not pass through Python.
                copied = os.copy_file_range(source.fileno(), out.fileno(), remaining)
                if copied == 0:
                    break
                remaining -= copied
        except OSError:  # filesystems without copy_file_range: copy through a buffer
            source.seek(os.fstat(source.fileno()).st_size - remaining)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(source, out, 1024 * 1024)
        out.seek(0, os.SEEK_END)
    return tuple(k.keyid for k in new)
