"""Shared pieces of the ``edgekit`` CLI: parameter types, passphrases, error reporting.

Parameter types convert and validate once (click's ``ParamType``), so every bad argument is
reported the same way, before any work starts.
"""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

from edgekit.errors import EdgekitError, Malformed, VerificationError
from edgekit.manifest import parse_time

__all__ = [
    "PASSPHRASE_ENV",
    "EdgekitGroup",
    "ExpiresType",
    "NonNegativeInt",
    "RuntimeType",
    "passphrase_provider",
]

#: Read when a private key is encrypted and no --passphrase-env was named.
PASSPHRASE_ENV = "EDGEKIT_KEY_PASSPHRASE"


class EdgekitGroup(click.Group):
    """A group that turns edgekit's typed errors into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VerificationError as exc:
            click.echo(f"REJECTED [{exc.reason}]: {exc.message}", err=True)
            ctx.exit(1)
        except EdgekitError as exc:
            click.echo(f"error [{exc.reason}]: {exc.message}", err=True)
            ctx.exit(1)
        except FileExistsError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


class NonNegativeInt(click.ParamType):  # type: ignore[type-arg]
    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value), 10)
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        if number < 0:
            self.fail(f"{number} is negative", param, ctx)
        return number


_DURATION = re.compile(r"(\d+)([dhm])")


class ExpiresType(click.ParamType):  # type: ignore[type-arg]
    """``2027-01-01T00:00:00Z`` or a duration from now such as ``90d``, ``12h``, ``30m``."""

    name = "timestamp|duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        if isinstance(value, datetime):
            return value
        text = str(value).strip()
        match = _DURATION.fullmatch(text)
        if match:
            amount, unit = int(match.group(1)), match.group(2)
            delta = {
                "d": timedelta(days=amount),
                "h": timedelta(hours=amount),
                "m": timedelta(minutes=amount),
            }[unit]
            return datetime.now(timezone.utc).replace(microsecond=0) + delta
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            text += "T00:00:00Z"
        try:
            return parse_time(text, what="--expires")
        except Malformed as exc:
            self.fail(f"{exc.message} (or a duration such as 90d)", param, ctx)


class RuntimeType(click.Choice):  # type: ignore[type-arg]
    """``onnx`` is accepted as a short name for ``onnxruntime``."""

    def __init__(self) -> None:
        super().__init__(["onnx", "onnxruntime", "tflite"], case_sensitive=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        chosen = str(super().convert(value, param, ctx)).lower()
        return "onnxruntime" if chosen == "onnx" else chosen


def passphrase_provider(env_name: str | None) -> Any:
    """Return a callable that finds a key's passphrase: env var first, then a prompt on a tty."""

    def provide(path: Path) -> bytes | None:
        name = env_name or PASSPHRASE_ENV
        value = os.environ.get(name)
        if value:
            return value.encode("utf-8")
        if env_name:
            raise click.UsageError(f"--passphrase-env names {env_name}, which is not set")
        if sys.stdin.isatty():
            return click.prompt(f"Passphrase for {path}", hide_input=True).encode("utf-8")
        raise click.UsageError(
            f"{path} is encrypted: set {PASSPHRASE_ENV} or run on a terminal to be prompted"
        )

    return provide
