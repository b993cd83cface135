"""Write the methods comparison of ``compare.sh`` as markdown (stdout): per method, the mean and seed standard
deviation over its training seeds (runs ``METHOD-seedS``) of each eval metric, on world:val and world:heldout, and
the ablations as differences from online DPO in units of the seed spread.

    python examples/tiny_world/results_table.py runs/compare > docs/results.md
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from vpotool.manifest import manifest_config

EVALS = [  # (eval folder of compare.sh, heading, short name)
    ("eval-val", "Validation prompts", "val"),
    ("eval-heldout", "Held-out prompts", "heldout"),
]
SPLITS = {  # what the tiny world's eval splits ask (docs/world.md)
    "world:val": "Prompts of the distribution the runs aligned on (world:align) that no run trains on",
    "world:heldout": "(Colour, shape, direction) triples that pretraining never showed, new combinations of words "
    "the model has seen: whether aligning on some combinations fixes others",
}
# (metric, column header, scale, digits); the rates are shares of videos, shown in percent
METRICS = [
    ("world.overall", "world overall", 1, 3),
    ("world.rate.direction_correct", "direction ✓ %", 100, 1),
    ("world.rate.color_correct", "colour ✓ %", 100, 1),
    ("world.rate.shape_correct", "shape ✓ %", 100, 1),
    ("world.rate.static", "static ↓ %", 100, 1),
    ("world.rate.flicker", "flicker ↓ %", 100, 1),
    ("world.rate.shape_present", "shape present %", 100, 1),
    ("world.frechet", "Fréchet ↓", 1, 2),
]
REFERENCE = "online-dpo"  # the bare default loop: every ablation's reference
ORDER = [  # rows: the reference, then its ablations' variants
    "online-dpo",
    "online-dpo-fixed-ref",
    "offline-dpo",
    "online-dpo-k2",
    "online-dpo-k8",
    "refl",
    "scst",
    "scst-greedy",
]
ABLATIONS = [  # (question, methods), in the order of OnlineVPO's ablations
    ("online vs offline", ["online-dpo", "offline-dpo"]),
    ("reference model", ["online-dpo", "online-dpo-fixed-ref"]),
    ("candidates per prompt, same budget", ["online-dpo-k2", "online-dpo", "online-dpo-k8"]),
    ("training signal", ["online-dpo", "refl", "scst", "scst-greedy"]),
]
SEEDED = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)$")
INTERVAL = re.compile(r"^online-dpo-ref(?P<steps>\d+)$")  # compare.sh's REF_INTERVALS variants


def with_intervals(methods) -> None:
    """Put the reference-interval variants that ran (``online-dpo-refN``) into the rows and the reference-model
    ablation, by interval, after the fixed reference."""
    found = [m for m in methods if INTERVAL.match(m) and m not in ORDER]
    found.sort(key=lambda m: int(INTERVAL.match(m)["steps"]))
    at = ORDER.index("online-dpo-fixed-ref") + 1
    ORDER[at:at] = found
    dict(ABLATIONS)["reference model"].extend(m for m in found if m not in dict(ABLATIONS)["reference model"])


def method_of(run: str) -> str:
    """The method a run folder belongs to: ``online-dpo-seed2`` -> ``online-dpo`` (a name without a seed is its
    own method)."""
    m = SEEDED.match(run)
    return m["method"] if m else run


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of ``values``; the std is NaN for a single value."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def cell(values: list[float], scale: float = 1, digits: int = 3) -> str:
    """``mean ± std`` over seeds; one value is marked ``(1 seed)``; none is ``-``."""
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean, sd = spread(values)
    return f"{mean:.{digits}f} (1 seed)" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def single(value: float, scale: float = 1, digits: int = 3) -> str:
    """One figure without a spread (the base model's)."""
    return "-" if value is None or math.isnan(value) else f"{value * scale:.{digits}f}"


def run_config(folder: Path) -> tuple[str, dict]:
    """Which command trained a run (``loop`` or ``train-scst``) and its resolved config."""
    for kind in ("loop", "train-scst"):
        path = folder / f"{kind}.yaml"
        if path.is_file():
            return kind, yaml.safe_load(path.read_text())
    raise SystemExit(f"{folder} holds neither loop.yaml nor train-scst.yaml; is it a compare.sh run?")


def describe(kind: str, cfg: dict) -> tuple[str, int]:
    """A run's method in words and the number of videos it sampled for its training signal."""
    steps = cfg["max_steps"]
    rollouts = steps * cfg["batch_size"] * cfg["grad_accum"]
    if kind == "train-scst":
        if cfg["baseline"] == "greedy":  # a stochastic rollout and the greedy sample from its noise
            return "SCST, greedy baseline (train-scst)", 2 * rollouts
        return f"SCST, group-mean baseline of {cfg['group_size']} (train-scst)", rollouts * cfg["group_size"]
    videos = cfg["iterations"] * cfg["prompts_per_iter"] * cfg["candidates"]
    if cfg["algo"] == "refl":
        last = f"last {cfg['backprop_steps']} steps" if cfg["backprop_steps"] > 1 else "last step"
        return f"ReFL, reward gradient through the {last}", rollouts
    if cfg["algo"] == "scst":
        return f"SCST, group-mean baseline of K={cfg['candidates']}", videos
    # one round of sampling, all from the base model, is offline DPO
    mode = "offline DPO" if cfg["iterations"] == 1 else f"online DPO over {cfg['iterations']} rounds"
    every = cfg["ref_update_interval"]
    ref = f"curriculum reference every {every} steps" if every else "fixed reference"
    return f"{mode}, K={cfg['candidates']}, {ref}", videos


def read_eval(path: Path) -> tuple[dict, dict, dict]:
    """An eval.parquet as ``{method: {run: {metric: row}}}`` (each run's latest checkpoint), the base model's
    ``{metric: row}`` and the eval's config."""
    table = pq.read_table(path)
    latest: dict[str, tuple[int, str]] = {}
    for ckpt in dict.fromkeys(table.column("checkpoint").to_pylist()):
        if ckpt == "base":
            continue
        run, _, name = ckpt.partition("/")
        step = int(name.removeprefix("step-")) if name.removeprefix("step-").isdigit() else -1
        if run not in latest or step > latest[run][0]:
            latest[run] = (step, ckpt)
    chosen = {ckpt: run for run, (_, ckpt) in latest.items()}
    methods: dict[str, dict[str, dict]] = {}
    base: dict[str, dict] = {}
    for row in table.to_pylist():
        if row["checkpoint"] == "base":
            base[row["metric"]] = row
        elif row["checkpoint"] in chosen:
            run = chosen[row["checkpoint"]]
            methods.setdefault(method_of(run), {}).setdefault(run, {})[row["metric"]] = row
    if not base:
        raise SystemExit(f"{path} has no base rows; rerun `vpotool eval` (it always evaluates the base model)")
    return methods, base, manifest_config(table)


def ordered(methods) -> list[str]:
    """Methods in the order of the ablations; others after them, by name."""
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(methods, key=lambda m: (rank.get(m, len(ORDER)), m))


def values(runs: dict[str, dict], metric: str, field: str = "mean") -> list[float]:
    """One value per seed run of a method: ``field`` of its ``metric`` row (runs without the metric skipped)."""
    return [rows[metric][field] for rows in runs.values() if metric in rows]


def metric_table(methods: dict, base: dict) -> list[str]:
    """One split's table: the base model, then each method's mean ± seed std per metric and its win rate."""
    shown = [m for m in METRICS if m[0] in base]
    lines = [
        "| method | seeds | " + " | ".join(h for _, h, _, _ in shown) + " | win rate vs base |",
        "|---|---:|" + "---:|" * (len(shown) + 1),
        "| base | - | " + " | ".join(single(base[m]["mean"], s, d) for m, _, s, d in shown) + " | - |",
    ]
    for method in ordered(methods):
        runs = methods[method]
        cells = [cell(values(runs, m), s, d) for m, _, s, d in shown]
        win = cell(values(runs, "world.overall", "win_rate"), 1, 2)
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {win} |")
    return lines


def ablation_table(splits: list[tuple[str, dict]]) -> list[str]:
    """Each variant's world overall on every split against online DPO's: the difference and that difference in
    pooled seed standard deviations of the two methods."""
    head = "| ablation | method |"
    rule = "|---|---|"
    for short, _ in splits:
        head += f" {short}: world overall | {short}: vs online DPO | {short}: in seed stds |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for question, variants in ABLATIONS:
        for method in variants:
            if not any(method in methods for _, methods in splits):
                continue
            if not any(m in methods for m in variants if m != REFERENCE for _, methods in splits):
                break  # none of the question's variants ran
            row = f"| {question} | {method} |"
            for _, methods in splits:
                mine = values(methods.get(method, {}), "world.overall")
                ref = values(methods.get(REFERENCE, {}), "world.overall")
                if method == REFERENCE or not mine or not ref:
                    row += f" {cell(mine)} | - | - |"
                    continue
                delta = statistics.mean(mine) - statistics.mean(ref)
                sd = pooled_std(mine, ref)
                units = f"{delta / sd:+.1f}" if sd > 0 else "-"
                row += f" {cell(mine)} | {delta:+.3f} | {units} |"
            lines.append(row)
    return lines


def pooled_std(a: list[float], b: list[float]) -> float:
    """Pooled sample standard deviation of two groups, ``sqrt(sum of squared deviations / (n_a + n_b - 2))``: one
    run's spread from its training seed; NaN when neither group has two values."""
    dof = len(a) + len(b) - 2
    if dof < 1:
        return math.nan
    ss = sum((x - statistics.mean(g)) ** 2 for g in (a, b) for x in g)
    return math.sqrt(ss / dof)


def minutes(out: Path, runs) -> list[float]:
    """Training wall minutes of ``runs`` from their ``seconds`` files (runs without one skipped)."""
    return [int((out / r / "seconds").read_text()) / 60 for r in runs if (out / r / "seconds").is_file()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the compare.sh output folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    found = [(h, short, out / d / "eval.parquet") for d, h, short in EVALS if (out / d / "eval.parquet").is_file()]
    if not found:
        raise SystemExit(f"no {' or '.join(d for d, _, _ in EVALS)}/eval.parquet in {out}; run compare.sh first")
    splits = [(h, short, *read_eval(path)) for h, short, path in found]
    methods = {}  # method -> {run: (description, videos, steps)}
    for _, _, evaluated, _, _ in splits:
        for method, runs in evaluated.items():
            for run in runs:
                kind, cfg = run_config(out / run)
                methods.setdefault(method, {})[run] = (*describe(kind, cfg), cfg["max_steps"])

    with_intervals(methods)
    reference = next(iter(methods.get(REFERENCE, {})), None)
    train_minutes = sum(minutes(out, [r for runs in methods.values() for r in runs]))
    eval_minutes = sum(minutes(out, [d for d, _, _ in EVALS]))
    lines = [
        "# Methods comparison on the tiny world",
        "",
        f"Produced by `bash examples/tiny_world/compare.sh` on {os.cpu_count()} CPU cores: {train_minutes:.0f} "
        f"minutes of training and {eval_minutes:.0f} of evaluation. Every method starts from the shipped `tiny` base "
        "model and runs once per training seed; each figure below is the mean over a method's seeds ± the standard "
        "deviation of the seeds' own means (sample std, n - 1), so a method's spread is what its training seed "
        "alone changes. The base model is not trained, so its figures have no seed spread.",
    ]
    if reference:
        _, cfg = run_config(out / reference)
        lines += [
            "",
            f"Online DPO is the bare `vpotool loop` on `{cfg['prompts']}`: {cfg['iterations']} iterations of "
            f"{cfg['prompts_per_iter']} prompts x {cfg['candidates']} candidates, {cfg['max_steps']} DPO steps in "
            f"all, {cfg['pair_strategy']} pairs above a margin of {cfg['min_margin']}, the reference copied from the "
            f"policy every {cfg['ref_update_interval']} steps, learning rate {cfg['lr']}, LoRA rank "
            f"{cfg['lora_rank']}. The other methods change what their description says. Videos: those each run "
            "sampled for its training signal (ReFL: the rollouts it backpropagates through, a batch per step; "
            "SCST with the greedy baseline: its stochastic rollouts and their greedy samples).",
        ]
    lines += ["", "| method | what it runs | videos | optimizer steps | train minutes |", "|---|---|---:|---:|---:|"]
    for method in ordered(methods):
        runs = methods[method]
        desc = " / ".join(dict.fromkeys(d for d, _, _ in runs.values()))
        videos = " / ".join(str(v) for v in dict.fromkeys(v for _, v, _ in runs.values()))
        steps = " / ".join(str(s) for s in dict.fromkeys(s for _, _, s in runs.values()))
        lines.append(f"| {method} | {desc} | {videos} | {steps} | {cell(minutes(out, runs), 1, 1)} |")
    missing = [m for m in ORDER if m not in methods]
    if missing:
        lines += ["", f"Not in this comparison yet (no finished run): {', '.join(missing)}."]

    for heading, _, evaluated, base, info in splits:
        prompts = info.get("prompts", "?")
        seeds = info.get("seeds")
        n = base["world.overall"]["n"]
        count = f"{n // seeds} prompts x {seeds} seeds" if seeds else f"{n} videos"
        what = SPLITS.get(prompts, "")
        lines += [
            "",
            f"## {heading}",
            "",
            (f"{what} ([world.md](world.md)): " if what else "")
            + f"`--prompts {prompts}`, {count} per checkpoint, the same seeds for every checkpoint. Rates are "
            "shares of videos passing each check of [world.md](world.md#defect-rates) (↓: lower is "
            "better); Fréchet is the distance of clip features to rendered ground truth; win rate is the share of "
            "(prompt, seed) videos on which a checkpoint beats the base model on world overall (ties half).",
            "",
            *metric_table(evaluated, base),
        ]
    lines += [
        "",
        "## Ablations",
        "",
        "Each method's world overall against online DPO's (the default loop): the difference of the means over "
        "seeds, and that difference in pooled seed standard deviations of the two methods (how many times one "
        "run's seed-to-seed spread the methods differ by).",
        "",
        *ablation_table([(short, evaluated) for _, short, evaluated, _, _ in splits]),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
