"""Trust rotation as in TUF root rotation: old AND new thresholds, one version at a time.

Each rejected update must leave the device's trust file byte-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgekit.errors import (
    BadSignature,
    Malformed,
    Rollback,
    ThresholdNotMet,
    TooLarge,
    UntrustedKey,
    VerificationError,
)
from edgekit.keys import SigningKey
from edgekit.trust import TrustEnvelope, TrustPolicy, apply_rotations, load_trust


def policy(
    signers: dict[str, SigningKey], names: str, *, threshold: int, version: int
) -> TrustPolicy:
    return TrustPolicy.create(
        [(n, signers[n].public) for n in names], threshold=threshold, version=version
    )


def envelope(p: TrustPolicy, *keys: SigningKey) -> TrustEnvelope:
    return TrustEnvelope.unsigned(p).signed_by(*keys)


@pytest.fixture
def device_trust(tmp_path: Path, signers) -> Path:
    """A device on v1: keys A and B, threshold 2."""
    path = tmp_path / "trust.json"
    path.write_bytes(envelope(policy(signers, "AB", threshold=2, version=1)).to_bytes())
    return path


def assert_rotation_rejected(path: Path, updates: list[TrustEnvelope], error: type) -> None:
    before = path.read_bytes()
    with pytest.raises(error) as caught:
        apply_rotations(path, updates)
    assert type(caught.value) is error, repr(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_correctly_chained_rotation_is_accepted(device_trust, signers):
    v2 = envelope(policy(signers, "BC", threshold=2, version=2), *(signers[k] for k in "ABC"))
    result = apply_rotations(device_trust, [v2])
    assert result.version == 2
    assert load_trust(device_trust).payload == v2.payload


def test_chain_of_two_rotations_is_accepted(device_trust, signers):
    v2 = envelope(policy(signers, "BC", threshold=2, version=2), *(signers[k] for k in "ABC"))
    v3 = envelope(
        policy(signers, "CD", threshold=1, version=3), signers["B"], signers["C"], signers["D"]
    )
    assert apply_rotations(device_trust, [v2, v3]).version == 3


def test_rotation_signed_only_by_new_keys(device_trust, signers):
    v2 = envelope(policy(signers, "CD", threshold=2, version=2), signers["C"], signers["D"])
    assert_rotation_rejected(device_trust, [v2], UntrustedKey)


def test_rotation_signed_only_by_old_keys(device_trust, signers):
    v2 = envelope(policy(signers, "CD", threshold=2, version=2), signers["A"], signers["B"])
    assert_rotation_rejected(device_trust, [v2], UntrustedKey)


def test_rotation_below_old_threshold(device_trust, signers):
    v2 = envelope(policy(signers, "BC", threshold=1, version=2), signers["B"], signers["C"])
    assert_rotation_rejected(device_trust, [v2], ThresholdNotMet)


def test_rotation_below_new_threshold(device_trust, signers):
    v2 = envelope(policy(signers, "ACD", threshold=2, version=2), signers["A"], signers["B"])
    assert_rotation_rejected(device_trust, [v2], ThresholdNotMet)


def test_rotation_skipping_a_version(device_trust, signers):
    v3 = envelope(policy(signers, "AB", threshold=2, version=3), signers["A"], signers["B"])
    assert_rotation_rejected(device_trust, [v3], Rollback)


def test_rotation_replaying_the_current_version(device_trust, signers):
    v1 = envelope(policy(signers, "AB", threshold=2, version=1), signers["A"], signers["B"])
    assert_rotation_rejected(device_trust, [v1], Rollback)


def test_bad_link_in_a_chain_rejects_the_whole_chain(device_trust, signers):
    v2 = envelope(policy(signers, "BC", threshold=2, version=2), *(signers[k] for k in "ABC"))
    v3 = envelope(policy(signers, "D", threshold=1, version=3), signers["D"])  # not by B, C
    assert_rotation_rejected(device_trust, [v2, v3], UntrustedKey)


def test_tampered_payload_is_bad_signature(device_trust, signers):
    v2 = envelope(policy(signers, "AB", threshold=2, version=2), signers["A"], signers["B"])
    other = TrustEnvelope.unsigned(policy(signers, "ABD", threshold=1, version=2))
    forged = TrustEnvelope(other.payload, other.policy, v2.signatures)
    assert_rotation_rejected(device_trust, [forged], BadSignature)


def test_manifest_signature_cannot_be_replayed_on_a_trust_file(signers):
    # Domain separation: the same bytes signed as a manifest do not count for a trust file.
    from edgekit.keys import MANIFEST_PAYLOAD_TYPE

    p = policy(signers, "AB", threshold=1, version=2)
    unsigned = TrustEnvelope.unsigned(p)
    sig = signers["A"].sign(MANIFEST_PAYLOAD_TYPE, unsigned.payload)
    with pytest.raises(BadSignature):
        policy(signers, "AB", threshold=1, version=1).check(
            unsigned.payload, [sig], payload_type="application/vnd.edgekit.trust+json", what="t"
        )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"", Malformed),
        (b"[]", Malformed),
        (b'{"payloadType": "x", "payload": "", "signatures": []}', Malformed),
        (
            b'{"payloadType": "application/vnd.edgekit.trust+json", "payload": "!!", '
            b'"signatures": []}',
            Malformed,
        ),
        (b'{"a": 1, "a": 2}', Malformed),
        (b" " * (600 * 1024), TooLarge),
    ],
)
def test_malformed_trust_files(tmp_path, text, error):
    path = tmp_path / "trust.json"
    path.write_bytes(text)
    with pytest.raises(error):
        load_trust(path)


def test_policy_with_a_key_under_a_wrong_id_is_malformed(signers):
    import base64
    import json

    good = TrustEnvelope.unsigned(policy(signers, "A", threshold=1, version=1))
    doc = json.loads(good.payload)
    keyid = next(iter(doc["keys"]))
    doc["keys"]["f" * 64] = doc["keys"].pop(keyid)
    payload = json.dumps(doc).encode()
    wire = json.dumps(
        {
            "payloadType": "application/vnd.edgekit.trust+json",
            "payload": base64.b64encode(payload).decode(),
            "signatures": [],
        }
    )
    with pytest.raises(Malformed, match="not the sha256"):
        TrustEnvelope.from_bytes(wire.encode())


@pytest.mark.parametrize("threshold", [0, 3])
def test_threshold_out_of_range(signers, threshold):
    with pytest.raises(VerificationError):
        policy(signers, "AB", threshold=threshold, version=1)
