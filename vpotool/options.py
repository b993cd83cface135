"""``option=value`` lists of the command line (``--model-options``, ``--reward-options``, ``--judge-options``) into
typed values, checked against the options each entry declares; and the options tables of docs/, rendered from the
same declarations (``python -m vpotool.options`` rewrites them)."""

from __future__ import annotations

from dataclasses import dataclass

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
    """``"a=1,b=none"`` -> ``{"a": 1, "b": None}``. Items without ``=`` after ``key=value`` continue that value as a
    list: ``"steps=1000,600,300,shift=5"`` -> ``{"steps": [1000, 600, 300], "shift": 5}``. A first item without
    ``=`` is a ``VpoError`` naming ``flag``."""
    out: dict = {}
    last = None
    for item in (i.strip() for i in (text or "").split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq and last is not None:  # the next element of a list value
            out[last] = [*(out[last] if isinstance(out[last], list) else [out[last]]), parse_value(item)]
            continue
        if not (eq and key.strip()):
            raise VpoError(f"{flag}: '{item}' should look like option=value, e.g. {example}")
        last = key.strip()
        out[last] = parse_value(value.strip())
    return out


BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def typed_value(flag: str, name: str, value, default):
    """Option ``name``'s parsed ``value`` checked against the type of its ``default``: a boolean option takes
    true/false, yes/no, on/off or 1/0 (a bare word would otherwise read as true); a number option takes a number
    or none; a list option (a tuple default) takes numbers, and only it takes several values. Anything else is a
    ``VpoError`` naming ``flag`` and the option, not a failure at first use."""
    if isinstance(default, tuple):  # a list option: numbers, from a,b,c on the command line or a YAML list
        items = [parse_value(v.strip()) for v in value.split(",")] if isinstance(value, str) else value
        items = list(items) if isinstance(items, list | tuple) else [items]
        if not items or any(isinstance(v, bool) or not isinstance(v, int | float) for v in items):
            raise VpoError(f"{flag}: {name} takes numbers joined by commas, e.g. {name}={','.join(map(str, default))}"
                           f", got '{value}'")  # fmt: skip
        return tuple(items)
    if isinstance(value, list | tuple):
        raise VpoError(f"{flag}: {name} takes one value, got the list {','.join(map(str, value))} (only list options "
                       "such as self-forcing's denoising_steps take several)")  # fmt: skip
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


@dataclass(frozen=True)
class Option:
    """One option a reward or judge takes: its ``default``, its type (``kind``; default the default's type), the
    smallest number it takes (``minimum``), the words it takes (``choices``) and a one-line ``help``."""

    default: object
    help: str = ""
    kind: type | None = None
    minimum: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def type_name(self) -> str:
        kind = self.kind or (type(self.default) if self.default is not None else str)
        return {bool: "bool", int: "int", float: "float", tuple: "numbers"}.get(kind, "text")


def typed_option(flag: str, name: str, value, option: Option):
    """``value`` of option ``name`` checked against its declaration (type, minimum, choices); anything else is a
    ``VpoError`` naming ``flag``, the option and what it takes."""
    if value is None:
        return None
    kind = option.kind or (type(option.default) if option.default is not None else None)
    if kind in (bool, int, float):
        example = {bool: False, int: 0, float: 0.0}[kind]
        value = typed_value(flag, name, value, example)
        if kind is int and isinstance(value, float):
            raise VpoError(f"{flag}: {name} takes a whole number, got '{value:g}'")
    if option.minimum is not None and value is not None and value < option.minimum:
        raise VpoError(f"{flag}: {name} takes a number >= {option.minimum:g}, got '{value:g}'")
    if option.choices and value not in option.choices:
        raise VpoError(f"{flag}: {name} takes one of {', '.join(option.choices)}, got '{value}'")
    return value


def check_declared(flag: str, owner: str, given: dict, table: dict[str, Option]) -> dict:
    """``given`` options of ``owner`` (e.g. ``reward clip``) checked against its declared ``table``: an option it
    lacks is a ``VpoError`` listing those it takes; each value is checked by :func:`typed_option`."""
    unknown = sorted(set(given) - set(table))
    if unknown:
        takes = f"it takes {', '.join(table)}" if table else "it takes none"
        raise VpoError(f"{flag}: {owner} has no option {', '.join(unknown)}; {takes}")
    return {k: typed_option(flag, k, v, table[k]) for k, v in given.items()}


def options_table(table: dict[str, Option]) -> list[tuple[str, str, str, str]]:
    """``(option, type, default, help)`` rows of a declared table, as docs/ prints them."""
    rows = []
    for name, o in table.items():
        kind = o.type_name + (f" >= {o.minimum:g}" if o.minimum is not None else "")
        kind = " / ".join(o.choices) if o.choices else kind
        rows.append((name, kind, shown(o.default), o.help))
    return rows


def shown(default) -> str:
    """An option's default as typed on the command line: ``none``, ``true``, ``1000,750,500,250``, ``0.05``."""
    if default is None or default == "":
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple | list):
        return ",".join(map(str, default))
    return str(default)
