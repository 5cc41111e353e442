"""One named test per attack on the bundle verifier (after python-tuf's client tests).

Every rejection asserts the typed error AND that the device's state — the install destination's
parent directory and the trust file — is byte-identical afterwards.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support.bundles import Member, read_members, resign, rewrite, snapshot, write_onnx_model

from edgekit.errors import (
    BadSignature,
    Expired,
    ExtraFile,
    HashMismatch,
    Incompatible,
    Malformed,
    MissingFile,
    Rollback,
    ThresholdNotMet,
    TooLarge,
    UnsafePath,
    UntrustedKey,
    VerificationError,
)
from edgekit.manifest import Targets
from edgekit.trust import TrustEnvelope, TrustPolicy, load_trust
from edgekit.verify import DeviceProfile, verify_bundle


@pytest.fixture
def device(tmp_path: Path, trust_file: Path) -> Path:
    """A device state directory: trust file plus an already-installed slot."""
    root = tmp_path / "device"
    (root / "slots" / "active").mkdir(parents=True)
    (root / "slots" / "active" / "model.onnx").write_bytes(b"the model that runs now")
    (root / "trust.json").write_bytes(trust_file.read_bytes())
    return root


@pytest.fixture
def reject(device: Path) -> Callable[..., VerificationError]:
    """Verify-and-install ``bundle``; assert it fails with ``error`` and changes nothing."""

    def check(bundle: Path, error: type[VerificationError], **options: Any) -> VerificationError:
        before = snapshot(device)
        policy = options.pop("trust", None) or load_trust(device / "trust.json").policy
        destination = device / "slots" / "staging"
        with pytest.raises(error) as caught:
            verify_bundle(bundle, policy, install_to=destination, **options)
        assert type(caught.value) is error, f"expected {error.__name__}, got {caught.value!r}"
        assert "\n" not in str(caught.value)
        assert snapshot(device) == before
        assert not destination.exists()
        return caught.value

    return check


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None]) -> bytes:
    manifest = json.loads(read_members(bundle)[0].data)
    change(manifest)
    return json.dumps(manifest).encode()


# --- the happy path, so that every rejection below is meaningful --------------------------


def test_valid_bundle_installs_the_verified_bytes(make_bundle, device, model_file):
    bundle = make_bundle()
    policy = load_trust(device / "trust.json").policy
    result = verify_bundle(
        bundle, policy, install_to=device / "slots" / "staging", installed_version=1
    )
    assert result.directory == device / "slots" / "staging"
    assert (result.directory / "model.onnx").read_bytes() == model_file.read_bytes()
    assert (result.directory / "manifest.json").read_bytes() == result.manifest_bytes
    assert [p.name for p in (device / "slots").iterdir() if p.name.startswith(".")] == []


# --- tampering ------------------------------------------------------------------------------


def test_bit_flip_in_model_is_hash_mismatch(make_bundle, reject):
    bundle = make_bundle()
    data = bytearray(bundle.read_bytes())
    offset = data.rindex(b"tiny") + 2  # the graph name inside the model (after the manifest)
    data[offset] ^= 0x01
    bundle.write_bytes(bytes(data))
    reject(bundle, HashMismatch)


def test_manifest_edited_with_old_signature_is_bad_signature(make_bundle, reject):
    bundle = make_bundle(version=2)
    edited = edit_manifest(bundle, lambda m: m.update(version=99))
    rewrite(bundle, lambda ms: [Member("manifest.json", edited), *ms[1:]])
    reject(bundle, BadSignature)


def test_missing_signatures_file(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [m for m in ms if m.name != "signatures.json"])
    reject(bundle, MissingFile)


def test_empty_signatures_file(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [ms[0], Member("signatures.json", b""), *ms[2:]])
    reject(bundle, Malformed)


def test_zero_signatures_is_a_rejection(make_bundle, reject):
    empty = b'{"signatures": []}'
    bundle = rewrite(make_bundle(), lambda ms: [ms[0], Member("signatures.json", empty), *ms[2:]])
    error = reject(bundle, ThresholdNotMet)
    assert "no signatures" in str(error)


def test_unknown_key(make_bundle, reject):
    reject(make_bundle(keys="C"), UntrustedKey)


def test_revoked_key(make_bundle, reject, signers, device, tmp_path):
    # v1 trusts A and B; v2 (signed by both) drops A. A's bundles must now be refused.
    v1 = TrustPolicy.create([("A", signers["A"].public), ("B", signers["B"].public)], threshold=1)
    v2 = TrustPolicy.create([("B", signers["B"].public)], threshold=1, version=2)
    envelope = TrustEnvelope.unsigned(v2).signed_by(signers["A"], signers["B"])
    from edgekit.trust import verify_rotation

    current = verify_rotation(v1, envelope)
    assert verify_bundle(make_bundle(keys="B"), current).manifest.name == "tiny"
    reject(make_bundle(keys="A"), UntrustedKey, trust=current)


def test_threshold_not_met(make_bundle, reject, signers):
    two_of_two = TrustPolicy.create(
        [("A", signers["A"].public), ("B", signers["B"].public)], threshold=2
    )
    reject(make_bundle(keys="A"), ThresholdNotMet, trust=two_of_two)
    assert verify_bundle(make_bundle(keys="AB"), two_of_two).signed_by


def test_same_key_listed_twice_counts_once(make_bundle, reject, signers):
    two_of_two = TrustPolicy.create(
        [("A", signers["A"].public), ("B", signers["B"].public)], threshold=2
    )
    bundle = make_bundle(keys="A")
    members = read_members(bundle)
    sig = json.loads(members[1].data)["signatures"][0]
    doubled = json.dumps({"signatures": [sig, sig]}).encode()
    rewrite(bundle, lambda ms: [ms[0], Member("signatures.json", doubled), *ms[2:]])
    reject(bundle, ThresholdNotMet, trust=two_of_two)


def test_same_key_twice_in_trust_policy_counts_once(signers):
    policy = TrustPolicy.create(
        [("A", signers["A"].public), ("A2", signers["A"].public)], threshold=1
    )
    assert len(policy.keys) == 1
    with pytest.raises(Malformed):
        TrustPolicy.create([("A", signers["A"].public), ("A2", signers["A"].public)], threshold=2)


def test_signature_from_trusted_key_with_foreign_keyid_is_rejected(make_bundle, reject, signers):
    # C signs, but the entry claims to be A's: the key id does not make the signature valid.
    bundle = make_bundle(keys="C")
    members = read_members(bundle)
    sig = json.loads(members[1].data)["signatures"][0]
    sig["keyid"] = signers["A"].keyid
    forged = json.dumps({"signatures": [sig]}).encode()
    rewrite(bundle, lambda ms: [ms[0], Member("signatures.json", forged), *ms[2:]])
    reject(bundle, BadSignature)


# --- freshness ------------------------------------------------------------------------------


def test_older_version_is_rollback(make_bundle, reject):
    reject(make_bundle(version=2), Rollback, installed_version=5)


def test_same_version_is_rollback(make_bundle, reject):
    error = reject(make_bundle(version=5), Rollback, installed_version=5)
    assert "same" in str(error)


def test_expired(make_bundle, reject):
    past = datetime.now(timezone.utc) - timedelta(days=30)
    bundle = make_bundle(created=past, expires=past + timedelta(days=1))
    reject(bundle, Expired)


def test_not_yet_expired_with_a_clock_far_ahead_is_expired(make_bundle, reject):
    reject(make_bundle(), Expired, now=datetime.now(timezone.utc) + timedelta(days=400))


# --- mix and match, compatibility ------------------------------------------------------------


def test_mix_and_match_model_from_another_bundle(make_bundle, reject, tmp_path):
    other_model = write_onnx_model(tmp_path / "model.onnx", seed=7)
    other = make_bundle(version=3, model=other_model)
    genuine = make_bundle(version=3)
    foreign_model = read_members(other)[2]
    bundle = rewrite(genuine, lambda ms: [ms[0], ms[1], foreign_model])
    reject(bundle, HashMismatch)


def test_wrong_runtime(make_bundle, reject):
    reject(make_bundle(), Incompatible, device=DeviceProfile(runtimes={"tflite": "2.14.0"}))


def test_runtime_too_old(make_bundle, reject):
    bundle = make_bundle(targets=Targets(runtime_version="1.17"))
    reject(bundle, Incompatible, device=DeviceProfile(runtimes={"onnxruntime": "1.16.3"}))


def test_wrong_architecture(make_bundle, reject, device):
    bundle = make_bundle(targets=Targets(architectures=("aarch64",)))
    reject(bundle, Incompatible, device=DeviceProfile(architecture="x86_64"))
    policy = load_trust(device / "trust.json").policy
    assert verify_bundle(bundle, policy, device=DeviceProfile(architecture="arm64"))


def test_agent_too_old(make_bundle, reject):
    bundle = make_bundle(targets=Targets(min_agent_version="2.0"))
    reject(bundle, Incompatible, device=DeviceProfile(agent_version="1.9.9"))


# --- archive structure ------------------------------------------------------------------------


def test_file_longer_than_declared(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [*ms[:2], Member(ms[2].name, ms[2].data + b"x")])
    reject(bundle, TooLarge)


def test_file_shorter_than_declared(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [*ms[:2], Member(ms[2].name, ms[2].data[:-1])])
    reject(bundle, HashMismatch)


@pytest.mark.parametrize(
    "member",
    [
        Member("../model.onnx", b"x"),
        Member("../../etc/cron.d/evil", b"x"),
        Member("/etc/passwd", b"x"),
        Member("model.onnx", kind=tarfile.SYMTYPE, linkname="/etc/shadow"),
        Member("model.onnx", kind=tarfile.LNKTYPE, linkname="manifest.json"),
        Member("model.onnx", kind=tarfile.CHRTYPE),
        Member("model.onnx", kind=tarfile.BLKTYPE),
        Member("model.onnx", kind=tarfile.FIFOTYPE),
        Member("sub", kind=tarfile.DIRTYPE),
        Member("sub/model.onnx", b"x"),
    ],
    ids=[
        "dotdot",
        "deep-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "directory",
        "subdirectory",
    ],
)
def test_unsafe_entries(make_bundle, reject, member):
    bundle = rewrite(make_bundle(), lambda ms: [*ms[:2], member, *ms[2:]])
    reject(bundle, UnsafePath)


def test_extra_file(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [*ms, Member("payload.sh", b"#!/bin/sh\n")])
    reject(bundle, ExtraFile)


def test_missing_file(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: ms[:2])
    reject(bundle, MissingFile)


def test_duplicate_entry(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [*ms, ms[2]])
    reject(bundle, Malformed)


def test_manifest_not_first(make_bundle, reject):
    bundle = rewrite(make_bundle(), lambda ms: [ms[2], ms[0], ms[1]])
    reject(bundle, MissingFile)


def test_truncated_archive(make_bundle, device, signers):
    bundle = make_bundle()
    data = bundle.read_bytes()
    policy = load_trust(device / "trust.json").policy
    before = snapshot(device)
    # Every cut point on a block boundary and a few inside blocks.
    cuts = sorted({*range(0, len(data), 512), *range(7, len(data), 1531)} - {len(data)})
    for cut in cuts:
        bundle.write_bytes(data[:cut])
        with pytest.raises(VerificationError) as caught:
            verify_bundle(bundle, policy, install_to=device / "slots" / "staging")
        assert isinstance(caught.value, (Malformed, MissingFile)), (cut, caught.value)
    assert snapshot(device) == before


def test_trailing_garbage_after_end_marker(make_bundle, reject):
    bundle = make_bundle()
    bundle.write_bytes(bundle.read_bytes() + b"\x01" * 10)
    reject(bundle, Malformed)


def test_tar_padding_to_records_is_accepted(make_bundle, device):
    bundle = make_bundle()
    bundle.write_bytes(bundle.read_bytes() + bytes(10240))
    assert verify_bundle(bundle, load_trust(device / "trust.json").policy)


def test_archive_written_by_tarfile_is_accepted(make_bundle, device):
    # Interoperability: a bundle re-packed by another ustar writer still verifies.
    bundle = rewrite(make_bundle(), lambda ms: ms)
    assert verify_bundle(bundle, load_trust(device / "trust.json").policy).manifest.version == 2


# --- malformed metadata (signed, so the parser is reached) ------------------------------------


def test_malformed_manifest_json(make_bundle, reject, signers):
    bundle = make_bundle()
    rewrite(bundle, lambda ms: resign(ms, b'{"format": 1, "name": ', signers["A"]))
    reject(bundle, Malformed)


def test_duplicate_json_keys_in_manifest(make_bundle, reject, signers):
    bundle = make_bundle(version=2)
    text = read_members(bundle)[0].data.decode()
    doubled = text.replace('"version": 2', '"version": 2, "version": 9', 1).encode()
    assert doubled != text.encode()
    rewrite(bundle, lambda ms: resign(ms, doubled, signers["A"]))
    error = reject(bundle, Malformed)
    assert "duplicate" in str(error)


def test_duplicate_json_keys_in_signatures(make_bundle, reject):
    bundle = make_bundle()
    sigs = read_members(bundle)[1].data.decode()
    doubled = sigs.replace('"signatures":', '"signatures": [], "signatures":', 1).encode()
    rewrite(bundle, lambda ms: [ms[0], Member("signatures.json", doubled), *ms[2:]])
    reject(bundle, Malformed)


def test_manifest_listing_a_file_with_an_unsafe_name(make_bundle, reject, signers):
    bundle = make_bundle()
    manifest = edit_manifest(
        bundle, lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}})
    )
    rewrite(bundle, lambda ms: resign(ms, manifest, signers["A"]))
    reject(bundle, Malformed)


def test_huge_declared_size_is_too_large(make_bundle, reject, signers):
    bundle = make_bundle()
    manifest = edit_manifest(bundle, lambda m: m["files"]["model.onnx"].update(size=2**62))
    rewrite(bundle, lambda ms: resign(ms, manifest, signers["A"]))
    reject(bundle, TooLarge)


def test_newer_format_is_refused(make_bundle, reject, signers):
    bundle = make_bundle()
    manifest = edit_manifest(bundle, lambda m: m.update(format=2))
    rewrite(bundle, lambda ms: resign(ms, manifest, signers["A"]))
    reject(bundle, Malformed)


def test_unknown_manifest_fields_are_kept(make_bundle, device, signers):
    bundle = make_bundle()
    manifest = edit_manifest(bundle, lambda m: m.update(future_field={"x": [1, 2]}))
    rewrite(bundle, lambda ms: resign(ms, manifest, signers["A"]))
    result = verify_bundle(bundle, load_trust(device / "trust.json").policy)
    assert result.manifest.extra["future_field"] == {"x": [1, 2]}
    assert result.manifest.to_dict()["future_field"] == {"x": [1, 2]}


def test_signatures_json_is_not_reserialized(make_bundle, device, signers):
    # Whitespace changes in the manifest break the signature: bytes, not meaning, are signed.
    bundle = make_bundle()
    original = read_members(bundle)[0].data
    rewrite(bundle, lambda ms: [Member("manifest.json", original + b" "), *ms[1:]])
    with pytest.raises(BadSignature):
        verify_bundle(bundle, load_trust(device / "trust.json").policy)
