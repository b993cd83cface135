"""Hostile inputs to every registered model family, reward, judge and GPU, derived from what each entry declares:
its options (with their types and ranges) and the files its loader reads. Each input must stop with exit status 2
and one stderr line naming the flag or file, no traceback, and nothing written under ``--out``.

The cases follow the registries, so a family, reward or judge registered tomorrow is swept the day it is added; an
entry that declares nothing fails here rather than being skipped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST

from vpotool.gpus import GPUS
from vpotool.models import MODEL_OPTIONS, MODELS
from vpotool.rewards import JUDGE_OPTIONS, REWARD_CHECKPOINTS, REWARD_OPTIONS, REWARDS, WEIGHT_FREE
from vpotool.rewards.unifiedreward import JUDGES

ASSETS = Path(__file__).resolve().parents[1] / "vpotool" / "assets"
# Files whose damage a loader must name: the configs it parses, and the largest weights file it reads.
CONFIG_NAMES = ("model_index.json", "config.json", "model_config.json", "scheduler_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def refused(result, *words) -> str:
    """Exit status 2 and exactly one stderr line holding every one of ``words``, no traceback."""
    code, _, err = result
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    for w in words:
        assert str(w) in err, err
    return err.strip()


def nothing_under(folder: Path) -> None:
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []
    assert not written, f"wrote {written} under --out"


def run(cli, *args):
    """``cli(*args)``, with an exception escaping the entry point turned into the traceback a user would see."""
    import traceback

    try:
        return cli(*args)
    except Exception as e:  # noqa: BLE001 - what escapes main() is the failure under test
        return 1, "", "".join(traceback.format_exception(e))


# ---------------------------------------------------------------- what each entry declares


def declared(table: dict, name: str) -> dict:
    assert name in table, f"{name} is registered but declares no options table (an empty dict says 'none')"
    return table[name]


def bad_values(option) -> list[tuple[str, str]]:
    """(value, why) pairs an option must refuse: a wrong type for typed options, and values out of its range."""
    default = getattr(option, "default", option)  # a model option is its default; a reward option a record
    kind = getattr(option, "kind", None) or (type(default) if default is not None else None)
    out = []
    if kind is bool:
        out.append(("maybe", "wrong type"))
    elif kind in (int, float):
        out.append(("lots", "wrong type"))
        if getattr(option, "minimum", None) is not None:
            out.append((str(option.minimum - 1), "out of range"))
    if getattr(option, "choices", None):
        out.append(("no-such-choice", "out of range"))
    return out


def reward_cases():
    cases = []
    for name in sorted(REWARDS):
        cases += [(name, "unknown option"), (name, "option of a reward not scored"), (name, "declares options")]
        for option, spec in REWARD_OPTIONS.get(name, {}).items():
            cases += [(name, f"{option}={value} ({why})") for value, why in bad_values(spec)]
        if name not in WEIGHT_FREE:
            needs_path = REWARD_CHECKPOINTS[name][1] is None  # no default checkpoint: --reward-path is required
            cases += [(name, what) for what in ("no path",) * needs_path + ("missing folder", "empty folder")]
            cases += [(name, "damaged files")]
    return cases


def judge_cases():
    cases = []
    for name in sorted(JUDGES):
        cases += [(name, "unknown option"), (name, "declares options")]
        for option, spec in JUDGE_OPTIONS.get(name, {}).items():
            cases += [(name, f"{option}={value} ({why})") for value, why in bad_values(spec)]
        cases += [(name, what) for what in ("no path", "missing folder", "empty folder", "damaged files")]
    return cases


def model_cases():
    cases = []
    for name in sorted(MODELS):
        cases += [(name, "unknown option"), (name, "option of another family")]
        for option, default in MODEL_OPTIONS.get(name, {}).items():
            cases += [(name, f"{option}={value} ({why})") for value, why in bad_values(default)]
        cases += [(name, what) for what in ("missing folder", "empty folder")]
    return cases


# ---------------------------------------------------------------- inputs


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """A reward without --reward-path falls back to a hub id; here that must fail at once, not wait on a network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """One prompt, two candidates of the tiny model: the samples every reward and judge case scores."""
    from vpotool.config import SampleConfig, build_config
    from vpotool.stages.sample import run_sample

    root = tmp_path_factory.mktemp("hostile")
    (root / "p.txt").write_text("a red circle moving left slowly on a black background\n")  # a world prompt
    flags = {f.lstrip("-"): int(v) if v.isdigit() else v for f, v in zip(FAST[::2], FAST[1::2], strict=True)}
    cfg = build_config(SampleConfig, None, prompts=str(root / "p.txt"), out=str(root / "run"), candidates=2, **flags)
    run_sample(cfg)
    return root


def damaged_copies(folder: Path, root: Path) -> list[tuple[Path, Path, str]]:
    """Copies of checkpoint ``folder`` with one file damaged each: every config it holds made invalid JSON, then
    empty, and its largest weights file cut to half. ``(copy, damaged file, what was done)`` each."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file()]
    configs = [p for p in files if p.name in CONFIG_NAMES]
    weights = sorted((p for p in files if p.suffix in WEIGHT_SUFFIXES), key=lambda p: p.stat().st_size)
    assert configs or weights, f"{folder} holds no config or weights file to damage"
    out = []
    jobs = [(c, "invalid JSON") for c in configs] + [(c, "empty") for c in configs]
    jobs += [(weights[-1], "cut short")] if weights else []
    for i, (target, how) in enumerate(jobs):
        copy = root / f"damaged-{i}"
        if not copy.exists():
            shutil.copytree(folder, copy, symlinks=True)
        damaged = copy / target.relative_to(folder)
        data = target.read_bytes()
        half = data[: len(data) // 2]
        damaged.write_bytes({"invalid JSON": half or b"{", "empty": b""}.get(how, half))
        out.append((copy, damaged, how))
    return out


def reward_checkpoint(name: str, root: Path, run_folder: Path) -> tuple[str, str]:
    """A tiny checkpoint of reward ``name``: its ``--reward-path`` and ``--reward-options`` values."""
    from tiny_rewards import save_tiny_reward

    root.mkdir(parents=True, exist_ok=True)
    if name == "reference":  # --reward-path is a VideoMAE classifier; the clips are an option
        from transformers import VideoMAEConfig, VideoMAEForVideoClassification

        sizes = dict(image_size=16, patch_size=8, num_frames=2, tubelet_size=2, hidden_size=16, num_hidden_layers=1)
        config = VideoMAEConfig(**sizes, num_attention_heads=2, intermediate_size=16, num_labels=2)
        VideoMAEForVideoClassification(config).save_pretrained(root / "videomae")
        return str(root / "videomae"), f"reference.videos={run_folder / 'run' / 'videos'}"
    return save_tiny_reward(name, root)


# ---------------------------------------------------------------- rewards


def score(cli, run_folder, out, *flags):
    samples = run_folder / "run" / "samples.parquet"
    return run(cli, "score", "--samples", samples, "--out", out, "--device", "cpu", *flags)


@pytest.mark.parametrize("name, case", reward_cases(), ids=lambda x: str(x))
def test_reward(cli, run_folder, tmp_path, name, case):
    out = tmp_path / "out" / "scores.parquet"
    options = REWARD_OPTIONS.get(name, {})
    if case == "declares options":
        declared(REWARD_OPTIONS, name)
        return
    if case == "unknown option":
        line = refused(score(cli, run_folder, out, "--reward", name, "--reward-options", f"{name}.zoom=3"),
                       "--reward-options", "zoom")  # fmt: skip
        for option in options:
            assert option in line
    elif case == "option of a reward not scored":
        other = next(n for n in sorted(REWARD_OPTIONS) if n != name and REWARD_OPTIONS[n])
        option = next(iter(REWARD_OPTIONS[other]))
        default = REWARD_OPTIONS[other][option].default
        refused(score(cli, run_folder, out, "--reward", name, "--reward-options", f"{other}.{option}={default}"),
                "--reward-options", other, "--reward")  # fmt: skip
    elif "=" in case:
        option, value = case.split(" ")[0].split("=", 1)
        refused(score(cli, run_folder, out, "--reward", name, "--reward-options", f"{name}.{option}={value}"),
                "--reward-options", option)  # fmt: skip
    elif case == "no path":
        path, extra = reward_checkpoint(name, tmp_path / "ckpt", run_folder)
        flags = ["--reward-options", extra] if extra else []
        refused(score(cli, run_folder, out, "--reward", name, *flags), "--reward-path")
    elif case in ("missing folder", "empty folder"):
        path, extra = reward_checkpoint(name, tmp_path / "ckpt", run_folder)
        where = tmp_path / "nowhere"
        if case == "empty folder":
            where.mkdir()
        flags = ["--reward-options", extra] if extra else []
        line = refused(score(cli, run_folder, out, "--reward", name, "--reward-path", where, *flags), where)
        if case == "missing folder":
            assert "not exist" in line or "no weights" in line or "no file" in line or "no checkpoint" in line, line
    else:
        path, extra = reward_checkpoint(name, tmp_path / "ckpt", run_folder)
        if not path:
            pytest.fail(f"reward {name} declares no checkpoint files to damage")
        flags = ["--reward-options", extra] if extra else []
        if Path(path).is_file():  # a weights file itself (aesthetic's head, hpsv2, raft): cut it short
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            refused(score(cli, run_folder, out, "--reward", name, "--reward-path", path, *flags), Path(path).name)
            nothing_under(out.parent)
            return
        for copy, damaged, how in damaged_copies(Path(path), tmp_path / "damaged"):
            given = copy
            result = score(cli, run_folder, out, "--reward", name, "--reward-path", given, *flags)
            try:
                refused(result, damaged.name)
            except AssertionError as e:
                raise AssertionError(f"{damaged.relative_to(copy)} {how}: {e}") from None
            nothing_under(out.parent)
    nothing_under(out.parent)


# ---------------------------------------------------------------- judges


def label(cli, run_folder, out, *flags):
    samples = run_folder / "run" / "samples.parquet"
    return run(cli, "label", "--samples", samples, "--out", out, "--device", "cpu", *flags)


@pytest.mark.parametrize("name, case", judge_cases(), ids=lambda x: str(x))
def test_judge(cli, run_folder, tmp_path, name, case):
    from tiny_rewards import recorded_judge

    out = tmp_path / "out" / "labels.parquet"
    path, extra = recorded_judge(name, tmp_path)
    if case == "declares options":
        declared(JUDGE_OPTIONS, name)
        return
    if case == "unknown option":
        refused(label(cli, run_folder, out, "--judge", name, "--judge-path", path, "--judge-options", "zoom=3"),
                "--judge-options", "zoom")  # fmt: skip
    elif "=" in case:
        option, value = case.split(" ")[0].split("=", 1)
        flags = ("--judge", name, "--judge-path", path, "--judge-options", f"{extra},{option}={value}")
        refused(label(cli, run_folder, out, *flags), "--judge-options", option)
    elif case == "no path":
        refused(label(cli, run_folder, out, "--judge", name, "--judge-options", extra), "--judge-path")
    elif case in ("missing folder", "empty folder"):
        where = tmp_path / "nowhere"
        if case == "empty folder":
            where.mkdir()
        line = refused(label(cli, run_folder, out, "--judge", name, "--judge-path", where, "--judge-options", extra),
                       where)  # fmt: skip
        if case == "missing folder":
            assert "does not exist" in line, line
    else:
        for copy, damaged, how in damaged_copies(Path(path), tmp_path / "damaged"):
            result = label(cli, run_folder, out, "--judge", name, "--judge-path", copy, "--judge-options", extra)
            try:
                refused(result, damaged.name)
            except AssertionError as e:
                raise AssertionError(f"{damaged.relative_to(copy)} {how}: {e}") from None
    nothing_under(out.parent)


# ---------------------------------------------------------------- model families


def model_checkpoint(name: str, root: Path) -> tuple[Path, list[str]]:
    """A tiny checkpoint of family ``name`` (``--model-path``) and the flags it needs beside it."""
    from families import BUILDERS, make_tiny_checkpoint

    if name in ("tiny", "tiny-ar"):
        return ASSETS / name, []
    if name in BUILDERS:
        return Path(make_tiny_checkpoint(name, root / name)), []
    if name == "opensora":
        from test_opensora import make_tiny_opensora

        return Path(make_tiny_opensora(root / name)), []
    if name == "self-forcing":  # the generator checkpoint is an option; the folder is checked beside it
        (root / "gen.pt").write_bytes(b"")
        return Path(make_tiny_checkpoint("wan", root / name)), ["--model-options", f"checkpoint={root / 'gen.pt'}"]
    pytest.fail(f"model family {name} has no tiny checkpoint in this test; add one")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(name):
        if name not in made:
            made[name] = model_checkpoint(name, root)
        return made[name]

    return get


def sample(cli, run_folder, out, *flags):
    return run(cli, "sample", "--prompts", run_folder / "p.txt", "--out", out, *FAST, *flags)


@pytest.mark.parametrize("name, case", model_cases(), ids=lambda x: str(x))
def test_model(cli, run_folder, checkpoints, tmp_path, name, case):
    out = tmp_path / "out"
    options = declared(MODEL_OPTIONS, name)
    if case == "unknown option":
        line = refused(sample(cli, run_folder, out, "--model", name, "--model-options", "zoom=3"), "--model-options")
        for option in options:
            assert option in line
    elif case == "option of another family":
        other, option = next((n, o) for n, opts in sorted(MODEL_OPTIONS.items()) for o in opts if o not in options)
        value = MODEL_OPTIONS[other][option]
        refused(sample(cli, run_folder, out, "--model", name, "--model-options", f"{option}={value}"),
                "--model-options", option)  # fmt: skip
    elif "=" in case:
        option, value = case.split(" ")[0].split("=", 1)
        refused(sample(cli, run_folder, out, "--model", name, "--model-options", f"{option}={value}"),
                "--model-options", option)  # fmt: skip
    elif case in ("missing folder", "empty folder"):
        where = tmp_path / "nowhere"
        if case == "empty folder":
            where.mkdir()
        _, flags = checkpoints(name)
        refused(sample(cli, run_folder, out, "--model", name, "--model-path", where, *flags), where)
    nothing_under(out)


# ---------------------------------------------------------------- GPUs of the planner


@pytest.mark.parametrize("text", [f"{name}x" for name in sorted(GPUS)] + ["0GB", "-8GB", "1e999GB"])
def test_gpu(cli, tmp_path, monkeypatch, text):
    """A misspelt GPU and impossible memory sizes: one line naming --gpu and what it takes; a plan writes nothing."""
    monkeypatch.chdir(tmp_path)
    line = refused(run(cli, "plan", "sample", "--gpu", text), f"--gpu {text}")
    assert "h100" in line and "80GB" in line, line
    assert not list(tmp_path.iterdir())


def test_every_registry_is_swept():
    """The cases above come from the registries: each entry has its own."""
    assert {n for n, _ in reward_cases()} == set(REWARDS)
    assert {n for n, _ in judge_cases()} == set(JUDGES)
    assert {n for n, _ in model_cases()} == set(MODELS)
    assert json.loads(json.dumps(sorted(GPUS)))
