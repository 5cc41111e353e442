"""One exception tree for the on-device agent.

The agent's service loop, CLI and telemetry catch :class:`AgentError`, never an
``onnxruntime`` or LiteRT exception: low-level failures are mapped to the most specific class
here at the boundary where they happen (the runtime adapters), so that a device can report *why*
it refused a request or a model without leaking library-specific types.

Every class carries a short machine-readable ``reason`` (stable: it ends up in events and
telemetry) and a one-line human message. To add an error, subclass the closest class, give it
its own ``reason`` and list it in ``__all__``.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "InferenceError",
    "InputError",
    "ModelLoadError",
    "NoModel",
    "RuntimeUnavailable",
    "UnsupportedRuntime",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    reason: str = "agent-error"

    def __init__(self, message: str) -> None:
        # One line: the CLI prints it as is and telemetry stores it, so collapse the newlines
        # that runtime libraries like to put into their messages.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        """The one-line human message (the reason when none was given)."""
        return str(self.args[0]) if self.args and self.args[0] else self.reason


class RuntimeUnavailable(AgentError):
    """No interpreter library for the requested runtime is installed (or importable)."""

    reason = "runtime-unavailable"


class UnsupportedRuntime(AgentError):
    """The configuration or manifest names a runtime this agent does not know."""

    reason = "unsupported-runtime"


class ModelLoadError(AgentError):
    """The runtime cannot load the model file, or the manifest does not describe that model."""

    reason = "model-load"


class InputError(AgentError):
    """The caller sent inputs with the wrong names, shapes or values (names input and problem)."""

    reason = "bad-input"


class InferenceError(AgentError):
    """The runtime failed while running a request it had accepted."""

    reason = "inference-failed"


class NoModel(AgentError):
    """No committed model is installed yet (or none could be loaded)."""

    reason = "no-model"


# --------------------------------------------------------------------------- agent core
# Errors of the agent's own machinery: configuration, the state directory and model updates.
# Listed in ``__all__`` below (appended, so the classes above keep their order).

__all__ += [
    "ConfigError",
    "GoldenMissing",
    "NothingToRollBack",
    "SelfTestFailed",
    "StateError",
    "StateLocked",
    "UpdateInProgress",
    "UpdateRefused",
]


class ConfigError(AgentError):
    """The agent's configuration file is unreadable, has an unknown key or a wrong type."""

    reason = "config"


class StateError(AgentError):
    """The state directory cannot be read or written (``state.json`` unreadable, I/O error)."""

    reason = "state"


class StateLocked(StateError):
    """Another agent process owns the state directory (the service is running)."""

    reason = "state-locked"


class UpdateInProgress(AgentError):
    """An update is already running or waiting for its health window to finish."""

    reason = "update-in-progress"


class UpdateRefused(AgentError):
    """An update was refused before it touched the serving model; ``reason`` says why.

    The reason is the one of the underlying failure (``bad-signature``, ``rollback``,
    ``selftest-failed``, ``disk-full``...), so telemetry sees the same codes whichever layer
    failed.
    """

    reason = "update-refused"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class SelfTestFailed(AgentError):
    """The candidate model's outputs on its golden set are outside the tolerance."""

    reason = "selftest-failed"


class GoldenMissing(SelfTestFailed):
    """The bundle has no ``golden.npz`` and the configuration requires one."""

    reason = "no-golden"


class NothingToRollBack(AgentError):
    """A rollback was asked for, but there is no previous model to go back to."""

    reason = "no-previous"
