"""Property-based fuzzing: whatever the bytes, the verifier raises only its typed errors.

A crash with ``KeyError``, ``UnicodeDecodeError``, ``struct.error``… would be a bug a hostile
bundle could aim at; so would installing anything from a bundle that was not accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.bundles import Member, read_members, resign, write_members

from edgekit.errors import VerificationError
from edgekit.trust import load_trust
from edgekit.verify import verify_bundle

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture
def genuine(make_bundle, tmp_path: Path, trust_file: Path) -> tuple[bytes, Any, Path]:
    bundle = make_bundle()
    return bundle.read_bytes(), load_trust(trust_file).policy, tmp_path


def verify_only_typed_errors(path: Path, policy: Any, root: Path) -> None:
    destination = root / "fuzz-install"
    try:
        result = verify_bundle(path, policy, install_to=destination)
    except VerificationError:
        assert not destination.exists()
        assert not [p for p in root.iterdir() if p.name.startswith(".fuzz-install")]
    else:
        # Accepted: then it was installed whole, exactly as listed.
        assert sorted(p.name for p in destination.iterdir()) == sorted(
            [*result.manifest.files, "manifest.json", "signatures.json"]
        )
        import shutil

        shutil.rmtree(destination)


@FUZZ
@given(data=st.data())
def test_mutated_bundle_bytes(genuine, data):
    original, policy, root = genuine
    blob = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        position = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if action == "flip" and blob:
            blob[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "set" and blob:
            blob[position] = data.draw(st.integers(0, 255))
        elif action == "truncate":
            del blob[position:]
        elif action == "insert":
            blob[position:position] = data.draw(st.binary(min_size=1, max_size=600))
        elif action == "delete":
            del blob[position : position + data.draw(st.integers(1, 600))]
    path = root / "mutated.ekb"
    path.write_bytes(bytes(blob))
    verify_only_typed_errors(path, policy, root)


@FUZZ
@given(data=st.data())
def test_signed_random_manifests(genuine, signers, data):
    """The signature passes, so every field of the manifest parser is exercised."""
    original, policy, root = genuine
    path = root / "source.ekb"
    path.write_bytes(original)
    members = read_members(path)
    manifest: Any = json.loads(members[0].data)
    mode = data.draw(st.sampled_from(["replace-field", "drop-field", "nested", "whole"]))
    if mode == "whole":
        manifest = data.draw(json_values)
    elif mode == "drop-field":
        manifest.pop(data.draw(st.sampled_from(sorted(manifest))), None)
    elif mode == "replace-field":
        manifest[data.draw(st.sampled_from(sorted(manifest)))] = data.draw(json_values)
    else:
        target = data.draw(st.sampled_from(["files", "targets", "inputs", "outputs"]))
        manifest[target] = data.draw(json_values)
    text = json.dumps(manifest).encode()
    write_members(path, resign(members, text, signers["A"]))
    verify_only_typed_errors(path, policy, root)


member_strategy = st.builds(
    Member,
    name=st.sampled_from(
        [
            "model.onnx",
            "manifest.json",
            "signatures.json",
            "x",
            "../x",
            "/x",
            "a/b",
            ".hidden",
            "ok-file.bin",
            "é",
        ]
    ),
    data=st.binary(max_size=64),
    kind=st.sampled_from([b"0", b"0", b"0", b"1", b"2", b"3", b"5", b"6"]),
    linkname=st.sampled_from(["", "model.onnx", "/etc/passwd"]),
)


@FUZZ
@given(
    extra=st.lists(member_strategy, max_size=5),
    keep=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_random_archive_layouts(genuine, extra, keep):
    original, policy, root = genuine
    path = root / "layout.ekb"
    path.write_bytes(original)
    members = [m for m, k in zip(read_members(path), keep, strict=False) if k] + extra
    try:
        write_members(path, members)
    except (ValueError, UnicodeError):
        return  # tarfile itself cannot express this layout
    verify_only_typed_errors(path, policy, root)
