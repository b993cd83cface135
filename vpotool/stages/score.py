"""The ``score`` stage: run video reward models over a samples manifest -> scores.parquet."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vpotool.config import ScoreConfig, save_config
from vpotool.errors import VpoError
from vpotool.manifest import RowWriter, digest, manifest_config, read_manifest, resolve
from vpotool.progress import progress_bar
from vpotool.rewards.base import call_reward
from vpotool.stages.common import output_file, shard_slice, shard_suffix, writer_lock
from vpotool.video import frames_to_tensor, read_video


def load_frames(manifest_path: Path, rows: list[dict]) -> torch.Tensor:
    """Decode the videos of ``rows`` (same size) -> float ``[B, T, 3, H, W]`` in [0, 1]."""
    clips = [frames_to_tensor(read_video(resolve(manifest_path, r["video"])), r["height"], r["width"]) for r in rows]
    t = min(c.shape[0] for c in clips)
    return torch.stack([c[:t] for c in clips])


def score_rows(rewards: dict, frames: torch.Tensor, rows: list[dict]) -> list[dict]:
    """Score one batch with every reward -> one row per (sample, reward) with each dimension as a column."""
    prompts = [r["prompt"] for r in rows]
    out = []
    for name, reward in rewards.items():
        x = frames.to(getattr(reward, "device", None) or frames.device)
        with torch.no_grad():
            dims = call_reward(reward, x, prompts, rows[0]["fps"])  # a batch holds one fps (see score_into)
        values = {k: v.detach().double().cpu().tolist() for k, v in dims.items()}
        texts = getattr(reward, "last_texts", None)  # a judge's answers, kept for inspection
        texts = texts if isinstance(texts, list) and len(texts) == len(rows) else None
        for i, r in enumerate(rows):
            row = {"sample_id": r["sample_id"], "prompt_id": r["prompt_id"], "reward": name}
            row.update({k: v[i] for k, v in values.items()})
            if texts is not None:
                row["text"] = texts[i]
            bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise VpoError(
                    f"reward {name} gave a non-finite {', '.join(bad)} for sample {r['sample_id']} "
                    f"({r['video']}); check that video, or drop its row from the samples manifest"
                )
            out.append(row)
    return out


def samples_identity(table) -> str:
    """A fingerprint of the samples a manifest holds: the settings ``sample`` recorded for resuming (model,
    prompts, sampler settings, seed; the same for every shard and resume of one job), else its rows' ids, prompts
    and seeds."""
    recorded = manifest_config(table).get("_resume")
    if recorded:
        return digest(recorded)
    return digest(sorted(zip(*(table.column(c).to_pylist() for c in ("sample_id", "prompt", "seed")), strict=True)))


def reward_identity(cfg: ScoreConfig, name: str) -> dict:
    """What decides reward ``name``'s scores besides the videos: the weights and options of each part."""
    from vpotool.rewards import parse_options, reward_path
    from vpotool.rewards.composite import parse_weights

    options = parse_options(cfg.reward_options)
    parts = parse_weights(name) if ":" in name else {name: 1.0}
    return {p: {"path": reward_path(cfg.reward_path, p, cfg.reward), "options": options.get(p, {})} for p in parts}


# Rewards that compare frames with each other: on a 1-frame video each gives one constant for every video.
# (world: its motion and persistence checks; raft: optical flow between frames.)
def check_frame_counts(names: list[str], samples: list[dict], samples_path: Path) -> None:
    """Refuse a temporal reward (alone or inside a composite) on videos of fewer than 2 frames, in one line."""
    from vpotool.rewards import temporal_parts

    short = next((r for r in samples if r["frames"] < 2), None)
    if short is None:
        return
    for name in names:
        temporal = temporal_parts(name)
        if temporal:
            raise VpoError(
                f"reward {temporal[0]} compares frames and needs videos of at least 2 frames; {samples_path} holds "
                f"{short['frames']}-frame videos (e.g. {short['sample_id']}): sample --frames 2 or more, or score "
                "them with a per-frame reward"
            )


def run_score(cfg: ScoreConfig, rewards: dict | None = None) -> Path:
    """Write ``cfg.out`` with one row per (sample, reward). Rerunning skips rows already scored; a rerun on other
    samples, or with other weights or options for a reward already scored, is refused. One process writes a
    scores file at a time (shards write their own)."""
    from vpotool.rewards import reward_names

    out = output_file(cfg.out)
    names = reward_names(cfg.reward)
    samples_path = Path(cfg.samples)
    table = read_manifest(samples_path, "samples", "--samples")
    samples = shard_slice(table.to_pylist(), cfg.shard)
    if not samples:
        raise VpoError(f"{samples_path} has no samples for --shard {cfg.shard}; run `vpotool sample` first")
    suffix = shard_suffix(cfg.shard)
    if suffix:
        out = out.with_name(f"{out.stem}{suffix}.parquet")
    with writer_lock(out):
        return score_into(cfg, out, names, samples_path, samples, samples_identity(table), rewards)


def score_into(
    cfg: ScoreConfig, out: Path, names: list, samples_path: Path, samples: list, identity: str, rewards=None
):
    """The body of :func:`run_score` once ``out`` is checked and locked: score ``samples`` (this shard's rows of
    ``samples_path``, whose :func:`samples_identity` is ``identity``) with every reward of ``names``."""
    from vpotool.models import resolve_device
    from vpotool.rewards import load_rewards, parse_weights, resolve_dtype

    device = resolve_device(cfg.device)
    # the dtypes the rewards run in (--dtype auto resolved, per part of a composite), so that a resume on another
    # device is checked
    parts = [p for n in names for p in (parse_weights(n) if ":" in n else [n])]
    dtypes = sorted({str(resolve_dtype(cfg.dtype, p, device)).removeprefix("torch.") for p in parts})
    compare = {"samples": identity, "dtype": ",".join(dtypes)}
    compare |= {f"reward {n}": reward_identity(cfg, n) for n in names}
    meta = cfg.to_dict()
    writer = RowWriter(out, "scores", meta, compare=compare)  # checks a resumed file before any model loads
    rewards = load_rewards(cfg.reward, cfg.reward_path, device, cfg.dtype, cfg.reward_options, have=rewards)
    composites = {n: r.describe() for n, r in rewards.items() if hasattr(r, "describe")}
    if composites:  # each part's weight and normalisation range, so a composite score can be read back
        writer.config["composites"] = composites
    check_frame_counts(names, samples, samples_path)
    save_config(cfg, out.with_name(f"{out.stem}.yaml"))  # after the checks: a refused run leaves it alone
    todo = [r for r in samples if any((r["sample_id"], n) not in writer.done for n in names)]
    with progress_bar("score " + ",".join(names), total=len(samples)) as advance:
        advance(len(samples) - len(todo))
        groups: dict[tuple, list[dict]] = {}
        for r in todo:
            groups.setdefault((r["frames"], r["height"], r["width"], r["fps"]), []).append(r)  # one size and fps
        for group in groups.values():
            for start in range(0, len(group), cfg.batch_size):
                batch = group[start : start + cfg.batch_size]
                todo_rewards = {
                    n: rw for n, rw in rewards.items() if any((r["sample_id"], n) not in writer.done for r in batch)
                }
                rows = score_rows(todo_rewards, load_frames(samples_path, batch), batch)
                writer.add(r for r in rows if (r["sample_id"], r["reward"]) not in writer.done)
                writer.flush()
                advance(len(batch))
    return writer.path
