"""The downloader against a real local HTTP server that misbehaves on request.

The server (stdlib ``http.server``) serves one file with Range support and can drop the
connection after N bytes, send more than the file, ignore Range, answer 500 a few times or
stall. Each attack is one named test; its assertions are the typed error and what is left on
disk (no ``dest``, no ``.part`` to resume from a wrong file).
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from device_agent.download import (
    DownloadFailed,
    DownloadMismatch,
    DownloadTooLarge,
    download,
)

DATA = bytes(range(256)) * 1200 + b"tail"  # 307204 bytes: several chunks of 64 KiB
SHA = hashlib.sha256(DATA).hexdigest()
CHUNK = 64 * 1024


@dataclass
class Behavior:
    data: bytes = DATA
    drop_after: int | None = None  # send this many body bytes, then cut the connection...
    drops: int = 1  # ...on this many responses
    extra: bytes = b""  # bytes appended after the file
    send_length: bool = True  # False: no Content-Length, the body ends when the server closes
    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    range_start_shift: int = 0  # a 206 whose Content-Range starts elsewhere than asked
    fail: int = 0  # answer the first N requests with this many 500s
    status: int | None = None  # answer every request with this status
    stall_after: int | None = None  # send this many bytes, then stop sending (later: none)
    ranges: list[str | None] = field(default_factory=list)  # the Range header of each request
    release: threading.Event = field(default_factory=threading.Event)


class FileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: the body may end at close

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        b = self.server.behavior  # type: ignore[attr-defined]
        header = self.headers.get("Range")
        b.ranges.append(header)
        if b.status is not None or b.fail > 0:
            b.fail -= 1
            self.send_response(b.status or 500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, status = 0, 200
        match = re.fullmatch(r"bytes=(\d+)-", header or "")
        if match and not b.ignore_range:
            start, status = int(match.group(1)), 206
            if start >= len(b.data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start += b.range_start_shift
        body = b.data[start:] + b.extra
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(b.data) - 1}/{len(b.data)}")
        if b.send_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if b.drop_after is not None and b.drops > 0:
            b.drops -= 1
            self.wfile.write(body[: b.drop_after])
            self.wfile.flush()
            return  # HTTP/1.0: the connection closes, short of Content-Length
        if b.stall_after is not None:
            self.wfile.write(body[: b.stall_after])
            self.wfile.flush()
            b.stall_after = 0
            b.release.wait(10)
            return
        self.wfile.write(body)


class FileServer(ThreadingHTTPServer):
    daemon_threads = True
    behavior: Behavior

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the client gave up: expected
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass
class Server:
    url: str
    behavior: Behavior


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = FileServer(("127.0.0.1", 0), FileHandler)
    httpd.behavior = Behavior()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield Server(f"http://127.0.0.1:{httpd.server_address[1]}/model.bin", httpd.behavior)
    httpd.behavior.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "bundles" / "model.bin"


def part_of(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def fetch(server: Server, dest: Path, **options: object) -> Path:
    options = {"sha256": SHA, "size": len(DATA), "chunk": CHUNK, "backoff": 0.01, **options}
    return download(server.url, dest, **options)  # type: ignore[arg-type]


def test_plain_download(server: Server, dest: Path) -> None:
    seen: list[tuple[int, int]] = []
    assert fetch(server, dest, progress=lambda done, total: seen.append((done, total))) == dest
    assert dest.read_bytes() == DATA
    assert not part_of(dest).exists()
    assert server.behavior.ranges == [None]
    assert seen[-1] == (len(DATA), len(DATA))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_resume_after_a_dropped_connection(server: Server, dest: Path) -> None:
    server.behavior.drop_after = 100_000
    fetch(server, dest)
    assert server.behavior.ranges == [None, "bytes=100000-"]
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA


def test_resume_after_many_drops_makes_progress_past_the_retry_limit(
    server: Server, dest: Path
) -> None:
    server.behavior.drop_after, server.behavior.drops = 30_000, 8
    fetch(server, dest, retries=2)  # 8 drops, but every attempt brought bytes
    assert len(server.behavior.ranges) == 9
    assert dest.read_bytes() == DATA


def test_resume_of_a_partial_file_left_by_a_previous_run(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(DATA[:123_456])
    fetch(server, dest)
    assert server.behavior.ranges == ["bytes=123456-"]
    assert dest.read_bytes() == DATA


def test_corrupt_partial_file_fails_the_hash_and_is_deleted(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(b"X" * 1000)
    with pytest.raises(DownloadMismatch, match="SHA-256"):
        fetch(server, dest)
    assert not dest.exists() and not part_of(dest).exists()
    fetch(server, dest)  # the next run starts clean and succeeds
    assert dest.read_bytes() == DATA


def test_range_ignored_200_restarts_from_zero(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(DATA[:50_000])
    server.behavior.ignore_range = True
    fetch(server, dest)
    assert server.behavior.ranges == ["bytes=50000-"]
    assert dest.read_bytes() == DATA


def test_206_for_the_wrong_range_restarts_from_zero(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(DATA[:50_000])
    server.behavior.range_start_shift = -10
    fetch(server, dest)
    assert server.behavior.ranges == ["bytes=50000-", None]
    assert dest.read_bytes() == DATA


def test_wrong_sha256_raises_and_leaves_nothing(server: Server, dest: Path) -> None:
    with pytest.raises(DownloadMismatch, match="expected " + "0" * 64):
        fetch(server, dest, sha256="0" * 64)
    assert not dest.exists() and not part_of(dest).exists()


def test_server_sends_too_much_with_content_length(server: Server, dest: Path) -> None:
    server.behavior.extra = b"\0" * 10_000_000
    with pytest.raises(DownloadTooLarge, match="announces"):
        fetch(server, dest)
    assert not dest.exists() and not part_of(dest).exists()


def test_server_sends_endless_data_without_content_length(server: Server, dest: Path) -> None:
    server.behavior.extra = b"\0" * 10_000_000
    server.behavior.send_length = False
    with pytest.raises(DownloadTooLarge, match="more than the expected"):
        fetch(server, dest)
    assert not dest.exists() and not part_of(dest).exists()


def test_server_file_is_shorter(server: Server, dest: Path) -> None:
    server.behavior.data = DATA[:-1]
    with pytest.raises(DownloadMismatch, match="announces"):
        fetch(server, dest)
    assert not part_of(dest).exists()


def test_500s_are_retried_then_succeed(server: Server, dest: Path) -> None:
    server.behavior.fail = 3
    fetch(server, dest, retries=5)
    assert len(server.behavior.ranges) == 4
    assert dest.read_bytes() == DATA


def test_500s_beyond_the_retries_fail(server: Server, dest: Path) -> None:
    server.behavior.fail = 100
    with pytest.raises(DownloadFailed, match=r"3 attempt.*HTTP 500"):
        fetch(server, dest, retries=2)
    assert len(server.behavior.ranges) == 3
    assert not dest.exists()


def test_404_is_not_retried(server: Server, dest: Path) -> None:
    server.behavior.status = 404
    with pytest.raises(DownloadFailed, match="HTTP 404"):
        fetch(server, dest)
    assert len(server.behavior.ranges) == 1


def test_stalled_server_times_out(server: Server, dest: Path) -> None:
    server.behavior.stall_after = 1000  # then every later response stalls at once
    start = time.monotonic()
    with pytest.raises(DownloadFailed, match=r"2 attempt.*timed out"):
        fetch(server, dest, timeout=0.3, retries=1)
    assert time.monotonic() - start < 3.0
    # The first attempt brought 1000 bytes (progress: the count restarts), then two stalls.
    assert server.behavior.ranges == [None, "bytes=1000-", "bytes=1000-"]
    assert part_of(dest).read_bytes() == DATA[:1000]  # kept for the next run to resume


def test_connection_refused_is_retried_then_fails(dest: Path) -> None:
    with pytest.raises(DownloadFailed, match="2 attempt"):
        download("http://127.0.0.1:9/x", dest, sha256=SHA, size=10, retries=1, backoff=0.01)


def test_already_downloaded_file_is_not_fetched_again(server: Server, dest: Path) -> None:
    fetch(server, dest)
    fetch(server, dest)
    assert server.behavior.ranges == [None]


def test_a_different_existing_file_is_replaced(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"old model")
    fetch(server, dest)
    assert dest.read_bytes() == DATA


def test_a_concurrent_download_of_the_same_file_is_refused(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    with part_of(dest).open("ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DownloadFailed, match="in progress"):
            fetch(server, dest)
    assert server.behavior.ranges == []


@pytest.mark.parametrize(
    "options",
    [{"sha256": "abc"}, {"size": -1}, {"timeout": 0}, {"chunk": 0}],
)
def test_invalid_arguments(server: Server, dest: Path, options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        fetch(server, dest, **options)


def test_only_http_urls(dest: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        download("file:///etc/passwd", dest, sha256=SHA, size=1)


def test_partial_file_longer_than_the_download_is_discarded(server: Server, dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    part_of(dest).write_bytes(DATA + b"junk")
    fetch(server, dest)
    assert server.behavior.ranges == [None]
    assert dest.read_bytes() == DATA
