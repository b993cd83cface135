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
