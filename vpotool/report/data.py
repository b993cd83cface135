"""What a report shows, gathered from disk: find the manifests of a run folder (or take one manifest), read them,
and join pairs and samples with every reward dimension of their scores into JSON-ready gallery items."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa

from vpotool.config import load_yaml
from vpotool.errors import VpoError
from vpotool.manifest import manifest_config, manifest_kind, read_manifest, resolve, score_dimensions

# Config files the stages write next to their outputs, most telling first.
CONFIG_FILES = ("loop.yaml", "train-dpo.yaml", "train-refl.yaml", "train-scst.yaml")
USAGE = "pass a run folder (from `vpotool loop` or a trainer), a pairs manifest, or a samples manifest with --scores"


@dataclass
class Source:
    """One gallery manifest (pairs or samples), the scores it joins with, and its loop iteration (None outside)."""

    manifest: Path
    scores: Path | None = None
    iteration: int | None = None


@dataclass
class Inputs:
    """The files one report is made of."""

    title: str
    config: dict = field(default_factory=dict)
    metrics: Path | None = None
    eval: Path | None = None
    pairs: list[Source] = field(default_factory=list)
    samples: list[Source] = field(default_factory=list)


def find_inputs(path: str | Path, scores: str | Path | None = None) -> Inputs:
    """The manifests under a run folder (top level, ``iter-NNNN/`` and ``eval/``), or one given manifest (pairs,
    samples, metrics or eval) with its ``scores`` (default: a ``scores.parquet`` beside it)."""
    path = Path(path)
    if not path.exists():
        raise VpoError(f"{path} not found; {USAGE}")
    if path.is_dir():
        if scores:
            raise VpoError("--scores is for a single pairs or samples manifest; a run folder's scores are found in it")
        return _folder(path)
    try:
        kind = manifest_kind(path)
    except (pa.ArrowInvalid, OSError):
        kind = None
    scores = Path(scores) if scores else _file(path.with_name("scores.parquet"))
    config = manifest_config(read_manifest(path, kind)) if kind in ("pairs", "samples", "metrics", "eval") else {}
    inputs = Inputs(title=path.name, config={k: v for k, v in config.items() if k != "_resume"})
    if kind == "pairs":
        inputs.pairs.append(Source(path, scores))
    elif kind == "samples":
        if scores is None:
            raise VpoError(f"{path} needs its scores: pass --scores scores.parquet (written by `vpotool score`)")
        inputs.samples.append(Source(path, scores))
    elif kind in ("metrics", "eval"):
        setattr(inputs, kind, path)
    elif kind == "scores":
        raise VpoError(f"{path} is a scores manifest; report its samples: `vpotool report SAMPLES --scores {path}`")
    else:
        what = f"a {kind} manifest" if kind else "not a vpotool manifest"
        raise VpoError(f"{path} is {what}, which report does not show; {USAGE}")
    return inputs


def _file(path: Path) -> Path | None:
    return path if path.is_file() else None


def _folder(folder: Path) -> Inputs:
    inputs = Inputs(title=folder.resolve().name)
    iters = [(int(d.name[5:]), d) for d in sorted(folder.glob("iter-*")) if re.fullmatch(r"iter-\d+", d.name)]
    for iteration, d in [(None, folder), *iters]:
        scores = _file(d / "scores.parquet")
        if (d / "pairs.parquet").is_file():
            inputs.pairs.append(Source(d / "pairs.parquet", scores, iteration))
        elif (d / "samples.parquet").is_file() and scores:
            inputs.samples.append(Source(d / "samples.parquet", scores, iteration))
    inputs.metrics = _file(folder / "metrics.parquet")
    inputs.eval = _file(folder / "eval" / "eval.parquet") or _file(folder / "eval.parquet")
    if not (inputs.metrics or inputs.eval or inputs.pairs or inputs.samples):
        raise VpoError(
            f"{folder} has nothing to report: no metrics.parquet, eval/eval.parquet, pairs.parquet or samples.parquet "
            f"with scores.parquet (in it or in iter-NNNN/); {USAGE}"
        )
    config_file = next((folder / n for n in CONFIG_FILES if (folder / n).is_file()), None)
    if config_file:
        inputs.config = load_yaml(str(config_file))
    elif inputs.metrics:
        inputs.config = manifest_config(read_manifest(inputs.metrics, "metrics"))
    inputs.config.pop("_resume", None)
    return inputs


def clean(v):
    """A JSON-safe value: NaN and infinities become None (JSON has no NaN)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def load_scores(path: Path | None) -> dict[str, dict[str, float]]:
    """``sample_id -> {dimension: value}`` over every reward in a scores manifest, ``overall`` first. With several
    rewards in the file, dimensions are named ``reward.dimension``."""
    if path is None:
        return {}
    rows = read_manifest(path, "scores", "--scores").to_pylist()
    several = len({r["reward"] for r in rows}) > 1
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        dims = {k: v for k, v in score_dimensions(r).items() if clean(v) is not None}
        prefix = f"{r['reward']}." if several else ""
        ordered = sorted(dims, key=lambda k: (k != "overall", k))
        out.setdefault(r["sample_id"], {}).update({prefix + k: dims[k] for k in ordered})
    return out


def video_linker(manifest: Path, out_dir: Path) -> Callable[[str], str | None]:
    """A function taking a manifest's video path to a URL relative to ``out_dir`` (where the page lives), so the
    run folder and its report can move together. Empty paths (no video) and missing files give None."""
    base = Path(out_dir).resolve()

    def link(rel: str) -> str | None:
        path = resolve(manifest, rel) if rel else None
        return quote(Path(os.path.relpath(path, base)).as_posix()) if path and path.is_file() else None

    return link


def pair_items(rows: list[dict], scores: dict, link: Callable, iteration: int | None = None) -> list[dict]:
    """Gallery items of pairs manifest rows: the chosen and rejected videos with every score dimension (from
    ``scores``; the pair's own score when a sample has none) and the margin."""
    items = []
    for r in rows:
        videos = []
        for side in ("chosen", "rejected"):
            sid = r[f"{side}_id"]
            own = {r["dimension"]: r[f"{side}_score"]}
            videos.append(
                dict(label=side, id=sid, video=link(r[f"{side}_video"]), score=clean(r[f"{side}_score"]),
                     scores={k: clean(v) for k, v in (scores.get(sid) or own).items()})
            )  # fmt: skip
        note = f"by {r['source']} {r['dimension']}"
        items.append(dict(id=r["pair_id"], prompt=r["prompt"], iteration=iteration, margin=clean(r["margin"]),
                          note=note, videos=videos))  # fmt: skip
    return items


def candidate_items(rows: list[dict], scores: dict, link: Callable, iteration=None, by: str = "overall") -> list[dict]:
    """Gallery items of samples manifest rows, one per prompt: its candidates ranked by score dimension ``by``
    (best first; unscored last), and the margin between the best and the worst."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt_id"], []).append(r)
    items = []
    for pid, group in groups.items():
        videos = [
            dict(id=r["sample_id"], video=link(r["video"]), candidate=r["candidate"],
                 score=clean(scores.get(r["sample_id"], {}).get(by)), scores=scores.get(r["sample_id"], {}))
            for r in group
        ]  # fmt: skip
        videos.sort(key=lambda v: (v["score"] is None, -(v["score"] or 0.0), v["candidate"]))
        for rank, v in enumerate(videos, 1):
            v["label"] = f"#{rank} · candidate {v.pop('candidate')}"
        known = [v["score"] for v in videos if v["score"] is not None]
        margin = max(known) - min(known) if known else None
        note = f"{len(videos)} candidates · ranked by {by}"
        items.append(dict(id=pid, prompt=group[0]["prompt"], iteration=iteration, margin=margin, note=note,
                          videos=videos))  # fmt: skip
    return items


def gallery(inputs: Inputs, out_dir: Path) -> tuple[str, list[dict]]:
    """``(kind, items)`` of the report's gallery: ``"pairs"`` when there are pairs manifests, else ``"candidates"``
    of the samples manifests (empty when neither)."""
    kind, sources = ("pairs", inputs.pairs) if inputs.pairs else ("candidates", inputs.samples)
    make = pair_items if kind == "pairs" else candidate_items
    items = []
    for s in sources:
        rows = read_manifest(s.manifest, "pairs" if kind == "pairs" else "samples").to_pylist()
        items += make(rows, load_scores(s.scores), video_linker(s.manifest, out_dir), s.iteration)
    return kind, items
