"""``vpotool label --judge``: a pairwise video judge labels the pairs a person would, into the same labels
manifest, so ``vpotool pair --labels`` uses its answers unchanged.

Each pair of the queue (every two candidates of a prompt, or ``--pairs``' pairs, as for people) is judged twice,
once in each order, because judges favour a position. Each order is one label row: ``left_id`` is the video shown
first ("Video 1"), ``choice`` left, right or tie (an answer that names neither video), ``labeler`` the judge,
``text`` its whole answer and ``note`` how the two orders relate: ``agree``, ``disagree`` (each order preferred
the video shown in the same position: no preference survives) or ``no verdict``. ``pair --labels`` counts the two
rows as votes: two that agree give a preference of margin 1, two that disagree give none, a verdict beside a tie
gives margin 0.5. Every answer is written at once (rerunning resumes), and the count of answers without a verdict
is printed at the end.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from vpotool.config import LabelConfig
from vpotool.errors import VpoError
from vpotool.manifest import RowWriter, read_manifest, resolve
from vpotool.options import parse_pairs
from vpotool.report.queue import Item, build_queue

ORDERS = ("", "|swapped")  # label id suffixes: the queue's order, then the other


def label_id(item: Item, labeler: str, suffix: str) -> str:
    """A judge row's id: the pair, the labeler, and ``|swapped`` for the second order."""
    return f"{item.item_id}|{labeler}{suffix}"


def verdict_choice(verdict: int | None) -> str:
    return {1: "left", 2: "right"}.get(verdict, "tie")


def agreement(rows: list[dict]) -> str:
    """How the two orders' rows of one pair relate: agree, disagree or no verdict."""
    winners = [{"left": r["left_id"], "right": r["right_id"]}.get(r["choice"]) for r in rows]
    if None in winners:
        return "no verdict"
    return "agree" if winners[0] == winners[1] else "disagree"


def run_judge(cfg: LabelConfig, judge=None) -> Path:
    """Judge every pair of ``cfg``'s queue in both orders into ``cfg.out`` (see the module docstring); ``judge`` is a
    loaded judge to use instead of ``cfg.judge``."""
    from vpotool.models import resolve_device
    from vpotool.progress import console, progress_bar
    from vpotool.rewards import resolve_dtype
    from vpotool.rewards.unifiedreward import load_judge
    from vpotool.stages.common import output_file, writer_lock
    from vpotool.video import frames_to_tensor, read_video

    samples_path, out = Path(cfg.samples), output_file(cfg.out)
    samples = read_manifest(samples_path, "samples", "--samples").to_pylist()
    pairs = read_manifest(cfg.pairs, "pairs", "--pairs").to_pylist() if cfg.pairs else None
    queue = build_queue(samples, pairs)
    if not queue:
        raise VpoError(f"nothing to judge in {samples_path}: each prompt needs 2 or more candidates "
                       "(`vpotool sample --candidates 2`), or pass --pairs")  # fmt: skip
    rows_by_id = {s["sample_id"]: s for s in samples}
    videos = {sid: resolve(samples_path, rows_by_id[sid]["video"]) for i in queue for sid in (i.left_id, i.right_id)}
    missing = sorted(str(p) for p in videos.values() if not p.is_file())
    if missing:
        raise VpoError(f"{len(missing)} video(s) of {samples_path} are missing, e.g. {missing[0]}; judge the run "
                       "folder `vpotool sample` wrote, with its videos/")  # fmt: skip
    options = parse_pairs(cfg.judge_options, "--judge-options", "max_new_tokens=512")
    device = resolve_device(cfg.device)
    dtype = str(resolve_dtype(cfg.dtype, cfg.judge, device)).removeprefix("torch.")  # --dtype auto resolved
    compare = {"judge": cfg.judge, "judge_path": str(cfg.judge_path), "judge_options": options, "dtype": dtype}
    here = out.resolve().parent
    with writer_lock(out):
        writer = RowWriter(out, "labels", cfg.to_dict(), compare=compare)
        answers = {r["label_id"]: r for r in writer.rows}
        todo = [i for i in queue if any(label_id(i, cfg.labeler, o) not in answers for o in ORDERS)]
        if judge is None and todo:
            judge = load_judge(cfg.judge, cfg.judge_path, device, dtype, options)

        def video(sid: str):  # decoded per call: keeping every decoded video would grow with the run
            row = rows_by_id[sid]
            return frames_to_tensor(read_video(videos[sid]), row["height"], row["width"]), row["fps"]

        def judged(item: Item, suffix: str) -> dict:
            key = label_id(item, cfg.labeler, suffix)
            if key in answers:
                return answers[key]
            first, second = (item.left_id, item.right_id) if not suffix else (item.right_id, item.left_id)
            (a, fps_a), (b, fps_b) = video(first), video(second)
            verdict, text = judge.judge(a, b, item.prompt, (fps_a, fps_b))
            row = dict(
                label_id=key, prompt_id=item.prompt_id, prompt=item.prompt, left_id=first, right_id=second,
                choice=verdict_choice(verdict), labeler=cfg.labeler,
                labelled_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                left_video=os.path.relpath(videos[first], here), right_video=os.path.relpath(videos[second], here),
                text=text, note="",
            )  # fmt: skip
            writer.add([row])
            answers[key] = row
            writer.flush()  # every answer kept at once: a judge's answer can take minutes
            return row

        with progress_bar(f"judge {cfg.judge}", total=len(queue)) as advance:
            advance(len(queue) - len(todo))
            for item in todo:
                both = [judged(item, suffix) for suffix in ORDERS]
                for row in both:
                    row["note"] = agreement(both)
                writer.flush()
                advance()
    notes = [agreement([answers[label_id(i, cfg.labeler, o)] for o in ORDERS]) for i in queue]
    unparsed = sum(answers[label_id(i, cfg.labeler, o)]["choice"] == "tie" for i in queue for o in ORDERS)
    con = console()
    con.print(
        f"{cfg.judge}: {len(queue)} pairs judged in both orders: {notes.count('agree')} agree, "
        f"{notes.count('disagree')} disagree (position bias), {notes.count('no verdict')} without a verdict"
    )
    if unparsed:
        con.print(f"[yellow]warning:[/] {unparsed} of {2 * len(queue)} answers named neither video; they are ties "
                  f"(their text is in {out}, column text)")  # fmt: skip
    return out
