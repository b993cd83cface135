"""The queue of comparisons that ``vpotool label`` shows people and ``label --judge`` gives a judge: pairs of
candidate videos of one prompt, each pair once, in a fixed order."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from vpotool.errors import VpoError


@dataclass(frozen=True)
class Item:
    """One comparison: two samples of one prompt in the order they are shown (left, right)."""

    item_id: str
    prompt_id: str
    prompt: str
    left_id: str
    right_id: str


def make_item(a: dict, b: dict) -> Item:
    """The item comparing sample rows ``a`` and ``b``. Its id names the unordered pair; which sample is shown left
    follows a hash of that id, so it is the same on every run and machine, yet each side gets about half of the
    samples of any one origin (e.g. the chosen ones of a pairs manifest), and position bias averages out."""
    first, second = sorted((a, b), key=lambda s: s["sample_id"])
    item_id = f"{first['sample_id']}|{second['sample_id']}"
    if hashlib.sha256(item_id.encode()).digest()[0] % 2:
        first, second = second, first
    return Item(item_id, first["prompt_id"], first["prompt"], first["sample_id"], second["sample_id"])


def build_queue(samples: list[dict], pairs: list[dict] | None = None) -> list[Item]:
    """The items to label, in order, from rows of a samples manifest.

    With ``pairs`` (rows of a pairs manifest): each pair's two samples, in the manifest's order, each two samples
    once. Otherwise every two candidates of each prompt, round-robin over prompts (the first pair of every
    prompt, then the second, ...), so a person who stops early has still covered many prompts.
    """
    by_id = {s["sample_id"]: s for s in samples}
    if pairs is not None:
        items: dict[str, Item] = {}
        for p in pairs:
            for sid in (p["chosen_id"], p["rejected_id"]):
                if sid not in by_id:
                    raise VpoError(
                        f"--pairs: pair {p['pair_id']} holds sample {sid}, which is not in --samples; pass the "
                        "samples manifest the pairs were made from"
                    )
            item = make_item(by_id[p["chosen_id"]], by_id[p["rejected_id"]])
            items.setdefault(item.item_id, item)
        return list(items.values())
    by_prompt: dict[str, list[dict]] = {}
    for s in sorted(samples, key=lambda s: (s["prompt_id"], s["candidate"], s["sample_id"])):
        by_prompt.setdefault(s["prompt_id"], []).append(s)
    ranked = [
        (rank, pid, make_item(a, b))
        for pid, group in by_prompt.items()
        for rank, (a, b) in enumerate(itertools.combinations(group, 2))
    ]
    return [item for _, _, item in sorted(ranked, key=lambda r: r[:2])]
