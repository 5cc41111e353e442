"""API tokens: who may call the controller's REST API, and the name the audit log records.

Tokens are bearer secrets (``Authorization: Bearer TOKEN``), each with a name: the name is the
*actor* of every rollout action taken with it, so the audit log says which operator or which
CI job paused a rollout. A request without credentials is answered 401, one with a token the
controller does not know 403. Comparisons are constant-time.

The dashboard runs in a browser, which cannot add a header to a page load: a token given once
(``/dashboard?token=...``) is exchanged for a cookie holding a keyed hash of the token, so
the token itself is neither stored by the browser nor repeated in later URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from edgekit.fleet.errors import SpecError

__all__ = ["COOKIE_NAME", "MIN_TOKEN_LENGTH", "TOKEN_ENV", "TokenRing"]

TOKEN_ENV = "EDGEKIT_FLEET_TOKEN"
COOKIE_NAME = "edgekit_session"
#: 16 characters of a random token are ~96 bits: far beyond guessing over HTTP.
MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_SESSION_CONTEXT = b"edgekit fleet dashboard session v1"


class TokenRing:
    """Named tokens. ``authenticate`` returns the name, or ``None`` for an unknown token."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        if not tokens:
            raise SpecError(
                f"the controller needs at least one API token (--token, {TOKEN_ENV} "
                "or --token-file)"
            )
        for name, token in tokens.items():
            if not _NAME.fullmatch(name):
                raise SpecError(f"token name {name!r} is not [A-Za-z0-9._@-] (max 64)")
            if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                raise SpecError(
                    f"token {name!r} must be at least {MIN_TOKEN_LENGTH} characters without spaces"
                )
        self._tokens = {name: token.encode("utf-8") for name, token in tokens.items()}

    @classmethod
    def load(
        cls, *, token: str | None = None, token_file: str | os.PathLike[str] | None = None
    ) -> TokenRing:
        """From a single token (named ``operator``) and/or a file of ``NAME TOKEN`` lines
        (or a JSON object name -> token); ``#`` starts a comment."""
        tokens: dict[str, str] = {}
        if token_file is not None:
            text = Path(token_file).read_text(encoding="utf-8")
            if text.lstrip().startswith("{"):
                data = json.loads(text)
                if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
                    raise SpecError(f"{token_file}: a JSON token file maps names to strings")
                tokens.update(data)
            else:
                for number, line in enumerate(text.splitlines(), 1):
                    line = line.split("#", 1)[0].strip()
                    if not line:
                        continue
                    parts = line.replace(":", " ", 1).split()
                    if len(parts) != 2:
                        raise SpecError(f"{token_file}:{number}: expected NAME TOKEN")
                    tokens[parts[0]] = parts[1]
        if token:
            tokens.setdefault("operator", token)
        return cls(tokens)

    @property
    def names(self) -> list[str]:
        return sorted(self._tokens)

    def authenticate(self, token: str) -> str | None:
        given = token.encode("utf-8")
        found = None
        for name, expected in self._tokens.items():
            if hmac.compare_digest(given, expected):  # no early exit: constant work per token
                found = name
        return found

    def session_value(self, name: str) -> str:
        digest = hmac.new(self._tokens[name], _SESSION_CONTEXT, hashlib.sha256).hexdigest()
        return f"{name}:{digest}"

    def from_session(self, value: str) -> str | None:
        name, _, digest = value.partition(":")
        if name not in self._tokens or not digest:
            return None
        expected = self.session_value(name).partition(":")[2]
        return name if hmac.compare_digest(digest.encode(), expected.encode()) else None
