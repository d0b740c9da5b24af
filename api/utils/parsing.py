"""Parsing of the plain words people type into settings, forms and query strings."""

from __future__ import annotations

from api.exceptions import InvalidInput

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def bool_word(raw: str) -> bool | None:
    """True/False for the usual spellings, None for anything else (the caller names the error)."""
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    return None


def bool_param(name: str, raw: str | None, default: bool) -> bool:
    """A yes/no request parameter: the default when absent or empty, 400 naming it when unreadable."""
    if raw is None or raw.strip() == "":
        return default
    value = bool_word(raw)
    if value is None:
        raise InvalidInput(f"{name} must be true or false, got {raw!r}", parameter=name)
    return value
