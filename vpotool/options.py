"""``option=value`` lists of the command line (``--model-options``, ``--reward-options``) into typed values."""

from __future__ import annotations

from vpotool.errors import VpoError


def parse_value(text: str):
    """``"16"`` -> 16, ``"0.5"`` -> 0.5, ``"true"``/``"false"``/``"none"`` -> True/False/None, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_pairs(text: str | None, flag: str, example: str) -> dict:
    """``"a=1,b=none"`` -> ``{"a": 1, "b": None}``; an item without ``=`` is a ``VpoError`` naming ``flag``."""
    out = {}
    for item in (i.strip() for i in (text or "").split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not (eq and key.strip()):
            raise VpoError(f"{flag}: '{item}' should look like option=value, e.g. {example}")
        out[key.strip()] = parse_value(value.strip())
    return out


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def typed_value(flag: str, name: str, value, default):
    """Option ``name``'s parsed ``value`` checked against the type of its ``default``: a boolean option takes
    true/false, yes/no, on/off or 1/0 (a bare word would otherwise read as true); a number option takes a number
    or none. Anything else is a ``VpoError`` naming ``flag`` and the option, not a failure at first use."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
            return BOOLEAN_WORDS[value.lower()]
        raise VpoError(f"{flag}: {name} takes true or false (or yes/no, on/off, 1/0), got '{value}'")
    if isinstance(default, int | float):
        if value is None or (isinstance(value, int | float) and not isinstance(value, bool)):
            return value if value is None or isinstance(default, int) else float(value)
        raise VpoError(f"{flag}: {name} takes a number or none, got '{value}'")
    return value
