"""A deliberately small, strict POSIX ustar reader and writer for bundles.

Why not :mod:`tarfile`: a verifier must refuse anything surprising *before* it acts on it, in
constant memory. ``tarfile`` follows pax and GNU extension headers (whose payloads it reads into
memory), accepts many dialects and leaves type checks to the caller. A bundle needs none of that:
it holds a handful of flat, regular files. This reader accepts exactly that subset and maps every
deviation to a typed error:

* links, directories, devices and FIFOs → :class:`UnsafePath`;
* names with ``/``, ``..``, a leading dot or odd characters → :class:`UnsafePath`;
* bad header checksums, extension headers, truncation, data after the end marker →
  :class:`Malformed`.

Sizes use octal, or the base-256 form for files of 8 GiB and more (as GNU tar writes them).
Any ustar tool (``tar --format=ustar``) can list and unpack a bundle.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from edgekit.errors import Malformed, UnsafePath
from edgekit.manifest import validate_file_name

__all__ = ["BLOCK", "Entry", "Readable", "TarReader", "TarWriter", "header_size", "padded"]

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
#: Largest size the 11-digit octal field holds; larger sizes use base-256.
_OCTAL_MAX = 8**11 - 1
#: Read and hash in chunks this large: big enough that per-call overhead vanishes next to
#: sha256, small enough to stay far from the verifier's memory budget.
CHUNK = 1024 * 1024

_TYPE_NAMES = {
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a character device",
    b"4": "a block device",
    b"5": "a directory",
    b"6": "a FIFO",
    b"7": "a contiguous file",
}


def padded(size: int) -> int:
    """Bytes ``size`` bytes of data take in the archive, with padding to a block."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def header_size() -> int:
    return BLOCK


def _encode_size(size: int) -> bytes:
    if size <= _OCTAL_MAX:
        return b"%011o\0" % size
    # base-256: high bit of the first byte set, big-endian value in the rest of the 12 bytes.
    return bytes([0x80]) + size.to_bytes(11, "big")


def _decode_size(field: bytes) -> int:
    if field[0] & 0x80:
        if field[0] != 0x80:
            raise Malformed("negative or oversized base-256 size in tar header")
        return int.from_bytes(field[1:], "big")
    return _decode_octal(field, "size")


def _decode_octal(field: bytes, what: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise Malformed(f"tar header {what} field is not octal") from None


def _build_header(name: str, size: int, mtime: int) -> bytes:
    encoded = name.encode("ascii")
    header = bytearray(BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = _encode_size(size)
    header[136:148] = b"%011o\0" % mtime
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    checksum = sum(header)
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


class Readable(Protocol):
    """What the reader needs from its input: ``open(path, "rb", buffering=0)`` provides it."""

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class TarWriter:
    """Write regular files sequentially; ``close`` adds the end-of-archive marker."""

    def __init__(self, fileobj: BinaryIO, *, mtime: int = 0) -> None:
        self._out = fileobj
        self._mtime = mtime
        self._names: set[str] = set()

    def _start(self, name: str, size: int) -> None:
        validate_file_name(name)
        if name in self._names:
            raise ValueError(f"duplicate archive entry {name}")
        self._names.add(name)
        self._out.write(_build_header(name, size, self._mtime))

    def _pad(self, size: int) -> None:
        self._out.write(bytes(padded(size) - size))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._start(name, len(data))
        self._out.write(data)
        self._pad(len(data))

    def add_stream(self, name: str, size: int, source: Readable) -> str:
        """Copy exactly ``size`` bytes from ``source``; return their sha256 (one pass)."""
        self._start(name, size)
        digest = hashlib.sha256()
        remaining = size
        buffers = (bytearray(CHUNK), bytearray(CHUNK))
        # Hash one chunk while the previous one is written: both release the GIL, so signing
        # costs about one sha256 pass rather than a hash pass plus a copy pass.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[int] | None = None
            index = 0
            while remaining:
                buf = buffers[index]
                view = memoryview(buf)[: min(CHUNK, remaining)]
                got = source.readinto(view)
                if not got:
                    break
                chunk = view[:got]
                if pending is not None:
                    pending.result()
                pending = pool.submit(self._out.write, chunk)
                digest.update(chunk)
                remaining -= got
                index ^= 1
            if pending is not None:
                pending.result()
        if remaining:
            raise OSError(f"{name} ended {remaining} bytes early while being archived")
        if source.read(1):
            raise OSError(f"{name} grew while being archived")
        self._pad(size)
        return digest.hexdigest()

    def close(self) -> None:
        self._out.write(_ZERO_BLOCK * 2)


@dataclass(frozen=True)
class Entry:
    """One archive member: a flat, regular file of ``size`` bytes at ``offset``."""

    name: str
    size: int
    offset: int  # of the data, from the start of the archive


class TarReader:
    """Iterate the entries of a strict bundle archive from a forward-only stream.

    After ``next_entry`` returns an entry, its data must be consumed with ``read_data`` /
    ``iter_data`` (or ``skip_data``) before asking for the next entry.
    """

    def __init__(self, fileobj: Readable) -> None:
        self._in = fileobj
        self._pos = 0
        self._remaining = 0  # data bytes of the current entry not yet read
        self._padding = 0
        self._done = False

    def _read_exact(self, size: int, what: str) -> bytes:
        data = self._in.read(size)
        if len(data) != size:
            raise Malformed(f"truncated archive: {what} ends early")
        self._pos += size
        return data

    def next_entry(self) -> Entry | None:
        """The next entry, or None at the end-of-archive marker."""
        if self._remaining:
            raise RuntimeError("previous entry's data was not consumed")
        if self._done:
            return None
        if self._padding:
            if self._read_exact(self._padding, "padding").strip(b"\0"):
                raise Malformed("non-zero padding after an entry")
            self._padding = 0
        header = self._in.read(BLOCK)
        self._pos += len(header)
        if not header:
            raise Malformed("truncated archive: no end-of-archive marker")
        if len(header) != BLOCK:
            raise Malformed("truncated archive: partial header")
        if header == _ZERO_BLOCK:
            self._finish()
            return None
        return self._parse_header(header)

    def _finish(self) -> None:
        # The marker is two zero blocks; writers may pad further with zeros (tar's records).
        second = self._in.read(BLOCK)
        if second != _ZERO_BLOCK:
            raise Malformed("truncated archive: incomplete end-of-archive marker")
        while True:
            tail = self._in.read(64 * 1024)
            if not tail:
                break
            if tail.strip(b"\0"):
                raise Malformed("data after the end-of-archive marker")
        self._done = True

    def _parse_header(self, header: bytes) -> Entry:
        stored = _decode_octal(header[148:156], "checksum")
        computed = sum(header[:148]) + 8 * 0x20 + sum(header[156:])
        if stored != computed:
            raise Malformed("tar header checksum mismatch (corrupt or not an archive)")
        if header[257:263] != b"ustar\0" or header[263:265] != b"00":
            raise Malformed("not a POSIX ustar archive")
        kind = header[156:157]
        raw_name = header[0:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        shown = (prefix + b"/" + raw_name if prefix else raw_name).decode("ascii", "replace")
        if kind in _TYPE_NAMES:
            raise UnsafePath(f"archive entry {shown!r} is {_TYPE_NAMES[kind]}, not a regular file")
        if kind not in (b"0", b"\0"):
            raise Malformed(f"archive entry {shown!r} has unsupported type {kind!r}")
        if prefix:
            raise UnsafePath(f"archive entry {shown!r} is inside a directory")
        name = self._check_name(raw_name, shown)
        size = _decode_size(header[124:136])
        entry = Entry(name=name, size=size, offset=self._pos)
        self._remaining = size
        self._padding = padded(size) - size
        return entry

    @staticmethod
    def _check_name(raw: bytes, shown: str) -> str:
        if not raw:
            raise Malformed("archive entry with an empty name")
        if raw.startswith(b"/"):
            raise UnsafePath(f"archive entry {shown!r} has an absolute path")
        if b"/" in raw or b"\\" in raw:
            parts = raw.replace(b"\\", b"/").split(b"/")
            if b".." in parts:
                raise UnsafePath(f"archive entry {shown!r} escapes the bundle with '..'")
            raise UnsafePath(f"archive entry {shown!r} is inside a directory")
        try:
            name = raw.decode("ascii")
            return validate_file_name(name)
        except (UnicodeDecodeError, Malformed):
            raise UnsafePath(f"archive entry {shown!r} has an unsafe name") from None

    def read_data(self, limit: int) -> bytes:
        """Read the current entry's data whole (callers check ``size`` against a limit first)."""
        if self._remaining > limit:
            raise ValueError("entry larger than the limit")
        data = self._read_exact(self._remaining, "an entry's data")
        self._remaining = 0
        return data

    def iter_data(self) -> Iterator[memoryview]:
        """Yield the current entry's data in chunks, reusing one buffer (constant memory)."""
        buf = bytearray(min(CHUNK, max(self._remaining, 1)))
        view = memoryview(buf)
        while self._remaining:
            want = min(len(buf), self._remaining)
            got = self._in.readinto(view[:want])
            if not got:
                raise Malformed("truncated archive: an entry's data ends early")
            self._pos += got
            self._remaining -= got
            yield view[:got]

    def skip_data(self) -> None:
        for _ in self.iter_data():
            pass


def list_entries(data: bytes) -> list[Entry]:
    """Entries of an in-memory archive (for tests and small tools)."""
    reader = TarReader(io.BytesIO(data))
    entries = []
    while (entry := reader.next_entry()) is not None:
        reader.skip_data()
        entries.append(entry)
    return entries
