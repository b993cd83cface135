"""Crash safety: every stage is SIGKILLed at several points, rerun, and compared with an uninterrupted run.

Kill points are the process's own write points (``VPOTOOL_CRASH_AT=N``, see ``vpotool.manifest.crash_point``:
a temporary file written and not yet renamed, or a file just renamed) spread over a run, plus kills at fractions
of the uninterrupted run's wall time. After each kill the same command is rerun to the end and checked: every
manifest reads back, ids match the uninterrupted run with none twice, no temporary or lock file is left, latents
and scores are equal, and trainers log each step once and end with the uninterrupted run's adapter.

The default suite kills ``train-dpo`` once, inside its first checkpoint write; ``-m slow`` runs the full harness (7
stages, 6 kill points each; 7 to 9 minutes on 2 busy CPU cores) and prints a summary line per stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import FAST
from safetensors.torch import load_file

from vpotool.manifest import CRASH_ENV, manifest_kind

KILLS_PER_STAGE = 6
RUNNER = """import atexit, sys
import vpotool.manifest as manifest
from vpotool.cli import main
count_file = sys.argv.pop(1)
atexit.register(lambda: open(count_file, "w").write(str(manifest.crash_points())))
sys.argv[0] = "vpotool"
main()
"""
PROMPTS = [
    "a red circle moving left",
    "a blue square moving up",
    "a green ring moving down",
    "a yellow dot moving right",
]
TRAIN = ["--max-steps", 4, "--save-every", 2, "--batch-size", 2, "--lora-rank", 4]


def env(**extra) -> dict:
    """A child's environment: this interpreter's import path, one thread (two runs share 2 cores), ``extra``."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", **extra}


def command(stage: str, inputs: Path, out: Path) -> list[str]:
    """The vpotool arguments of ``stage`` writing ``out`` (inputs from the shared ``inputs`` folder)."""
    prompts = str(inputs / "prompts.txt")
    args = {
        "sample": ["sample", "--prompts", prompts, "--candidates", 2, "--batch-size", 2, "--out", out, *FAST],
        "score": ["score", "--samples", inputs / "samples.parquet", "--reward", "temporal,flicker", "--batch-size", 2,
                  "--out", out / "scores.parquet"],
        "pair": ["pair", "--samples", inputs / "samples.parquet", "--scores", inputs / "scores.parquet", "--reward",
                 "temporal", "--strategy", "all", "--out", out / "pairs.parquet"],
        "train-dpo": ["train-dpo", "--pairs", inputs / "pairs.parquet", "--out", out, *TRAIN, "--device", "cpu"],
        "train-refl": ["train-refl", "--prompts", prompts, "--reward", "temporal", "--out", out, *TRAIN, *FAST],
        "train-scst": ["train-scst", "--prompts", prompts, "--reward", "temporal", "--out", out, *TRAIN, *FAST],
        "loop": ["loop", "--prompts", prompts, "--reward", "temporal", "--iterations", 2, "--prompts-per-iter", 2,
                 "--candidates", 2, "--steps-per-iter", 2, "--batch-size", 2, "--lora-rank", 4, "--eval-prompts",
                 "none", "--out", out, *FAST],
    }[stage]  # fmt: skip
    return [str(a) for a in args]


@dataclass
class Run:
    """One process of a stage: its exit status (-9: killed), wall time and the write points it passed."""

    code: int
    seconds: float
    points: int
    err: str = ""


def run(stage: str, inputs: Path, out: Path, crash_at: int | None = None, kill_after: float | None = None) -> Run:
    """Run ``stage`` into ``out`` in a child process; SIGKILL it at its ``crash_at``-th write point or after
    ``kill_after`` seconds."""
    count = out.parent / f".{out.name}.points"
    extra = {CRASH_ENV: str(crash_at)} if crash_at else {}
    argv = [sys.executable, "-c", RUNNER, str(count), *command(stage, inputs, out)]
    t0 = time.perf_counter()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra)) as p:
        try:
            _, err = p.communicate(timeout=kill_after if kill_after else 600)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
    points = int(count.read_text()) if count.is_file() else 0
    count.unlink(missing_ok=True)
    return Run(p.returncode, time.perf_counter() - t0, points, err)


# ---------------------------------------------------------------- what a finished run holds


def leftovers(out: Path) -> list[str]:
    """Temporary and lock files under ``out`` and the lock file of ``out`` itself, beside it (a killed writer's, not
    cleaned up by the rerun)."""
    found = [p for p in out.rglob(".*") if ".tmp" in p.name or p.name.endswith(".lock")]
    found += [p for p in [out.parent / f".{out.name}.lock"] if p.exists()]
    return sorted(os.path.relpath(p, out) for p in found)


def unreadable(out: Path) -> list[str]:
    """The Parquet files under ``out`` that do not read back as vpotool manifests (right after a kill: none may)."""
    bad = []
    for p in sorted(out.rglob("*.parquet")):
        try:
            pq.read_table(p)
            assert manifest_kind(p)
        except Exception as e:  # noqa: BLE001 (any failure to read back is the finding)
            bad.append(f"{p.relative_to(out)} unreadable after the kill: {e}")
    return bad


def manifests(out: Path) -> dict[str, list[dict]]:
    """Every Parquet manifest under ``out`` (relative path -> rows); each must read back as its recorded kind."""
    found = {}
    for p in sorted(out.rglob("*.parquet")):
        assert manifest_kind(p), f"{p} has no vpotool metadata"
        found[str(p.relative_to(out))] = pq.read_table(p).to_pylist()
    return found


KEYS = {"samples": ("sample_id",), "scores": ("sample_id", "reward"), "pairs": ("pair_id",), "prompts": ("prompt_id",),
        "metrics": ("step",)}  # fmt: skip


def ids(name: str, rows: list[dict]) -> list[tuple]:
    """The key of every row of manifest ``name`` (by its file name), in file order."""
    kind = next((k for k in KEYS if Path(name).stem.startswith(k)), None)
    return [tuple(r[c] for c in KEYS[kind]) for r in rows] if kind else []


def adapters(out: Path) -> dict[str, dict]:
    """Each checkpoint's adapter tensors by checkpoint name."""
    return {
        p.parent.name: load_file(p) for p in sorted(out.glob("checkpoints/step-*/pytorch_lora_weights.safetensors"))
    }


def latents(out: Path) -> dict[str, torch.Tensor]:
    """Every stored latent under ``out`` by relative path."""
    return {str(p.relative_to(out)): load_file(p)["latents"] for p in sorted(out.rglob("latents/*.safetensors"))}


def compare(out: Path, reference: Path) -> list[str]:
    """What differs between a killed-and-rerun ``out`` and the uninterrupted ``reference`` (empty: clean)."""
    problems = [f"left behind: {p}" for p in leftovers(out)]
    got, want = manifests(out), manifests(reference)
    if sorted(got) != sorted(want):
        problems.append(f"manifests {sorted(got)} != {sorted(want)}")
    for name in set(got) & set(want):
        a, b = ids(name, got[name]), ids(name, want[name])
        if len(set(a)) != len(a):
            problems.append(f"{name}: duplicate ids")
        if sorted(a) != sorted(b):
            problems.append(f"{name}: ids {sorted(set(b) - set(a))} missing, {sorted(set(a) - set(b))} extra")
        if name.endswith("scores.parquet") and sorted(a) == sorted(b):
            by_key = {k: r["overall"] for k, r in zip(b, want[name], strict=True)}
            if any(by_key[k] != r["overall"] for k, r in zip(a, got[name], strict=True)):
                problems.append(f"{name}: scores differ")
    for name, rows in got.items():
        for r in rows if Path(name).stem.startswith("samples") else []:
            if not (out / Path(name).parent / r["video"]).is_file():
                problems.append(f"{name}: {r['video']} missing")
    videos = {str(p.relative_to(out)) for p in out.rglob("videos/*.mp4")}
    if videos != {str(p.relative_to(reference)) for p in reference.rglob("videos/*.mp4")}:
        problems.append("the video files differ from the uninterrupted run's (unlisted or missing videos)")
    lat, lat_ref = latents(out), latents(reference)
    if sorted(lat) != sorted(lat_ref) or any(not torch.equal(lat[k], lat_ref[k]) for k in lat_ref if k in lat):
        problems.append("latents differ")
    ad, ad_ref = adapters(out), adapters(reference)
    if sorted(ad) != sorted(ad_ref):
        problems.append(f"checkpoints {sorted(ad)} != {sorted(ad_ref)}")
    for step in set(ad) & set(ad_ref):
        if any(not torch.allclose(ad[step][k], ad_ref[step][k], rtol=1e-5, atol=1e-6) for k in ad_ref[step]):
            problems.append(f"adapter {step} differs from the uninterrupted run's")
    return problems


# ---------------------------------------------------------------- the harness


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Prompts, samples, scores and pairs for the stages that read them, made once by an uninterrupted chain."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    for stage in ("sample", "score", "pair"):
        done = run(stage, folder, folder)
        assert done.code == 0, done.err
    return folder


@dataclass
class Tally:
    """Kills of one stage: how many landed (the process died of SIGKILL) and how many reruns ended clean."""

    stage: str
    kills: int = 0
    at_points: int = 0
    clean: int = 0
    finished_first: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def kill_points(reference: Run, n: int) -> list[tuple[int | None, float | None]]:
    """``n`` kill points: distinct write points spread over the reference run's (at most n - 1), then times spread
    over the first 80% of its wall time for the rest."""
    spread = [max(1, round(reference.points * (i + 1) / n)) for i in range(n - 1)]
    points = [(p, None) for p in sorted(set(spread))]
    times = n - len(points)
    return points + [(None, 0.8 * reference.seconds * (i + 1) / (times + 1)) for i in range(times)]


def kill_case(stage: str, inputs: Path, folder: Path, i: int, point: int | None, after: float | None):
    """Kill one run of ``stage`` in ``folder/kill-i``, check what it left, rerun it and compare with
    ``folder/reference``. Returns ``(exit status of the killed run, problems found)``."""
    out = folder / f"kill-{i}"
    killed = run(stage, inputs, out, crash_at=point, kill_after=after)
    if killed.code not in (0, -9):
        return killed.code, [f"exit {killed.code}: {killed.err.strip()[-300:]}"]
    problems = unreadable(out)
    rerun = run(stage, inputs, out)
    if rerun.code:
        problems.append(f"rerun exit {rerun.code}: {rerun.err.strip()[-300:]}")
    else:
        problems += compare(out, folder / "reference")
    return killed.code, problems


def harness(stage: str, inputs: Path, folder: Path, n: int, only: list[int] | None = None) -> Tally:
    """Kill ``stage`` at ``n`` points (or at the ``only`` indices of them), rerun and compare each with an
    uninterrupted run. Two cases run at a time (each child on one thread)."""
    t0 = time.perf_counter()
    reference = run(stage, inputs, folder / "reference")
    assert reference.code == 0, reference.err
    cases = [(i, p, t) for i, (p, t) in enumerate(kill_points(reference, n)) if only is None or i in only]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: kill_case(stage, inputs, folder, *c), cases))
    tally = Tally(stage)
    for (i, point, after), (code, problems) in zip(cases, results, strict=True):
        tally.kills += code == -9
        tally.at_points += code == -9 and point is not None
        tally.finished_first += code == 0
        tally.problems += [f"kill {i} (point {point}, {after and round(after, 1)} s): {p}" for p in problems]
        tally.clean += not problems
    tally.seconds = time.perf_counter() - t0
    return tally


def test_train_dpo_killed_while_writing_a_checkpoint_resumes_to_the_uninterrupted_result(inputs, tmp_path):
    # the third kill point of train-dpo: its first checkpoint's adapter saved, its trainer state not yet
    tally = harness("train-dpo", inputs, tmp_path, KILLS_PER_STAGE, only=[2])
    assert tally.problems == [] and tally.kills == tally.clean == 1, tally


STAGES = ["sample", "score", "pair", "train-dpo", "train-refl", "train-scst", "loop"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_survives_kills(stage, inputs, tmp_path):
    tally = harness(stage, inputs, tmp_path, KILLS_PER_STAGE)
    print(f"\ncrash-safety {stage}: {tally.kills} kills ({tally.at_points} at write points), "
          f"{tally.clean}/{KILLS_PER_STAGE} clean, {tally.finished_first} finished before the kill, "
          f"{tally.seconds:.0f} s")  # fmt: skip
    assert tally.problems == [], "\n".join(tally.problems)
    assert tally.kills >= 5 and tally.clean == KILLS_PER_STAGE


KILLED_WRITE = """import resource, signal, sys
from pathlib import Path
import torch
from vpotool.latents import save_latent
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; by default it kills
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # so the write dies part way, as a kill stops it
save_latent(Path(sys.argv[1]), torch.zeros(16, 64, 64), {})
"""


def test_a_safetensors_write_killed_part_way_leaves_only_a_temp_the_rerun_removes(tmp_path):
    from vpotool.latents import save_latent
    from vpotool.manifest import remove_stale_temps

    folder = tmp_path / "latents"
    folder.mkdir()
    child = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(folder / "a.safetensors")],
                           env=env(PYTHONDONTWRITEBYTECODE="1"), capture_output=True, text=True)  # fmt: skip
    assert child.returncode < 0, child.stderr  # killed by a signal, not finished
    assert [p.name for p in folder.iterdir()], "the killed write left nothing to clean"
    remove_stale_temps(folder)  # as a rerun of the stage does first
    assert sorted(p.name for p in folder.iterdir()) == []
    save_latent(folder / "b.safetensors", torch.zeros(2, 3), {})
    assert sorted(p.name for p in folder.iterdir()) == ["b.safetensors"]  # a finished write leaves no temp
