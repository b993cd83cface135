"""The ``eval`` stage: sample held-out prompts with fixed seeds from the base model and each adapter checkpoint,
score them, and summarise per (checkpoint, metric) with win rates against a baseline -> eval.parquet, plus
``strip.png``, the checkpoints' frames side by side. Tiny-world prompts add the world defect rates and the
Fréchet distance to rendered clips. Each metric is better higher or lower (:func:`metric_direction`): the table,
the report and eval.parquet's metadata say which, and a win is a video on which a checkpoint does better."""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from vpotool.config import EvalConfig, SampleConfig, ScoreConfig, save_config
from vpotool.errors import VpoError
from vpotool.manifest import read_manifest, remove_stale_temps, score_dimensions, to_table, write_manifest, write_table
from vpotool.progress import console
from vpotool.prompts import load_prompts
from vpotool.report.strip import frame_strip
from vpotool.stages.common import video_seed
from vpotool.stages.sample import run_sample
from vpotool.stages.score import load_frames, run_score
from vpotool.world.features import clip_features, frechet_distance
from vpotool.world.long import BASE_FRAMES, render_long_clip, segment_checks
from vpotool.world.rates import CHECK_DIRECTIONS, CHECKS, clip_checks

BASE = "base"
FRECHET = "world.frechet"
FVD = "fvd"
DRIFT = "world.drift."  # eval metrics world.drift.<check>: slope per segment of a long video's rate
RATE = "world.rate."  # eval metrics world.rate.<check>: the share of videos passing each vpotool.world.rates check
HIGHER, LOWER = "higher", "lower"  # which way a metric is better
ARROWS = {HIGHER: "↑", LOWER: "↓"}
# The metrics eval computes itself, each with the way it is better. The world rates (world.rate.<check>, their
# .seg<k> and world.drift.<check>) take their check's way from vpotool.world.rates.CHECK_DIRECTIONS, and every
# reward dimension is better higher (rewards are maximised).
METRICS = {FRECHET: LOWER, FVD: LOWER}
DIRECTIONS_KEY = "vpotool.directions"  # eval.parquet's metadata: JSON {metric: "higher" or "lower"}
STRIP = "strip.png"  # frames of every checkpoint's first video of the first prompts, side by side
REFERENCE_SEEDS = 4  # ground-truth clips rendered per prompt for world.frechet
EVAL_ADAPTER = "vpotool_eval"  # the peft adapter name a checkpoint is loaded under while it is evaluated


def run_eval(cfg: EvalConfig, backend=None, rewards: dict | None = None) -> Path:
    """Write ``cfg.out/eval.parquet`` (one row per checkpoint and metric) and print the table; returns its path.

    Checkpoints are ``base`` (the model with every adapter switched off) and each ``--adapter`` folder, in order.
    Each is sampled and scored into ``cfg.out/<name>/`` as ordinary samples and scores manifests, so rerunning
    skips finished videos and scores. ``backend`` may pass a loaded model: it is used as it is (any adapter it
    carries is switched off for ``base``, and set aside while an ``--adapter`` checkpoint runs) and left with its
    own adapters active on return; an adapter trained in memory must be saved and passed by path to be evaluated.
    ``rewards`` may pass loaded rewards by name; names in ``--reward`` that it lacks are loaded.
    """
    from vpotool.rewards import reward_names

    names = reward_names(cfg.reward)
    prompts = load_prompts(cfg.prompts)
    checkpoints = resolve_checkpoints(cfg.adapter_list)
    baseline = resolve_baseline(cfg.baseline, checkpoints)
    specs = world_specs([text for _, text in prompts])
    if "world" in names and specs is None:
        raise VpoError(
            "--reward world needs tiny-world prompts (e.g. --prompts world:heldout); drop world from --reward "
            "for other prompts"
        )
    fvd = fvd_features(cfg) if cfg.fvd_reference else None  # a bad folder or model fails before any sampling
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, ("eval.yaml", "prompts.parquet", "eval.parquet"))  # what a killed eval left half-written
    save_config(cfg, out / "eval.yaml")
    prompts_path = out / "prompts.parquet"
    rows = [{"prompt_id": pid, "prompt": text} for pid, text in prompts]
    write_manifest(prompts_path, rows, "prompts", cfg.to_dict())

    from vpotool.models import load_backend, resolve_device
    from vpotool.rewards import load_rewards

    device = resolve_device(cfg.device)
    if backend is None:
        backend = load_backend(cfg.model, cfg.model_path, device, cfg.dtype, cfg.model_options)
    check_base_models(checkpoints, backend.info.name)
    rewards = load_rewards(cfg.reward, cfg.reward_path, device, cfg.dtype, cfg.reward_options, have=rewards)

    runs = {}
    for name, adapter in checkpoints:
        folder = out / folder_name(name)
        sample_cfg = SampleConfig(
            prompts=str(prompts_path), out=str(folder), model=cfg.model, model_path=cfg.model_path, adapter=adapter,
            candidates=cfg.seeds, frames=cfg.frames, height=cfg.height, width=cfg.width, steps=cfg.steps,
            guidance=cfg.guidance, sampler=cfg.sampler, negative_prompt=cfg.negative_prompt, seed=cfg.seed,
            batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
        )  # fmt: skip
        with checkpoint_active(backend, adapter):
            samples_path = run_sample(sample_cfg, backend=backend)
        score_cfg = ScoreConfig(
            samples=str(samples_path), out=str(folder / "scores.parquet"), reward=",".join(names),
            reward_path=cfg.reward_path, reward_options=cfg.reward_options, batch_size=cfg.batch_size,
            device=cfg.device, dtype=cfg.dtype,
        )  # fmt: skip
        scores_path = run_score(score_cfg, rewards=rewards)
        runs[name] = (samples_path, scores_path)

    wanted = {pid for pid, _ in prompts}
    samples = {
        name: [
            r
            for r in read_manifest(s, "samples").to_pylist()
            if r["prompt_id"] in wanted and r["candidate"] < cfg.seeds
        ]
        for name, (s, _) in runs.items()
    }
    values = {name: metric_values(runs[name][1], {r["sample_id"] for r in samples[name]}, names) for name in runs}
    metrics = list(dict.fromkeys(m for v in values.values() for m in v))
    result = [
        summary_row(name, m, values[name].get(m, {}), values[baseline].get(m, {}), name == baseline)
        for m in metrics
        for name in runs
    ]
    if specs is not None:
        stats = {name: world_clip_stats(runs[name][0], samples[name], cfg.batch_size) for name in runs}
        for check in CHECKS:
            per_run = {name: {sid: mean_of(c, check) for sid, c in stats[name][1].items()} for name in runs}
            result += [
                summary_row(name, f"{RATE}{check}", per_run[name], per_run[baseline], name == baseline)
                for name in runs
            ]
        result += drift_rows(stats, baseline)
    if cfg.frechet and specs is not None:
        reference = {}
        for name in runs:
            mine = samples[name]
            size = (mine[0]["frames"], mine[0]["height"], mine[0]["width"], mine[0]["fps"])
            if size not in reference:
                reference[size] = reference_features(specs, *size, cfg.seed)
            dist = frechet_distance(stats[name][0], reference[size])
            row = dict(checkpoint=name, metric=FRECHET, mean=dist, std=math.nan, n=len(mine), win_rate=math.nan)
            result.append(row)
    elif cfg.frechet:
        why = f"it needs tiny-world prompts, and {cfg.prompts} holds others"
        console().print(f"[yellow]note:[/] {FRECHET} skipped: {why}")
    if fvd is not None:
        result += [fvd_row(fvd, name, runs[name][0], samples[name], cfg.batch_size) for name in runs]
    path = out / "eval.parquet"
    write_eval(path, result, cfg.to_dict())
    frame_strip({name: samples_path for name, (samples_path, _) in runs.items()}, out / STRIP)
    print_table(result, [name for name, _ in checkpoints], baseline)
    return path


def resolve_checkpoints(adapters: list[str]) -> list[tuple[str, str | None]]:
    """``[("base", None), (name, absolute adapter path), ...]``; every adapter must exist (checked before any
    model loads). Names are readable and unique: ``run1/step-40`` for ``runs/run1/checkpoints/step-40``."""
    from vpotool.training.lora import ADAPTER_FILE, adapter_metadata

    out: list[tuple[str, str | None]] = [(BASE, None)]
    for given in adapters:
        path = Path(given).expanduser().resolve()
        if path.is_file() and path.name == ADAPTER_FILE:
            path = path.parent
        if not (path / ADAPTER_FILE).is_file():
            raise VpoError(
                f"--adapter {given}: no LoRA adapter there (expected {ADAPTER_FILE}); pass a checkpoints/step-N folder"
            )
        adapter_metadata(path)  # unreadable files stop here too
        name = checkpoint_name(path)
        taken = {n for n, _ in out} | {folder_name(n) for n, _ in out}
        base, k = name, 2
        while name in taken or folder_name(name) in taken:
            name, k = f"{base}-{k}", k + 1
        out.append((name, str(path)))
    return out


def check_base_models(checkpoints: list[tuple[str, str | None]], model: str) -> None:
    """Stop before sampling anything when an adapter was trained for another model."""
    from vpotool.training.lora import adapter_metadata

    for _, path in checkpoints:
        base = adapter_metadata(path).get("vpotool.base_model") if path else None
        if base and base != model:
            raise VpoError(f"--adapter {path} is an adapter for --model {base}, not {model}")


def checkpoint_name(path: Path) -> str:
    """A short name for an adapter folder: its parent's name (the run, skipping ``checkpoints``) and its own."""
    parent = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{parent.name}/{path.name}" if parent.name else path.name


def folder_name(name: str) -> str:
    """The sub-folder of ``--out`` that holds a checkpoint's samples and scores."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "checkpoint"


def resolve_baseline(baseline: str, checkpoints: list[tuple[str, str | None]]) -> str:
    """The checkpoint name ``--baseline`` refers to: ``base``, a checkpoint name, or an ``--adapter`` path."""
    for name, path in checkpoints:
        if baseline == name or (path and Path(baseline).expanduser().resolve() == Path(path)):
            return name
    known = ", ".join(name for name, _ in checkpoints)
    raise VpoError(f"--baseline {baseline} is not one of the evaluated checkpoints ({known}); pass base or a name")


def world_specs(texts: list[str]):
    """The tiny-world prompts the texts state, or None when any text is outside the world grammar."""
    from vpotool.world import parse_prompt

    try:
        return [parse_prompt(t) for t in texts]
    except VpoError:
        return None


@contextmanager
def checkpoint_active(backend, adapter: str | None):
    """Run ``backend`` as one checkpoint: the bare base model (``adapter`` None: every adapter switched off) or
    with the saved adapter at ``adapter`` alone. Restores the adapters that were active before on exit."""
    from vpotool.training.lora import load_adapter

    denoiser = backend.denoiser
    before = list(denoiser.active_adapters()) if getattr(denoiser, "peft_config", None) else []
    info = backend.info.adapter
    with warnings.catch_warnings():
        # a second adapter next to a trained one, and its removal, are deliberate here
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
        try:
            if adapter is None:
                if before:
                    denoiser.disable_adapters()
                backend.info.adapter = ""
            else:
                if before:
                    denoiser.enable_adapters()  # an adapter loaded while adapters are off would stay off
                load_adapter(backend, adapter, name=EVAL_ADAPTER)
            yield
        finally:
            if EVAL_ADAPTER in getattr(denoiser, "peft_config", {}):
                denoiser.delete_adapters(EVAL_ADAPTER)
            if before:
                denoiser.enable_adapters()
                denoiser.set_adapter(before)
            backend.info.adapter = info


def metric_values(scores_path: Path, sample_ids: set[str], names: list[str]) -> dict[str, dict[str, float]]:
    """``{"reward.dimension": {sample_id: value}}`` from a scores manifest, for ``sample_ids`` and rewards
    ``names`` (each reward's ``overall`` first, then its other dimensions)."""
    rows = [r for r in read_manifest(scores_path, "scores").to_pylist() if r["sample_id"] in sample_ids]
    out: dict[str, dict[str, float]] = {}
    for reward in names:
        mine = [r for r in rows if r["reward"] == reward]
        dims = sorted({k for r in mine for k in score_dimensions(r)})
        for dim in ["overall"] + [d for d in dims if d != "overall"]:
            out[f"{reward}.{dim}"] = {r["sample_id"]: float(r[dim]) for r in mine if r.get(dim) is not None}
    return out


def metric_direction(metric: str) -> str:
    """``"higher"`` or ``"lower"``: which way eval metric ``metric`` is better (see ``METRICS``)."""
    if metric in METRICS:
        return METRICS[metric]
    for prefix in (RATE, DRIFT):
        check = metric.removeprefix(prefix).split(".")[0]
        if metric.startswith(prefix) and check in CHECK_DIRECTIONS:
            return CHECK_DIRECTIONS[check]
    return HIGHER


def summary_row(checkpoint: str, metric: str, values: dict, baseline: dict, is_baseline: bool) -> dict:
    """One eval row: mean and (population) std over the checkpoint's videos, their count, and the win rate
    against the baseline on the same videos (prompt and seed), each won where the metric is better; 0.5 for the
    baseline itself."""
    v = torch.tensor(list(values.values()), dtype=torch.float64)
    n = len(v)
    mean = v.mean().item() if n else math.nan
    std = v.std(correction=0).item() if n else math.nan
    lower = metric_direction(metric) == LOWER
    win = (0.5 if n else math.nan) if is_baseline else win_rate(values, baseline, lower)
    return dict(checkpoint=checkpoint, metric=metric, mean=mean, std=std, n=n, win_rate=win)


def win_rate(values: dict[str, float], baseline: dict[str, float], lower: bool = False) -> float:
    """Fraction of the videos both score where ``values`` beats ``baseline``: is higher, or lower where ``lower``
    (a defect rate, a distance); ties count half. NaN when they share none."""
    common = [k for k in values if k in baseline]
    if not common:
        return math.nan
    sign = -1.0 if lower else 1.0
    wins = [1.0 if sign * (values[k] - baseline[k]) > 0 else 0.5 if values[k] == baseline[k] else 0.0 for k in common]
    return sum(wins) / len(common)


def write_eval(path: Path, rows: list[dict], config: dict) -> None:
    """Write the eval rows to ``path`` with each metric's direction in the metadata (``DIRECTIONS_KEY``)."""
    table = to_table(rows, "eval", config)
    directions = {m: metric_direction(m) for m in dict.fromkeys(r["metric"] for r in rows)}
    meta = {**table.schema.metadata, DIRECTIONS_KEY.encode(): json.dumps(directions).encode()}
    write_table(table.replace_schema_metadata(meta), path)


def read_directions(table) -> dict[str, str]:
    """``{metric: "higher" or "lower"}`` of a read eval manifest: as its metadata records them, or, for a file
    written before eval recorded them, as :func:`metric_direction` says now."""
    raw = (table.schema.metadata or {}).get(DIRECTIONS_KEY.encode())
    if raw:
        return json.loads(raw)
    return {m: metric_direction(m) for m in dict.fromkeys(table.column("metric").to_pylist())}


def world_clip_stats(samples_path: Path, rows: list[dict], batch_size: int) -> tuple[torch.Tensor, dict]:
    """World clip features ``[N, D]`` and the defect checks ``{sample_id: [{check: bool}, ...]}`` of the videos
    of ``rows`` (as stored, after the mp4 round trip; each video decoded once for both): one dict per video of the
    world's clip length, one per 17-frame segment of a longer one (:func:`vpotool.world.long.segment_checks`)."""
    feats, checks = [], {}
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        frames = load_frames(samples_path, batch)
        feats.append(clip_features(frames))
        ids, prompts = [r["sample_id"] for r in batch], [r["prompt"] for r in batch]
        if frames.shape[1] > BASE_FRAMES:
            per_video = [segment_checks(f, p) for f, p in zip(frames, prompts, strict=True)]
        else:
            per_video = [[c] for c in clip_checks(frames, prompts)]
        checks.update(zip(ids, per_video, strict=True))
    return torch.cat(feats), checks


def fvd_features(cfg: EvalConfig):
    """The :class:`~vpotool.rewards.reference.ReferenceSet` of ``--fvd-reference`` in ``--fvd-model``'s features."""
    from vpotool.models import resolve_device
    from vpotool.rewards.reference import ReferenceSet, load_embedder, reference_videos

    videos = reference_videos(cfg.fvd_reference)
    return ReferenceSet(load_embedder(cfg.fvd_model, resolve_device(cfg.device), what="--fvd-model"), videos)


def fvd_row(references, name: str, samples_path: Path, rows: list[dict], batch_size: int) -> dict:
    """The ``fvd`` row of checkpoint ``name``: the Frechet distance between the features of its videos' windows and
    the reference clips' (embedded once for every checkpoint of this size)."""
    mine = [
        references.video_features(load_frames(samples_path, rows[i : i + batch_size]))[0]
        for i in range(0, len(rows), batch_size)
    ]
    reference = references.features(rows[0]["height"], rows[0]["width"])
    dist = frechet_distance(torch.cat(mine), reference)
    return dict(checkpoint=name, metric=FVD, mean=dist, std=math.nan, n=len(rows), win_rate=math.nan)


def mean_of(segments: list[dict], check: str) -> float:
    """The share of a video's segments that pass ``check`` (0 or 1 for a video of one segment)."""
    return sum(float(c[check]) for c in segments) / len(segments)


def drift_rows(stats: dict, baseline: str) -> list[dict]:
    """For videos longer than the world's clip: each check's rate per segment (``world.rate.<check>.seg<k>``, the
    drift curve) and the least-squares slope of that curve per segment (``world.drift.<check>``); none otherwise."""
    out = []
    for check in CHECKS:
        curves = {}
        for name, (_, checks) in stats.items():
            n_seg = min(len(c) for c in checks.values()) if checks else 0
            if n_seg < 2:
                continue
            per_seg = [{sid: float(c[k][check]) for sid, c in checks.items()} for k in range(n_seg)]
            curves[name] = per_seg
        for name, per_seg in curves.items():
            base = curves.get(baseline, per_seg)
            rows = [
                summary_row(
                    name, f"{RATE}{check}.seg{k + 1}", values, base[k] if k < len(base) else {}, name == baseline
                )  # fmt: skip
                for k, values in enumerate(per_seg)
            ]
            slope = curve_slope([r["mean"] for r in rows])
            out += rows + [dict(checkpoint=name, metric=f"{DRIFT}{check}", mean=slope, std=math.nan,
                                n=rows[0]["n"], win_rate=math.nan)]  # fmt: skip
    return out


def curve_slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (change per segment)."""
    n = len(values)
    if n < 2:
        return math.nan
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def reference_features(specs: list, frames: int, height: int, width: int, fps: int, seed: int) -> torch.Tensor:
    """World clip features ``[P * REFERENCE_SEEDS, D]`` of ground-truth clips of ``specs`` at this size, passed
    through the same 8-bit H.264 round trip as the generated videos so both carry the same codec artefacts."""
    from vpotool.video import frames_to_tensor, read_video, to_uint8, write_video
    from vpotool.world import render_batch

    crf = SampleConfig.__dataclass_fields__["crf"].default
    feats = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            seeds = [video_seed(seed, spec.id, k) for k in range(REFERENCE_SEEDS)]
            if frames > BASE_FRAMES:  # long videos: the world's motion continued, around the frame's edges
                clips = torch.stack([render_long_clip(spec, frames, height, width, s) for s in seeds])
            else:
                clips = render_batch([spec] * REFERENCE_SEEDS, seeds, frames, height, width)
            decoded = []
            for k, clip in enumerate(clips):
                path = Path(tmp) / f"{k}.mp4"
                write_video(path, to_uint8(clip), fps, crf)
                decoded.append(frames_to_tensor(read_video(path), height, width))
            feats.append(clip_features(torch.stack(decoded)))
    return torch.cat(feats)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def print_table(rows: list[dict], checkpoints: list[str], baseline: str) -> None:
    """The eval rows as a rich table on stdout: one row per metric, ``mean ± std`` per checkpoint, then each other
    checkpoint's win rate against the baseline."""
    from rich.console import Console
    from rich.table import Table

    by = {(r["checkpoint"], r["metric"]): r for r in rows}
    others = [c for c in checkpoints if c != baseline]
    notes = [f"{ARROWS[HIGHER]} higher is better, {ARROWS[LOWER]} lower is better"]
    notes += [f"win: share of videos better than {baseline}, ties half"] if others else []
    table = Table(title="vpotool eval", caption="; ".join(notes) or None)
    table.add_column("metric", no_wrap=True)
    for c in checkpoints:
        table.add_column(c, justify="right")
    for c in others:
        table.add_column(f"{c} win", justify="right")
    for metric in dict.fromkeys(r["metric"] for r in rows):
        label = f"{metric} {ARROWS[metric_direction(metric)]}"
        cells = [label]
        for c in checkpoints:
            r = by.get((c, metric))
            if r is None:
                cells.append("-")
            else:
                cells.append(_fmt(r["mean"]) + ("" if math.isnan(r["std"]) else f" ± {_fmt(r['std'])}"))
        cells += [_fmt(by[(c, metric)]["win_rate"], 2) if (c, metric) in by else "-" for c in others]
        table.add_row(*cells)
    Console().print(table)
