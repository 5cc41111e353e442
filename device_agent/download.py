"""Resumable, verified downloads of model bundles over plain HTTP(S), standard library only.

A device fetches bundles over links that drop (cellular, flaky Wi-Fi) from servers it does not
fully trust to be well behaved, so :func:`download`:

* writes to ``DEST.part`` and resumes it with ``Range: bytes=N-`` after a dropped connection,
  accepting the continuation only from a ``206`` whose ``Content-Range`` starts at ``N`` (a
  ``200`` means the server ignored the range: start again from byte 0);
* never accepts more than the expected ``size`` (a server streaming endless data cannot fill
  the disk) and checks ``sha256`` incrementally, re-hashing the partial file on resume, so the
  file is read once more only when a previous run left a partial behind;
* renames into ``dest`` atomically after an ``fsync``, so ``dest`` is either absent, the old
  file, or the complete verified new one; a wrong file is deleted, never left as ``.part`` to
  be resumed from;
* retries connection errors, timeouts, ``5xx``, ``408`` and ``429`` with exponential backoff
  and jitter (so a fleet that lost its uplink together does not return in lockstep).

This checks integrity against the expected digest only; authenticity is the bundle verifier's
job (``edgekit.verify``) once the file is here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from device_agent.errors import AgentError

__all__ = [
    "DEFAULT_CHUNK",
    "DownloadError",
    "DownloadFailed",
    "DownloadMismatch",
    "DownloadTooLarge",
    "ProgressFn",
    "download",
]

logger = logging.getLogger(__name__)

#: Bytes per read and per progress call: large enough that Python overhead is negligible,
#: small enough to keep memory flat on a device.
DEFAULT_CHUNK = 1024 * 1024

#: ``progress(received, total)``: bytes in the file so far (including a resumed prefix).
ProgressFn = Callable[[int, int], None]

_RETRY_STATUS = frozenset({408, 429})
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(AgentError):
    """Base of the downloader's errors."""

    reason = "download"


class DownloadFailed(DownloadError):
    """The file could not be fetched (HTTP error, or the network failed on every attempt)."""

    reason = "download-failed"


class DownloadMismatch(DownloadError):
    """The bytes received are not the expected file (wrong size or SHA-256)."""

    reason = "download-mismatch"


class DownloadTooLarge(DownloadMismatch):
    """The server sent, or announced, more bytes than the expected size."""

    reason = "download-too-large"


class _Retry(Exception):
    """One attempt failed in a way that another attempt may fix."""


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str,
    size: int,
    timeout: float = 30.0,
    retries: int = 5,
    chunk: int = DEFAULT_CHUNK,
    progress: ProgressFn | None = None,
    backoff: float = 1.0,
    max_backoff: float = 60.0,
) -> Path:
    """Fetch ``url`` into ``dest``, verified against ``size`` bytes and ``sha256``; return it.

    ``timeout`` bounds the connection and every read (a stalled server counts as a failed
    attempt). After a failed attempt the next waits ``backoff * 2**k`` seconds (capped at
    ``max_backoff``, with jitter); ``retries`` is the number of further attempts allowed
    *without progress*: an attempt that received bytes resets the count, so a long download
    over a link that drops every few minutes still completes. If ``dest`` already holds the
    verified file, nothing is fetched.

    Raises :class:`DownloadFailed` (HTTP error, retries exhausted, disk error),
    :class:`DownloadTooLarge` (more than ``size`` bytes) or :class:`DownloadMismatch` (wrong
    length or digest); the partial file is deleted on a mismatch and kept for resuming after a
    network failure.
    """
    expected = sha256.strip().lower()
    if not _SHA256.match(expected):
        raise ValueError(f"sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative integer, got {size!r}")
    if not url.lower().startswith(("http://", "https://")):
        raise ValueError(f"only http:// and https:// URLs can be downloaded, got {url!r}")
    if timeout <= 0 or chunk < 1 or retries < 0 or backoff < 0:
        raise ValueError("need timeout > 0, chunk >= 1, retries >= 0 and backoff >= 0")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if _already_there(dest, size, expected):
        logger.info("%s is already downloaded and verified", dest)
        return dest
    part = dest.with_name(dest.name + ".part")
    # One descriptor for the whole download, locked: two downloads into the same .part would
    # interleave their bytes and both fail verification.
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadFailed(f"another download into {part} is in progress") from None
        fetch = _Fetch(url, handle, size=size, timeout=timeout, chunk=chunk, progress=progress)
        try:
            fetch.resume()
            fetch.run(retries=retries, backoff=backoff, max_backoff=max_backoff)
            fetch.verify(expected)
            handle.flush()
            os.fsync(handle.fileno())
        except DownloadMismatch:
            part.unlink(missing_ok=True)
            raise
        except OSError as exc:
            raise DownloadFailed(f"cannot write {part}: {exc}") from exc
    os.replace(part, dest)
    _fsync_dir(dest.parent)
    logger.info("downloaded %s (%d bytes) to %s", url, size, dest)
    return dest


class _Fetch:
    """The state of one download: the open partial file and the hash of what it holds."""

    def __init__(
        self,
        url: str,
        handle: BinaryIO,
        *,
        size: int,
        timeout: float,
        chunk: int,
        progress: ProgressFn | None,
    ) -> None:
        self.url = url
        self.handle = handle
        self.size = size
        self.timeout = timeout
        self.chunk = chunk
        self.progress = progress
        self.hasher = hashlib.sha256()
        self.offset = 0

    def resume(self) -> None:
        """Hash the partial file a previous run left, to continue after its last byte."""
        self.handle.seek(0, os.SEEK_END)
        existing = self.handle.tell()
        if existing > self.size:
            logger.warning(
                "discarding a %d-byte partial file for a %d-byte download", existing, self.size
            )
            self.restart()
            return
        self.handle.seek(0)
        while block := self.handle.read(self.chunk):
            self.hasher.update(block)
        self.offset = existing
        if existing:
            logger.info("resuming %s at byte %d of %d", self.url, existing, self.size)

    def restart(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.hasher = hashlib.sha256()
        self.offset = 0

    def run(self, *, retries: int, backoff: float, max_backoff: float) -> None:
        failures = 0
        while self.offset < self.size:
            before = self.offset
            try:
                self.attempt()
                if self.offset < self.size:
                    raise _Retry(f"the connection closed after byte {self.offset} of {self.size}")
            except _Retry as exc:
                failures = 0 if self.offset > before else failures + 1
                if failures > retries:
                    raise DownloadFailed(
                        f"download of {self.url} failed after {retries + 1} attempt(s) without "
                        f"progress: {exc}"
                    ) from None
                delay = min(backoff * 2 ** max(failures - 1, 0), max_backoff)
                delay *= random.uniform(0.5, 1.0)
                logger.warning(
                    "download of %s: %s; retrying in %.1f s (%d of %d bytes so far)",
                    self.url,
                    exc,
                    delay,
                    self.offset,
                    self.size,
                )
                time.sleep(delay)

    def attempt(self) -> None:
        """One request: continue from ``self.offset`` (or from 0 if the server insists)."""
        headers = {"Accept-Encoding": "identity", "User-Agent": "edgekit-agent"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        request = urllib.request.Request(self.url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and self.offset:
                # The server has no byte at our offset: its file differs from our partial one.
                self.restart()
                raise _Retry("the server refused the range (416); starting over") from None
            if exc.code >= 500 or exc.code in _RETRY_STATUS:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
            raise DownloadFailed(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
            raise _Retry(_describe(exc)) from None
        with response:
            self._accept(response)
            self._copy(response)

    def _accept(self, response: Any) -> None:
        """Check status and headers before reading: where the body starts, that it fits."""
        status = response.status
        if self.offset and status == 200:
            logger.warning("%s ignored the range request; starting over from byte 0", self.url)
            self.restart()
        elif self.offset and status == 206:
            self._check_content_range(response.headers.get("Content-Range"))
        elif status != 200:
            raise DownloadFailed(f"{self.url}: unexpected HTTP {status} {response.reason}")
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            raise DownloadFailed(f"{self.url}: the server sent a {encoding!r}-encoded body")
        length = response.headers.get("Content-Length")
        if length is not None and length.strip().isdigit():
            announced = self.offset + int(length)
            if announced > self.size:
                raise DownloadTooLarge(
                    f"{self.url}: the server announces {announced} bytes, expected {self.size}"
                )
            if status == 200 and announced < self.size:
                raise DownloadMismatch(
                    f"{self.url}: the server announces {announced} bytes, expected {self.size}"
                )

    def _check_content_range(self, value: str | None) -> None:
        match = _CONTENT_RANGE.match(value or "")
        if match is None:
            self.restart()
            raise _Retry(f"a 206 response with an invalid Content-Range {value!r}; starting over")
        first, last, total = match.groups()
        if total != "*" and int(total) != self.size:
            cls = DownloadTooLarge if int(total) > self.size else DownloadMismatch
            raise cls(f"{self.url}: the server's file has {total} bytes, expected {self.size}")
        if int(first) != self.offset or int(last) >= self.size:
            self.restart()
            raise _Retry(
                f"the server sent bytes {first}-{last} when asked for {self.offset}-; starting over"
            )

    def _copy(self, response: Any) -> None:
        self.handle.seek(self.offset)
        self.handle.truncate()
        while True:
            # One byte beyond what is still expected: the way to notice an over-long body
            # without trusting Content-Length (it may be absent). read1, not read: read waits
            # for the whole amount, and a timeout then loses the bytes that did arrive.
            want = min(self.chunk, self.size - self.offset + 1)
            try:
                block = response.read1(want)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(_describe(exc)) from None
            if not block:
                return
            if self.offset + len(block) > self.size:
                raise DownloadTooLarge(
                    f"{self.url}: the server sent more than the expected {self.size} bytes"
                )
            self.handle.write(block)
            self.hasher.update(block)
            self.offset += len(block)
            if self.progress is not None:
                self.progress(self.offset, self.size)

    def verify(self, expected: str) -> None:
        if self.offset != self.size:  # run() loops until it is; kept as the last word
            raise DownloadMismatch(
                f"{self.url}: received {self.offset} bytes, expected {self.size}"
            )
        digest = self.hasher.hexdigest()
        if digest != expected:
            raise DownloadMismatch(f"{self.url}: SHA-256 is {digest}, expected {expected}")


def _already_there(dest: Path, size: int, expected: str) -> bool:
    try:
        if dest.stat().st_size != size:
            return False
        hasher = hashlib.sha256()
        with dest.open("rb") as handle:
            while block := handle.read(DEFAULT_CHUNK):
                hasher.update(block)
    except FileNotFoundError:
        return False
    return hasher.hexdigest() == expected


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable: without it a power cut can bring the old directory entry back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
            os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)  # URLError wraps the socket error
    if isinstance(reason, BaseException):
        exc = reason
    if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
        return "timed out"
    return " ".join(f"{type(exc).__name__}: {exc}".split())
