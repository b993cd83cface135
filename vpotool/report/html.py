"""The report page: one self-contained HTML file (CSS, JS, SVG plots and the gallery rows inline; videos linked by
relative paths) with training curves, the eval table and a gallery of pairs or ranked candidates."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from html import escape
from pathlib import Path
from string import Template

from vpotool import __version__
from vpotool.manifest import read_manifest
from vpotool.report.data import Inputs, clean, find_inputs, gallery
from vpotool.report.plots import finite, line_plot

STATIC = Path(__file__).parent / "static"
# Metrics plotted first, with readable titles; other numeric columns follow under their own names.
TITLES = {
    "loss": "loss",
    "implicit_acc": "implicit accuracy",
    "reward": "reward",
    "sample_reward": "reward of the sampled candidates",
    "reward_margin": "implicit reward margin",
}
NOT_PLOTTED = {"step", "iteration", "ref_updated"}
SETTINGS = ("algo", "model", "reward", "reward_dimension", "iterations", "prompts_per_iter", "candidates",
            "steps_per_iter", "max_steps", "lr", "beta", "loss_type", "ref_update_interval", "lora_rank")  # fmt: skip

PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>vpotool report: $title</title><style>$css</style></head>
<body><header><h1>$title</h1><p class="sub">$subtitle</p>$settings<nav>$nav</nav></header>
<main>$sections</main>
<script type="application/json" id="gallery-data">$data</script>
<script>$js</script></body></html>
""")


def build_report(cfg) -> Path:
    """Write the report of ``cfg.path`` (a run folder or one manifest; a ``ReportConfig``) to ``OUT/index.html``
    (``OUT`` defaults to ``report/`` in the run folder, or beside the manifest). Returns the page's path."""
    path = Path(cfg.path)
    inputs = find_inputs(path, cfg.scores or None)
    out = Path(cfg.out) if cfg.out else (path if path.is_dir() else path.parent) / "report"
    kind, items = gallery(inputs, out)
    page = render(inputs, kind, items, cfg.page_size, source=str(path))
    target = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".index.html.{os.getpid()}.tmp"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def render(inputs: Inputs, kind: str, items: list[dict], page_size: int = 24, source: str = "") -> str:
    """The page's HTML for gathered inputs and gallery items (see :mod:`vpotool.report.data`)."""
    metrics = read_manifest(inputs.metrics, "metrics").to_pylist() if inputs.metrics else []
    sections = [
        ("curves", "Training curves", curves(metrics, inputs.config, kind, items) if metrics or items else ""),
        ("eval", "Evaluation", eval_section(inputs.eval) if inputs.eval else ""),
        ("gallery", "Preference pairs" if kind == "pairs" else "Candidates", gallery_section(kind) if items else ""),
    ]
    sections = [(key, title, body) for key, title, body in sections if body]
    noun = "pairs" if kind == "pairs" else "prompts"
    data = {"kind": kind, "noun": noun, "pageSize": page_size, "items": items}
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    return PAGE.substitute(
        title=escape(inputs.title),
        subtitle=escape(f"{source} · vpotool {__version__} · {when}"),
        settings=settings(inputs.config),
        nav=" ".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections),
        sections="".join(f'<section id="{key}"><h2>{title}</h2>{body}</section>' for key, title, body in sections),
        data=script_json(data),
        css=(STATIC / "report.css").read_text(),
        js=(STATIC / "report.js").read_text(),
    )


def script_json(data) -> str:
    """JSON safe inside a ``<script>`` element: no ``</script>`` or ``<!--`` can close or confuse it."""
    return json.dumps(data, allow_nan=False, ensure_ascii=False).replace("<", "\\u003c")


def settings(config: dict) -> str:
    """The run's key settings as chips, and its whole config folded away."""
    chips = "".join(
        f'<span class="chip">{escape(k)} <b>{escape(str(config[k]))}</b></span>' for k in SETTINGS if k in config
    )
    lines = "\n".join(f"{k}: {v}" for k, v in config.items())
    full = f"<details><summary>config</summary><pre>{escape(lines)}</pre></details>" if config else ""
    return f'<div class="settings">{chips}{full}</div>'


def reference_updates(metrics: list[dict], config: dict) -> list[int]:
    """Steps after which the DPO reference took the policy's weights: the ``ref_updated`` metric where logged,
    else every ``ref_update_interval`` steps of a DPO config."""
    if any("ref_updated" in r for r in metrics):
        return [r["step"] for r in metrics if finite(r.get("ref_updated")) and r["ref_updated"] > 0.5]
    interval = config.get("ref_update_interval") or 0
    if not interval or config.get("algo", "dpo") != "dpo":
        return []
    return [r["step"] for r in metrics if r["step"] % interval == 0]


def iteration_series(metrics: list[dict], kind: str, items: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Reward per loop iteration: the mean over sampled candidates (logged as ``sample_reward``), and the mean
    chosen and rejected scores of the pairs (or the best candidate of each prompt)."""
    series: dict[str, list] = {}
    seen = set()
    for r in metrics:
        if finite(r.get("iteration")) and finite(r.get("sample_reward")) and r["iteration"] not in seen:
            seen.add(r["iteration"])
            series.setdefault("all candidates", []).append((r["iteration"], r["sample_reward"]))
    by_iter: dict[int, list[dict]] = {}
    for it in items:
        if it["iteration"] is not None:
            by_iter.setdefault(it["iteration"], []).append(it)
    names = ("chosen", "rejected") if kind == "pairs" else ("best candidate",)
    for i, group in sorted(by_iter.items()):
        for slot, name in enumerate(names):
            values = [g["videos"][slot]["score"] for g in group if finite(g["videos"][slot]["score"])]
            if values:
                series.setdefault(name, []).append((i, sum(values) / len(values)))
    return series


def figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{escape(caption)}</figcaption>{svg}</figure>"


def curves(metrics: list[dict], config: dict, kind: str, items: list[dict]) -> str:
    """One small SVG plot per numeric metric against the step (reference updates dashed) and reward per
    iteration; diagnostics (the metrics without a title in ``TITLES``: lr, grad_norm, ...) are folded away."""
    metrics = sorted(metrics, key=lambda r: r["step"])
    marks = reference_updates(metrics, config)
    numeric = [k for k in dict.fromkeys(k for r in metrics for k in r) if k not in NOT_PLOTTED]
    numeric = [k for k in numeric if any(finite(r.get(k)) for r in metrics)]

    def plot(k: str) -> str:
        return figure(TITLES.get(k, k), line_plot({k: [(r["step"], r.get(k)) for r in metrics]}, marks))

    main = [plot(k) for k in TITLES if k in numeric]
    per_iter = iteration_series(metrics, kind, items)
    if per_iter:
        main.append(figure("reward per iteration", line_plot(per_iter, xlabel="iteration")))
    rest = [k for k in numeric if k not in TITLES]
    html = f'<div class="plots">{"".join(main)}</div>' if main else ""
    if rest:
        plots = f'<div class="plots">{"".join(plot(k) for k in rest)}</div>'
        html += f"<details{'' if main else ' open'}><summary>{', '.join(rest)}</summary>{plots}</details>"
    note = f"<p class='note'>Dashed lines: reference model updates (steps {', '.join(map(str, marks))}).</p>"
    return (note if marks and html else "") + html


def _number(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if finite(v) else "–"


def eval_section(path: Path) -> str:
    """The eval section of an ``eval.parquet``, each metric marked with the direction its metadata records."""
    from vpotool.stages.eval import read_directions

    table = read_manifest(path, "eval")
    return evaluation(table.to_pylist(), read_directions(table))


def eval_table(rows: list[dict], directions: dict[str, str] | None = None) -> str:
    """``eval.parquet`` as a table: one row per metric, marked ↑ or ↓ by ``directions`` (``{metric: "higher" or
    "lower"}``; default: as ``vpotool eval`` sets them now), one column per checkpoint with mean ± std, and the win
    rate against the baseline and the number of videos under it."""
    from vpotool.stages.eval import ARROWS, metric_direction

    if not rows:
        return ""
    directions = directions or {}
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    cells = {(r["metric"], r["checkpoint"]): r for r in rows}
    head = "".join(f"<th>{escape(c)}</th>" for c in checkpoints)
    body = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        name = f"{metric} {ARROWS[directions.get(metric) or metric_direction(metric)]}"
        tds = []
        for c in checkpoints:
            r = {k: clean(v) for k, v in cells.get((metric, c), {}).items()}
            text = _number(r.get("mean")) + (f" ± {_number(r['std'])}" if finite(r.get("std")) else "")
            sub = [f"win {_number(r['win_rate'], 2)}" if finite(r.get("win_rate")) else "", f"n {r.get('n', '–')}"]
            tds.append(f"<td>{text}<small>{' · '.join(s for s in sub if s)}</small></td>")
        body.append(f"<tr><th>{escape(name)}</th>{''.join(tds)}</tr>")
    note = (
        "<p class='note'>mean ± std over the held-out videos; ↑ higher is better, ↓ lower is better; win: share of "
        "videos better than the baseline, ties half.</p>"
    )
    head = f"<thead><tr><th>metric</th>{head}</tr></thead>"
    return f'<table class="eval">{head}<tbody>{"".join(body)}</tbody></table>{note}'


def evaluation(rows: list[dict], directions: dict[str, str] | None = None) -> str:
    """The eval section: for long videos, the drift curves first, then the table (see :func:`eval_table`)."""
    return drift_plots(rows) + eval_table(rows, directions)


SEGMENT_METRIC = re.compile(r"^world\.rate\.(?P<check>\w+)\.seg(?P<k>\d+)$")


def drift_plots(rows: list[dict]) -> str:
    """One plot per world check of long videos (``world.rate.<check>.seg<k>`` rows): the share of videos passing it
    per 17-frame segment, one line per checkpoint, with each checkpoint's slope (``world.drift.<check>``) in the
    legend. Empty for videos of one segment."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    slopes = {(r["metric"], r["checkpoint"]): r["mean"] for r in rows if r["metric"].startswith("world.drift.")}
    for r in rows:
        m = SEGMENT_METRIC.match(r["metric"])
        if m:
            curves.setdefault(m["check"], {}).setdefault(r["checkpoint"], []).append((int(m["k"]), r["mean"]))
    figures = []
    for check, per_ckpt in curves.items():
        series = {ckpt: sorted(points) for ckpt, points in per_ckpt.items()}
        trend = [(c, slopes.get((f"world.drift.{check}", c))) for c in per_ckpt]
        trend_text = ", ".join(f"{c} {v:+.3f}" for c, v in trend if finite(v))
        slope = f"<small>slope: {escape(trend_text)}</small>" if trend_text else ""
        caption = f"<figcaption>{escape(check.replace('_', ' '))} per segment{slope}</figcaption>"
        figures.append(f"<figure>{caption}{line_plot(series, xlabel='segment')}</figure>")
    if not figures:
        return ""
    return f'<div class="plots drift">{"".join(figures)}</div><p class="note">{DRIFT_NOTE}</p>'


DRIFT_NOTE = (
    "Videos longer than the world's 17 frames: the share of videos passing each world check in each 17-frame "
    "segment (the drift curve), and its least-squares slope per segment."
)


def gallery_section(kind: str) -> str:
    """The gallery's controls and containers; ``report.js`` fills them from the embedded rows."""
    what = "the margin" if kind == "pairs" else "the spread (best minus worst)"
    return f"""<div class="controls">
<input id="filter" type="search" placeholder="filter by prompt" aria-label="filter by prompt">
<label>sort <select id="sort"><option value="margin-desc">{what}, largest first</option>
<option value="margin-asc">{what}, smallest first</option><option value="prompt">prompt, A to Z</option>
<option value="iteration">iteration</option></select></label><span id="count"></span></div>
<div id="cards"></div>
<nav class="pager"><button id="prev" type="button">&lsaquo; previous</button><span id="page"></span>
<button id="next" type="button">next &rsaquo;</button></nav>"""
