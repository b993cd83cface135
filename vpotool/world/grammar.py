"""The tiny world's prompt grammar: one coloured shape moving in one direction at one speed on a plain background.

``"a red circle moving left slowly on a black background"``. Every combination has a stable id
(``red-circle-left-slow-black``); some (colour, shape, direction) triples never appear in training and form the
held-out split, so evaluation asks for combinations of seen words the model was never shown together. Alignment
gets its own split of the training prompts: ``val`` (60 drawn once) is never trained on by the loop, which aligns
on the rest (``align``), so its comparison measures prompts of the distribution it aligned on but did not see.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from vpotool.errors import VpoError

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.22),
    "blue": (0.15, 0.32, 0.95),
    "yellow": (0.96, 0.88, 0.12),
    "cyan": (0.10, 0.85, 0.90),
    "magenta": (0.90, 0.15, 0.85),
    "white": (0.96, 0.96, 0.96),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
# Fraction of the frame the shape crosses over the whole clip, whatever its length.
SPEEDS: dict[str, float] = {"slowly": 0.3, "quickly": 0.55}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.02, 0.02, 0.02),
    "gray": (0.45, 0.45, 0.45),
    "white": (0.98, 0.98, 0.98),
}
HELD_OUT_TRIPLES = 10  # of 7 x 3 x 4 = 84 (colour, shape, direction) triples
VAL_PROMPTS = 60  # of the 420 training prompts
SPLITS = ("train", "heldout", "all", "align", "val")

_PATTERN = re.compile(
    r"^\s*an? (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+) (?P<speed>\w+) on an? (?P<background>\w+) "
    r"background\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class WorldPrompt:
    color: str
    shape: str
    direction: str
    speed: str
    background: str

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} {self.speed} on a {self.background} background"

    @property
    def id(self) -> str:
        speed = "slow" if self.speed == "slowly" else "fast"
        return f"{self.color}-{self.shape}-{self.direction}-{speed}-{self.background}"


def parse_prompt(text: str) -> WorldPrompt:
    """The world prompt a text states; raises VpoError for text outside the grammar."""
    m = _PATTERN.match(text)
    if m is None:
        raise VpoError(
            f"'{text}' is not a tiny-world prompt; the world reward needs prompts like "
            "'a red circle moving left slowly on a black background' (use --prompts world:train)"
        )
    p = WorldPrompt(**{k: v.lower() for k, v in m.groupdict().items()})
    for value, known in ((p.color, COLORS), (p.shape, SHAPES), (p.direction, DIRECTIONS), (p.speed, SPEEDS)):
        if value not in known:
            raise VpoError(f"'{text}': unknown word '{value}' for the tiny world; known: {', '.join(known)}")
    if p.background not in BACKGROUNDS:
        raise VpoError(f"'{text}': unknown background '{p.background}'; known: {', '.join(BACKGROUNDS)}")
    return p


@lru_cache(maxsize=1)
def _held_out_triples() -> frozenset[tuple[str, str, str]]:
    triples = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    return frozenset(random.Random(0).sample(triples, HELD_OUT_TRIPLES))


@lru_cache(maxsize=1)
def _val_ids() -> frozenset[str]:
    train = _split_prompts("train")
    return frozenset(p.id for p in random.Random(1).sample(train, VAL_PROMPTS))


def world_prompts(split: str = "train") -> list[WorldPrompt]:
    """Every prompt of the grammar in ``split``, in a fixed order: ``train`` (the pretraining prompts),
    ``heldout`` (unseen colour-shape-direction triples), ``all``, or alignment's split of ``train``: ``val`` (60
    prompts the loop never trains on) and ``align`` (the other 360).

    A shape never shares its background's colour (no white shape on white)."""
    if split not in SPLITS:
        raise VpoError(f"unknown world split '{split}'; choose {', '.join(SPLITS)}")
    if split in ("align", "val"):
        val = _val_ids()
        return [p for p in _split_prompts("train") if (p.id in val) == (split == "val")]
    return _split_prompts(split)


def _split_prompts(split: str) -> list[WorldPrompt]:
    held = _held_out_triples()
    out = []
    for c in COLORS:
        for s in SHAPES:
            for d in DIRECTIONS:
                for v in SPEEDS:
                    for b in BACKGROUNDS:
                        if c == b:
                            continue
                        if split == "all" or ((c, s, d) in held) == (split == "heldout"):
                            out.append(WorldPrompt(c, s, d, v, b))
    return out
