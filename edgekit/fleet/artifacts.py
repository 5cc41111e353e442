"""The content-addressed bundle store the controller serves to devices.

A bundle is stored once under the sha256 of its bytes (``DIR/blobs/<sha256>.ekb``); that hash
is what ``desired.sha256`` tells the device to expect, so the address and the integrity check
are the same value and a stored file can never silently change under a published URL. The
manifest is read with :func:`edgekit.bundle.read_bundle` (without trusting it: devices verify
signatures) only to learn the bundle's name and version and to refuse uploads that are not
bundles at all.

Devices download with ``GET /artifacts/<sha256>/<name>-<version>.ekb``; the HTTP side (Range
requests for resumed downloads) is Starlette's ``FileResponse``, wired in ``edgekit.fleet.api``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import sqlalchemy as sa

from edgekit.bundle import read_bundle
from edgekit.errors import EdgekitError
from edgekit.fleet.db import Artifact, AuditEntry, Database
from edgekit.fleet.errors import ArtifactError, NotFound

__all__ = ["MAX_BUNDLE_BYTES", "ArtifactStore", "artifact_dict"]

#: Far above any model a small device runs, low enough that a stray upload cannot fill a disk
#: unnoticed; the server refuses larger bodies while streaming, before writing them all.
MAX_BUNDLE_BYTES = 4 * 1024**3
_SHA = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


def artifact_dict(artifact: Artifact, *, url: str) -> dict[str, Any]:
    return {
        "sha256": artifact.sha256,
        "name": artifact.name,
        "version": artifact.version,
        "display_version": artifact.display_version,
        "size": artifact.size,
        "created_at": artifact.created_at,
        "uploaded_by": artifact.uploaded_by,
        "url": url,
    }


class ArtifactStore:
    """Bundles on disk under ``root`` plus their rows in the database."""

    def __init__(self, root: str | os.PathLike[str], db: Database, *, public_url: str) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.incoming = self.root / "incoming"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.db = db
        self.public_url = public_url.rstrip("/")

    def url_for(self, sha256: str, name: str, version: int) -> str:
        """Where devices download the bundle (``desired.url``)."""
        return f"{self.public_url}/artifacts/{sha256}/{name}-{version}.ekb"

    def path_for(self, sha256: str) -> Path:
        if not _SHA.fullmatch(sha256):
            raise NotFound(f"{sha256!r} is not a sha256")
        return self.blobs / f"{sha256}.ekb"

    def add_stream(
        self, chunks: Iterable[bytes], *, uploaded_by: str, max_bytes: int = MAX_BUNDLE_BYTES
    ) -> dict[str, Any]:
        """Store a bundle arriving in chunks; idempotent (the same bytes give the same row)."""
        handle, tmp_name = tempfile.mkstemp(dir=self.incoming, suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise ArtifactError(f"bundle is larger than {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise ArtifactError("the upload is empty")
            return self._commit(tmp, digest.hexdigest(), size, uploaded_by=uploaded_by)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def add_file(self, path: str | os.PathLike[str], *, uploaded_by: str) -> dict[str, Any]:
        with open(path, "rb") as handle:
            return self.add_stream(_read_chunks(handle), uploaded_by=uploaded_by)

    def import_dir(self, *, uploaded_by: str = "import") -> list[dict[str, Any]]:
        """Register the ``*.ekb`` files an operator dropped into the store's directory."""
        added = []
        for path in sorted(self.root.glob("*.ekb")):
            try:
                added.append(self.add_file(path, uploaded_by=uploaded_by))
            except EdgekitError:
                continue  # not a bundle: left alone, the upload API reports such errors
        return added

    def _commit(self, tmp: Path, sha256: str, size: int, *, uploaded_by: str) -> dict[str, Any]:
        try:
            contents = read_bundle(tmp)
        except EdgekitError as exc:
            raise ArtifactError(f"not a bundle: {exc.message}") from None
        manifest = contents.manifest
        if manifest is None:
            raise ArtifactError(f"not a bundle: {contents.manifest_error}")
        final = self.path_for(sha256)
        if not final.exists():
            os.replace(tmp, final)
            _fsync_dir(self.blobs)
        url = self.url_for(sha256, manifest.name, manifest.version)
        with self.db.write() as session:
            row = session.get(Artifact, sha256)
            if row is None:
                row = Artifact(
                    sha256=sha256,
                    name=manifest.name,
                    version=manifest.version,
                    display_version=manifest.display_version,
                    size=size,
                    created_at=time.time(),
                    uploaded_by=uploaded_by,
                )
                session.add(row)
                session.add(
                    AuditEntry(
                        ts=row.created_at,
                        actor=uploaded_by,
                        action="artifact.added",
                        detail={"sha256": sha256, "name": row.name, "version": row.version},
                    )
                )
            return artifact_dict(row, url=url)

    def get(self, sha256: str) -> dict[str, Any]:
        with self.db.read() as session:
            row = session.get(Artifact, sha256)
            if row is None:
                raise NotFound(f"no artifact {sha256}")
            return artifact_dict(row, url=self.url_for(row.sha256, row.name, row.version))

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as session:
            rows = session.scalars(
                sa.select(Artifact).order_by(Artifact.name, Artifact.version.desc())
            )
            return [artifact_dict(r, url=self.url_for(r.sha256, r.name, r.version)) for r in rows]

    def find(self, ref: str) -> dict[str, Any]:
        """An artifact by sha256 (or a unique prefix of 8+ characters) or ``NAME-VERSION``."""
        with self.db.read() as session:
            rows: list[Artifact] = []
            if re.fullmatch(r"[0-9a-f]{8,64}", ref):
                rows = list(
                    session.scalars(sa.select(Artifact).where(Artifact.sha256.startswith(ref)))
                )
            if not rows:
                match = re.fullmatch(r"(.+)-(\d+)", ref)
                if match:
                    rows = list(
                        session.scalars(
                            sa.select(Artifact)
                            .where(
                                Artifact.name == match.group(1),
                                Artifact.version == int(match.group(2)),
                            )
                            .order_by(Artifact.created_at.desc())
                        )
                    )[:1]
            if len(rows) != 1:
                raise NotFound(f"no single artifact matches {ref!r}")
            row = rows[0]
            return artifact_dict(row, url=self.url_for(row.sha256, row.name, row.version))

    def served_path(self, sha256: str) -> Path:
        """The file behind a download URL; :class:`NotFound` unless it is a stored artifact."""
        path = self.path_for(sha256)
        if not path.is_file():
            raise NotFound(f"no artifact {sha256}")
        return path


def _read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(_CHUNK):
        yield chunk


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
