"""Shared test helpers: run the CLI in-process, small prompt files, fast tiny-model settings."""

from __future__ import annotations

import sys

import pytest

# Small and fast settings for the tiny model: 9 frames of 16x16 (3 latent frames of 4x4), 3 denoising steps.
FAST = ["--frames", "9", "--height", "16", "--width", "16", "--steps", "3", "--device", "cpu"]


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*args) -> (exit_code, stdout, stderr)``, through the real entry point (error handling included)."""
    from vpotool.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["vpotool", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


TRAIN_PROMPTS = "a red circle moving left\na blue square moving up\n"


@pytest.fixture
def prompts(tmp_path):
    """Two training prompts in ``train.txt`` (test files that need other prompts define their own)."""
    p = tmp_path / "train.txt"
    p.write_text(TRAIN_PROMPTS)
    return p


def one_line_error(result, *words):
    """Assert that a ``cli`` result is exit 2 with one line of error (no traceback) holding every one of ``words``."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


@pytest.fixture
def prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle moving left on a black background\n\n# a comment\na blue square moving up\n")
    return p


def run_chain(cli, prompts_file, run, *sample_args):
    """sample (2 candidates; tiny FAST settings unless ``sample_args`` say otherwise) -> score -> pair in ``run``."""
    args = sample_args or FAST
    code, _, err = cli("sample", "--prompts", prompts_file, "--candidates", 2, "--out", run, *args)
    assert code == 0, err
    samples, scores = run / "samples.parquet", run / "scores.parquet"
    code, _, err = cli("score", "--samples", samples, "--reward", "temporal", "--out", scores)
    assert code == 0, err
    code, _, err = cli("pair", "--samples", samples, "--scores", scores, "--out", run / "pairs.parquet")
    assert code == 0, err


def family_args(family, folder):
    """``sample`` flags for a tiny saved diffusers checkpoint of ``family`` (see tests/families.py)."""
    from families import FAMILY_SIZES

    frames, height, width = FAMILY_SIZES[family]
    size = ["--frames", frames, "--height", height, "--width", width, "--steps", 2, "--device", "cpu"]
    return ["--model", family, "--model-path", folder, *size]


def held_out_brightness(backend, size: dict) -> float:
    """Mean brightness of deterministic samples for prompts and seeds no trainer test trains on."""
    import torch

    from vpotool.stages.sample import generate

    prompts = ["a green ring moving down", "a yellow dot moving right"]
    with torch.no_grad():
        _, frames = generate(backend, prompts, [101, 202], {**size, "noise_level": 0.0})
    return frames.mean().item()


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by selenium (Debian's chromium and chromium-driver; `.ci/run` installs them).

    Its console log is read with ``browser.get_log("browser")``."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,900"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


@pytest.fixture
def fps_seen(monkeypatch):
    """Registers reward ``fps-seen`` (brightness that takes fps, as raft does) and returns the fps values it was
    called with, in call order."""
    from vpotool import rewards
    from vpotool.rewards.simple import BrightnessReward

    seen = []

    class FpsSeen(BrightnessReward):
        takes_fps = True

        def __call__(self, frames, prompts, fps=None):
            seen.append(fps)
            return super().__call__(frames, prompts)

    monkeypatch.setitem(rewards.REWARDS, "fps-seen", lambda **kw: FpsSeen())
    return seen


def scored_fps(seen: list, prompts, run, size: dict) -> set:
    """The fps values ``score`` calls reward ``fps-seen`` with on tiny-model samples of ``prompts`` at ``size``."""
    from vpotool.config import SampleConfig, ScoreConfig
    from vpotool.stages.sample import run_sample
    from vpotool.stages.score import run_score

    samples = run_sample(SampleConfig(prompts=str(prompts), out=str(run), device="cpu", **size))
    before = len(seen)
    run_score(ScoreConfig(samples=str(samples), out=str(run / "scores.parquet"), reward="fps-seen"))
    return set(seen[before:])
