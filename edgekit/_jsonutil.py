"""Strict JSON for signed documents.

Signed documents are verified over their exact bytes, but they are still *parsed* afterwards, and
two parsers that disagree about a document are an attack surface (duplicate keys are the classic:
one reader takes the first value, another the last). So every document edgekit trusts is parsed
here: UTF-8 only, an object at the top, no duplicate keys, no NaN/Infinity, a size limit.
"""

from __future__ import annotations

import json
from typing import Any

from edgekit.errors import Malformed, TooLarge

__all__ = ["dumps", "loads_strict"]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise Malformed(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise Malformed(f"JSON constant {name} is not allowed")


def loads_strict(data: bytes, *, what: str, max_size: int) -> dict[str, Any]:
    """Parse ``data`` as a strict JSON object; ``what`` names the document in errors."""
    if len(data) > max_size:
        raise TooLarge(f"{what} is {len(data)} bytes, the limit is {max_size}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed(f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except Malformed as exc:
        raise Malformed(f"{what}: {exc.message}") from None
    except (ValueError, RecursionError) as exc:
        raise Malformed(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise Malformed(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def dumps(value: Any) -> bytes:
    """Serialize for writing: stable key order, readable indentation, trailing newline."""
    return (
        json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")
