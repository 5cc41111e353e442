from __future__ import annotations

import pytest

from device_agent import errors
from device_agent.errors import (
    AgentError,
    InferenceError,
    InputError,
    ModelLoadError,
    RuntimeUnavailable,
    UnsupportedRuntime,
)


@pytest.mark.parametrize(
    "cls", [RuntimeUnavailable, UnsupportedRuntime, ModelLoadError, InputError, InferenceError]
)
def test_every_error_is_an_agent_error_with_its_own_reason(cls: type[AgentError]) -> None:
    assert issubclass(cls, AgentError)
    assert cls.reason != AgentError.reason
    assert cls.__name__ in errors.__all__


def test_reasons_are_unique() -> None:
    classes = [getattr(errors, name) for name in errors.__all__]
    reasons = [cls.reason for cls in classes]
    assert len(set(reasons)) == len(reasons)


def test_messages_are_one_line() -> None:
    err = InferenceError("runtime failed:\n  node 3\tbroke  ")
    assert str(err) == "runtime failed: node 3 broke"
    assert err.message == str(err)
    assert AgentError("").message == "agent-error"
