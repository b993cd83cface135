"""The ``pair`` stage: preference pairs (chosen, rejected) per prompt from scores and/or people's labels ->
pairs.parquet."""

from __future__ import annotations

import math
import os
from pathlib import Path

from vpotool.config import PairConfig, save_config
from vpotool.errors import VpoError
from vpotool.manifest import manifest_config, read_manifest, remove_stale_temps, resolve, reward_rows, write_manifest
from vpotool.stages.common import output_file, writer_lock

LABEL_CHOICES = ("left", "right", "tie", "skip")  # the answers of `vpotool label`
PATHS = ("video", "latent")


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
    return [
        (i, j)
        for i, j in candidates
        if scored[i][0] != scored[j][0] and scored[i][1] - scored[j][1] > 0 and scored[i][1] - scored[j][1] >= margin
    ]  # never a sample against itself (a row listed twice)


def tally_labels(labels: list[dict]) -> list[dict]:
    """Human preferences from label rows (``vpotool label``): the votes on each unordered pair of samples.

    ``left``/``right`` is a vote for that sample, ``tie`` a vote for neither, ``skip`` no vote. A pair whose two
    samples got different numbers of votes gives one preference: the sample with more is chosen;
    ``chosen_score`` and ``rejected_score`` are the fractions of the pair's votes (ties included) each got and
    ``margin`` is their difference, so one labeller, or several who agree, give margin 1.0. Returns dicts with
    ``prompt_id``, ``chosen_id``, ``rejected_id``, ``chosen_score``, ``rejected_score`` and ``margin``, sorted by
    prompt and sample ids.
    """
    votes: dict[tuple[str, str], list[int]] = {}  # sorted ids -> [votes for the first, for the second, ties]
    prompts: dict[tuple[str, str], str] = {}
    for r in labels:
        if r["choice"] not in LABEL_CHOICES:
            raise VpoError(
                f"label {r['label_id']} has choice {r['choice']!r}, not one of {', '.join(LABEL_CHOICES)}; "
                "relabel it with `vpotool label` or drop its row"
            )
        if r["choice"] == "skip":
            continue
        key = tuple(sorted((r["left_id"], r["right_id"])))
        count = votes.setdefault(key, [0, 0, 0])
        winner = {"left": r["left_id"], "right": r["right_id"]}.get(r["choice"])
        count[2 if winner is None else key.index(winner)] += 1
        prompts[key] = r["prompt_id"]
    out = []
    for key, (first, second, ties) in sorted(votes.items(), key=lambda kv: (prompts[kv[0]], kv[0])):
        if first == second:
            continue
        n = first + second + ties
        (chosen, won), (rejected, lost) = sorted([(key[0], first), (key[1], second)], key=lambda x: -x[1])
        out.append(
            dict(prompt_id=prompts[key], chosen_id=chosen, rejected_id=rejected, chosen_score=won / n,
                 rejected_score=lost / n, margin=(won - lost) / n)
        )  # fmt: skip
    return out


def check_scored_samples(scores_table, scores_path: Path, samples_table, samples_path: Path) -> None:
    """Refuse scores made from other samples than ``samples_path``'s: run B's sample ids are run A's when both
    sampled the same prompts, so pairing by id would join B's videos with A's scores. ``score`` records the
    identity of the samples it scored (:func:`vpotool.stages.score.samples_identity`); files without it pass."""
    from vpotool.stages.score import samples_identity

    config = manifest_config(scores_table)
    recorded = config.get("_resume", {}).get("samples")
    if recorded and recorded != samples_identity(samples_table):
        made_from = f" ({config['samples']})" if config.get("samples") else ""
        raise VpoError(
            f"{scores_path} scores other samples{made_from} than {samples_path}; pass --samples the manifest these "
            f"scores were made from, or score {samples_path} with `vpotool score`"
        )


def score_pairs(cfg: PairConfig, samples: dict[str, dict], samples_table=None) -> list[dict]:
    """Reward preferences from ``cfg.scores``: per prompt, the pairs ``cfg.strategy`` selects above the margin.
    ``samples_table``: the samples manifest, to check that the scores were made from it."""
    scores_path, samples_path = Path(cfg.scores), Path(cfg.samples)
    table = read_manifest(scores_path, "scores", "--scores")
    if samples_table is not None:
        check_scored_samples(table, scores_path, samples_table, samples_path)
    scores = table.to_pylist()
    reward, rows = reward_rows(scores, cfg.reward, cfg.dimension, scores_path, "--dimension")
    seen: set[str] = set()
    by_prompt: dict[str, list[tuple[str, float]]] = {}
    for r in rows:
        if r["sample_id"] in seen:
            raise VpoError(
                f"{scores_path} holds sample {r['sample_id']} twice for reward {reward}; drop the repeated row "
                "(or rescore into a new --out)"
            )
        seen.add(r["sample_id"])
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
    pairs = []
    for pid, scored in sorted(by_prompt.items()):
        scored.sort()
        for i, j in select_pairs(scored, cfg.strategy, cfg.min_margin):
            (chosen, won), (rejected, lost) = scored[i], scored[j]
            pairs.append(
                dict(prompt_id=pid, chosen_id=chosen, rejected_id=rejected, chosen_score=won, rejected_score=lost,
                     margin=won - lost, dimension=cfg.dimension, source=reward, pair_id=f"{chosen}>{rejected}")
            )  # fmt: skip
    return pairs


def human_pairs(cfg: PairConfig, samples: dict[str, dict]) -> list[dict]:
    """Preferences from ``cfg.labels`` (see :func:`tally_labels`): people's with source ``human``, a pairwise
    judge's (``label --judge``) with source ``judge``; dimension ``votes``."""
    labels_path = Path(cfg.labels)
    labels = read_manifest(labels_path, "labels", "--labels").to_pylist()
    for r in labels:
        for side in ("left_id", "right_id"):
            if r[side] not in samples:
                raise VpoError(
                    f"{labels_path} labels sample {r[side]}, which is not in {cfg.samples}; pass the samples "
                    f"manifest these labels were made from (--samples)"
                )
    # A judge's rows (``label --judge``) carry a note; its votes are counted apart from people's, as source
    # "judge". The ":human" / ":judge" suffix keeps pair ids unique when the same two samples also form a reward pair.
    out = []
    for source in ("human", "judge"):
        rows = [r for r in labels if (r.get("note") is not None) == (source == "judge")]
        out += [
            {**p, "dimension": "votes", "source": source, "pair_id": f"{p['chosen_id']}>{p['rejected_id']}:{source}"}
            for p in tally_labels(rows)
        ]
    return out


def run_pair(cfg: PairConfig) -> Path:
    """Write ``cfg.out``: one row per preference pair from ``cfg.scores`` (source: the reward) and/or
    ``cfg.labels`` (source: ``human``), with scores, margin and paths to both videos and latents (relative to the
    pairs manifest's folder, so ``train-dpo`` needs nothing else)."""
    samples_path, out = Path(cfg.samples), output_file(cfg.out)
    for flag in ("samples", "scores", "labels"):
        given = getattr(cfg, flag)
        if given and Path(given).resolve() == out.resolve():
            raise VpoError(f"--out {out} is also --{flag}; write the pairs to a new file, e.g. pairs.parquet")
    samples_table = read_manifest(samples_path, "samples", "--samples")
    samples = {r["sample_id"]: r for r in samples_table.to_pylist()}
    found = (score_pairs(cfg, samples, samples_table) if cfg.scores else []) + (
        human_pairs(cfg, samples) if cfg.labels else []
    )

    def rel(sample: dict, column: str) -> str:
        return os.path.relpath(resolve(samples_path, sample[column]), out.resolve().parent)

    pairs = []
    for p in found:
        c, r = samples[p["chosen_id"]], samples[p["rejected_id"]]
        paths = {f"{side}_{col}": rel(s, col) for side, s in (("chosen", c), ("rejected", r)) for col in PATHS}
        pairs.append({**p, "prompt": c["prompt"], **paths})
    if not pairs:
        why = []
        if cfg.scores:
            why.append(
                "every prompt needs at least 2 scored candidates whose scores differ by more than --min-margin "
                f"{cfg.min_margin}; sample more --candidates or lower --min-margin"
            )
        if cfg.labels:
            why.append(f"{cfg.labels} holds no answer preferring one video (tie and skip give none); label more")
        raise VpoError("no pairs: " + "; and ".join(why))
    with writer_lock(out):
        remove_stale_temps(out.parent)  # a killed run's half-written manifest
        save_config(cfg, out.with_name(f"{out.stem}.yaml"))
        write_manifest(out, pairs, "pairs", cfg.to_dict())
    return out
