"""The fleet controller's exceptions: one family under :class:`edgekit.errors.EdgekitError`.

Each error carries a short ``reason`` (shown by the CLI, returned by the REST API as
``{"error": reason, "detail": message}``) and the HTTP status the API answers with, so the
mapping from an error to a response lives with the error and not in every endpoint.
"""

from __future__ import annotations

from edgekit.errors import EdgekitError

__all__ = [
    "ArtifactError",
    "ConflictError",
    "FleetError",
    "InvalidTransition",
    "NotFound",
    "PkiError",
    "ProvisionedError",
    "RemoteError",
    "SpecError",
]


class FleetError(EdgekitError):
    """Base of the fleet controller's errors."""

    reason = "fleet"
    http_status = 500


class SpecError(FleetError):
    """A rollout option, a gate, a wave list or a target selector does not parse."""

    reason = "bad-spec"
    http_status = 422


class NotFound(FleetError):
    """No device, rollout or artifact has that id."""

    reason = "not-found"
    http_status = 404


class ConflictError(FleetError):
    """The request contradicts the current state (a second active rollout in a fleet...)."""

    reason = "conflict"
    http_status = 409


class InvalidTransition(ConflictError):
    """The rollout's state does not allow this action (resume a completed rollout...)."""

    reason = "invalid-transition"


class ArtifactError(FleetError):
    """An uploaded file is not a readable bundle, or the store cannot hold it."""

    reason = "artifact"
    http_status = 422


class PkiError(FleetError):
    """The fleet certificate authority cannot do what was asked: a missing or damaged CA
    directory, a name that cannot be a certificate identity, a file that would be overwritten."""

    reason = "pki"
    http_status = 422


class ProvisionedError(PkiError):
    """The device already holds a valid certificate: issuing a second one silently would leave
    two keys able to speak for it (``--force`` issues the new one and revokes the old)."""

    reason = "already-provisioned"
    http_status = 409


class RemoteError(FleetError):
    """The CLI's request to the controller failed (network, auth, or an error response)."""

    reason = "controller"

    def __init__(
        self, message: str, *, status: int | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        if reason:
            self.reason = reason
