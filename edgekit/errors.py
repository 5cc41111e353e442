"""One exception tree for the edgekit package.

Callers catch :class:`EdgekitError` (or :class:`VerificationError` on the verify path), never a
``KeyError`` or ``tarfile.ReadError``: low-level failures are mapped to the most specific public
error at the boundary where they happen. Every error carries a short machine-readable ``reason``
(used in CLI output, agent events and telemetry) and a one-line human message.
"""

from __future__ import annotations

__all__ = [
    "BadSignature",
    "BundleError",
    "EdgekitError",
    "Expired",
    "ExtraFile",
    "HashMismatch",
    "Incompatible",
    "KeyFileError",
    "Malformed",
    "MissingFile",
    "ModelInfoError",
    "Rollback",
    "ThresholdNotMet",
    "TooLarge",
    "UnsafePath",
    "UntrustedKey",
    "VerificationError",
]


class EdgekitError(Exception):
    """Base of every error edgekit raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str) -> None:
        # One line: the CLI prints it as is, telemetry stores it.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class VerificationError(EdgekitError):
    """A bundle or trust file was refused. Nothing was installed and no trust state changed."""

    reason = "verification-failed"


class BadSignature(VerificationError):
    """A signature from a trusted key does not match the signed bytes."""

    reason = "bad-signature"


class UntrustedKey(VerificationError):
    """The only signatures present come from keys the trust policy does not list."""

    reason = "untrusted-key"


class ThresholdNotMet(VerificationError):
    """Fewer distinct trusted keys signed than the trust policy's threshold requires."""

    reason = "threshold-not-met"


class HashMismatch(VerificationError):
    """A file's bytes differ from the sha256 (or are shorter than the size) in the manifest."""

    reason = "hash-mismatch"


class MissingFile(VerificationError):
    """A file the format or the manifest requires is absent from the archive."""

    reason = "missing-file"


class ExtraFile(VerificationError):
    """The archive holds a file the manifest does not list."""

    reason = "extra-file"


class UnsafePath(VerificationError):
    """An archive entry is not a plain file with a safe flat name (``..``, absolute, links...)."""

    reason = "unsafe-path"


class Rollback(VerificationError):
    """The version is not newer than the one installed (or the trust version does not chain)."""

    reason = "rollback"


class Expired(VerificationError):
    """The signed metadata's expiry time has passed."""

    reason = "expired"


class Incompatible(VerificationError):
    """The bundle targets another runtime, architecture or agent version."""

    reason = "incompatible"


class Malformed(VerificationError):
    """The archive or a JSON document does not follow the format."""

    reason = "malformed"


class TooLarge(VerificationError):
    """A file, document or archive exceeds its declared size or a configured limit."""

    reason = "too-large"


class KeyFileError(EdgekitError):
    """A key file cannot be read, decrypted or written."""

    reason = "key-file"


class BundleError(EdgekitError):
    """A bundle cannot be built from the given inputs (host side)."""

    reason = "bundle"


class ModelInfoError(EdgekitError):
    """A model file cannot be introspected (unknown format, corrupt, unsupported)."""

    reason = "model-info"
