"""The ``pair`` stage: preference pairs (chosen, rejected) per prompt from scores -> pairs.parquet."""

from __future__ import annotations

import math
import os
from pathlib import Path

from vpotool.config import PairConfig, save_config
from vpotool.errors import VpoError
from vpotool.manifest import read_manifest, resolve, write_manifest


def select_pairs(scored: list[tuple[str, float]], strategy: str, min_margin: float) -> list[tuple[int, int]]:
    """Indices ``(chosen, rejected)`` among one prompt's ``(sample_id, score)`` list.

    best-worst: the highest against the lowest; all: every ordered pair. Either way only pairs whose score
    difference is positive and at least ``min_margin`` are kept.
    """
    if len(scored) < 2:
        return []
    if strategy == "best-worst":
        hi = max(range(len(scored)), key=lambda i: scored[i][1])
        lo = min(range(len(scored)), key=lambda i: scored[i][1])
        candidates = [(hi, lo)]
    else:
        candidates = [(i, j) for i in range(len(scored)) for j in range(len(scored)) if i != j]
    margin = max(min_margin, 0.0)
    return [(i, j) for i, j in candidates if scored[i][1] - scored[j][1] > 0 and scored[i][1] - scored[j][1] >= margin]


def reward_rows(scores: list[dict], reward: str | None, dimension: str, path: Path, dimension_flag: str):
    """``(reward name, its rows)`` of a scores manifest: ``reward``, or the only one there; its rows must hold
    ``dimension``. Ambiguity and absence stop with one line naming ``--reward`` or ``dimension_flag``."""
    rewards = sorted({r["reward"] for r in scores})
    if not rewards:
        raise VpoError(f"{path} has no scores; run `vpotool score` first")
    name = reward or (rewards[0] if len(rewards) == 1 else None)
    if name is None:
        raise VpoError(f"{path} holds several rewards ({', '.join(rewards)}); choose one with --reward")
    if name not in rewards:
        raise VpoError(f"{path} has no scores of reward '{name}' (--reward); it has: {', '.join(rewards)}")
    rows = [r for r in scores if r["reward"] == name]
    dims = sorted(k for k, v in rows[0].items() if k not in ("sample_id", "prompt_id", "reward") and v is not None)
    if dimension not in dims:
        known = ", ".join(dims)
        raise VpoError(f"reward '{name}' has no dimension '{dimension}'; choose {dimension_flag} from: {known}")
    return name, rows


def run_pair(cfg: PairConfig) -> Path:
    """Write ``cfg.out``: one row per preference pair, with scores, margin and paths to both videos and latents
    (relative to the pairs manifest's folder, so ``train-dpo`` needs nothing else)."""
    samples_path, scores_path, out = Path(cfg.samples), Path(cfg.scores), Path(cfg.out)
    samples = {r["sample_id"]: r for r in read_manifest(samples_path, "samples", "--samples").to_pylist()}
    scores = read_manifest(scores_path, "scores", "--scores").to_pylist()
    reward, rows = reward_rows(scores, cfg.reward, cfg.dimension, scores_path, "--dimension")
    by_prompt: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        value = r[cfg.dimension]
        if value is None or not math.isfinite(value):
            raise VpoError(
                f"{scores_path}: sample {r['sample_id']} has a non-finite {cfg.dimension} score ({value}); "
                f"rescore it with `vpotool score` or drop its row"
            )
        if r["sample_id"] not in samples:
            raise VpoError(
                f"{scores_path} scores sample {r['sample_id']}, which is not in {samples_path}; "
                f"pass the samples manifest these scores were made from"
            )
        by_prompt.setdefault(r["prompt_id"], []).append((r["sample_id"], value))

    def rel(sample: dict, column: str) -> str:
        return os.path.relpath(resolve(samples_path, sample[column]), out.resolve().parent)

    pairs = []
    for pid, scored in sorted(by_prompt.items()):
        scored.sort()
        for i, j in select_pairs(scored, cfg.strategy, cfg.min_margin):
            c, r = samples[scored[i][0]], samples[scored[j][0]]
            pairs.append(
                dict(
                    pair_id=f"{c['sample_id']}>{r['sample_id']}", prompt_id=pid, prompt=c["prompt"],
                    chosen_id=c["sample_id"], rejected_id=r["sample_id"], chosen_score=scored[i][1],
                    rejected_score=scored[j][1], margin=scored[i][1] - scored[j][1],
                    dimension=cfg.dimension, source=reward, chosen_video=rel(c, "video"),
                    rejected_video=rel(r, "video"), chosen_latent=rel(c, "latent"), rejected_latent=rel(r, "latent"),
                )
            )  # fmt: skip
    if not pairs:
        raise VpoError(
            "no pairs: every prompt needs at least 2 scored candidates whose scores differ by more than "
            f"--min-margin {cfg.min_margin}; sample more --candidates or lower --min-margin"
        )
    save_config(cfg, out.with_name("pair.yaml"))
    write_manifest(out, pairs, "pairs", cfg.to_dict())
    return out
