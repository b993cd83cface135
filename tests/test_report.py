"""``vpotool report``: SVG plots and data joins by hand, then the page of a tiny real run driven in headless Chromium
(curves drawn, videos decode and play in sync, filter, sort and paging work, no console errors)."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote

import pyarrow.parquet as pq
import pytest
from conftest import FAST

from vpotool.manifest import write_manifest
from vpotool.report.data import candidate_items, load_scores, pair_items, video_linker
from vpotool.report.html import reference_updates
from vpotool.report.plots import BOTTOM, LEFT, RIGHT, TOP, line_plot, nice_ticks

LOOP = ["--prompts-per-iter", 2, "--candidates", 2, "--steps-per-iter", 2, "--batch-size", 2, "--min-margin", 0, *FAST]


def vpotool(*args) -> int:
    """Run the CLI in-process outside a test (for module-scoped fixtures); returns the exit status."""
    from vpotool.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["vpotool", *map(str, args)])
        try:
            main()
        except SystemExit as e:
            return e.code or 0
    return 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny DPO loop: 2 iterations of 2 prompts x 2 candidates, 4 steps, reference updates every 2, an eval."""
    root = tmp_path_factory.mktemp("report")
    (root / "heldout.txt").write_text("a red circle moving left slowly on a black background\n")
    args = ["--iterations", 2, "--ref-update-interval", 2, "--eval-prompts", root / "heldout.txt", *LOOP]
    assert vpotool("loop", "--out", root / "run", *args) == 0
    return root / "run"


def pairs_of(run: Path) -> list[dict]:
    return [r for it in sorted(run.glob("iter-*")) for r in pq.read_table(it / "pairs.parquet").to_pylist()]


def embedded(page: Path) -> dict:
    """The gallery rows a report page carries."""
    match = re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>', page.read_text(), re.S)
    return json.loads(match.group(1))


# --- pure parts


def test_nice_ticks_are_round_and_cover_the_range():
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.13, 0.61, 4) == [0, 0.2, 0.4, 0.6, 0.8]
    assert nice_ticks(1, 4, 6, integer=True) == [1, 2, 3, 4]
    flat = nice_ticks(0.5, 0.5)
    assert flat[0] < 0.5 < flat[-1]


def test_line_plot_maps_points_onto_the_frame():
    svg = line_plot({"loss": [(0, 0.0), (1, 0.5), (2, 1.0), (3, float("nan"))]}, marks=[1], width=200, height=100)
    # x spans 0..2 across the frame, y ticks 0..1 up it; the NaN point is dropped
    right, bottom, mid = 200 - RIGHT, 100 - BOTTOM, (LEFT + 200 - RIGHT) / 2
    d = re.search(r'class="line"[^>]* d="([^"]+)"', svg).group(1)
    assert d == f"M{LEFT:.1f},{bottom:.1f} L{mid:.1f},{(bottom + TOP) / 2:.1f} L{right:.1f},{TOP:.1f}"
    assert svg.count("<circle") == 3 and "loss: 0.5 at step 1" in svg
    assert re.search(rf'class="mark" x1="{mid:.1f}"', svg)  # the reference update at step 1
    assert ">no data<" in line_plot({"loss": [(1, float("nan"))]})


def test_line_plot_draws_a_legend_for_several_series():
    svg = line_plot({"chosen": [(0, 1), (1, 2)], "rejected": [(0, 0), (1, 1)]}, xlabel="iteration")
    assert svg.count('class="line"') == 2 and ">chosen<" in svg and ">rejected<" in svg and ">iteration<" in svg


def test_reference_updates_from_the_metric_or_the_interval():
    logged = [{"step": s, "ref_updated": float(s == 3)} for s in range(1, 5)]
    assert reference_updates(logged, {"ref_update_interval": 2}) == [3]
    plain = [{"step": s} for s in range(1, 7)]
    assert reference_updates(plain, {"ref_update_interval": 2}) == [2, 4, 6]
    assert reference_updates(plain, {"ref_update_interval": 2, "algo": "refl"}) == []
    assert reference_updates(plain, {}) == []


@pytest.fixture
def scores_file(tmp_path) -> Path:
    rows = [
        dict(sample_id="a", prompt_id="p", reward="world", overall=0.9, motion=0.2),
        dict(sample_id="b", prompt_id="p", reward="world", overall=0.1, motion=0.8),
        dict(sample_id="a", prompt_id="p", reward="flicker", overall=0.5),
    ]
    write_manifest(tmp_path / "run" / "scores.parquet", rows, "scores")
    return tmp_path / "run" / "scores.parquet"


def test_scores_join_every_dimension_of_every_reward(scores_file):
    scores = load_scores(scores_file)
    assert list(scores["a"]) == ["world.overall", "world.motion", "flicker.overall"]
    assert scores["b"] == {"world.overall": 0.1, "world.motion": 0.8}  # no NaN for the other reward's columns


def test_pair_items_carry_both_sides_and_relative_videos(scores_file, tmp_path):
    row = dict(pair_id="a>b", prompt_id="p", prompt="a red circle", chosen_id="a", rejected_id="c",
               chosen_score=0.9, rejected_score=0.2, margin=0.7, dimension="overall", source="world",
               chosen_video="videos/a.mp4", rejected_video="videos/gone.mp4",
               chosen_latent="", rejected_latent="")  # fmt: skip
    (tmp_path / "run" / "videos").mkdir()
    (tmp_path / "run" / "videos" / "a.mp4").touch()
    link = video_linker(scores_file.with_name("pairs.parquet"), tmp_path / "run" / "report")
    (item,) = pair_items([row], load_scores(scores_file), link, iteration=3)
    assert item["margin"] == 0.7 and item["iteration"] == 3 and item["prompt"] == "a red circle"
    chosen, rejected = item["videos"]
    assert chosen["label"] == "chosen" and chosen["video"] == "../videos/a.mp4"
    assert chosen["scores"]["world.motion"] == 0.2
    assert rejected["video"] is None  # a missing file shows as "no video" rather than a broken player
    assert rejected["scores"] == {"overall": 0.2}  # unscored: the pair's own score


def test_candidate_items_rank_a_prompts_candidates(tmp_path):
    rows = [
        dict(sample_id=f"s{i}", prompt_id="p", prompt="a square", candidate=i, video=f"v {i}.mp4") for i in range(3)
    ]
    for r in rows:
        (tmp_path / r["video"]).touch()
    scores = {"s0": {"overall": 0.2}, "s1": {"overall": 0.7}}
    (item,) = candidate_items(rows, scores, video_linker(tmp_path / "samples.parquet", tmp_path))
    assert [v["id"] for v in item["videos"]] == ["s1", "s0", "s2"]  # best first, unscored last
    assert item["videos"][0]["label"] == "#1 · candidate 1" and item["videos"][0]["video"] == "v%201.mp4"
    assert item["margin"] == pytest.approx(0.5)


# --- the command


def test_report_of_a_run_links_videos_that_move_with_it(cli, run, tmp_path):
    code, out, err = cli("report", run)
    assert code == 0, err
    page = run / "report" / "index.html"
    assert f"wrote {page}" in out and [p.name for p in page.parent.iterdir()] == ["index.html"]  # no temp left
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    data = embedded(moved / "report" / "index.html")
    assert data["kind"] == "pairs" and len(data["items"]) == len(pairs_of(run)) == 4
    for item in data["items"]:
        assert {v["label"] for v in item["videos"]} == {"chosen", "rejected"}
        for v in item["videos"]:
            assert not Path(v["video"]).is_absolute()
            assert (moved / "report" / unquote(v["video"])).resolve().is_file()
            assert {"overall", "motion", "text_alignment"} <= set(v["scores"])
    code, out, err = cli("report", run / "iter-0000" / "pairs.parquet")  # one manifest: its sibling scores join
    assert code == 0, err
    one, _ = embedded(run / "iter-0000" / "report" / "index.html")["items"]
    assert one["iteration"] is None and "motion" in one["videos"][0]["scores"]
    assert (run / "iter-0000" / "report" / unquote(one["videos"][0]["video"])).is_file()
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from the network
    assert "world.overall" in html and "run/step-4" in html  # the eval table


def test_report_rejects_bad_input_in_one_line(cli, run, tmp_path):
    (tmp_path / "empty").mkdir()
    lone = tmp_path / "lone" / "samples.parquet"
    lone.parent.mkdir()
    shutil.copy(run / "iter-0000" / "samples.parquet", lone)
    cases = [
        ([tmp_path / "nope"], "not found; pass a run folder"),
        ([tmp_path / "empty"], "has nothing to report"),
        ([run / "iter-0000" / "scores.parquet"], "is a scores manifest; report its samples"),
        ([lone], "needs its scores: pass --scores"),
        ([run, "--scores", run / "iter-0000" / "scores.parquet"], "--scores is for a single"),
        ([run, "--page-size", 0], "--page-size must be at least 1"),
    ]
    for args, message in cases:
        code, _, err = cli("report", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


# --- the page in a browser


def wait(browser, script: str, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda d: d.execute_script(script))


VIDEOS_LOADED = "return [...document.querySelectorAll('#cards video')].every(v => v.readyState >= 1 || v.error)"
VIDEO_STATE = "return [...document.querySelectorAll('#cards video')].map(v => [v.readyState, v.error && v.error.code])"


def card_ids(browser) -> list[str]:
    return browser.execute_script("return [...document.querySelectorAll('#cards .card')].map(c => c.dataset.id)")


def assert_no_console_errors(browser):
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_run_page_draws_curves_and_plays_pairs_in_sync(cli, run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out = tmp_path / "page"
    code, _, err = cli("report", run, "--out", out, "--page-size", 2)
    assert code == 0, err
    browser.get((out / "index.html").as_uri())

    # curves: one plot per metric with a drawn line, and the reference updates of steps 2 and 4 marked
    plots = browser.find_elements(By.CSS_SELECTOR, "#curves svg.plot")
    assert len(plots) >= 4
    assert all(p.find_element(By.CSS_SELECTOR, "path.line").get_attribute("d").count("L") >= 1 for p in plots)
    assert len(plots[0].find_elements(By.CSS_SELECTOR, "line.mark")) == 2
    assert len(browser.find_elements(By.CSS_SELECTOR, "#eval table.eval tbody tr")) >= 5

    # the gallery: 2 of 4 pairs per page, each with two videos that decode
    pairs = {p["pair_id"]: p for p in pairs_of(run)}
    assert len(card_ids(browser)) == 2
    assert all(len(c.find_elements(By.TAG_NAME, "video")) == 2 for c in browser.find_elements(By.CLASS_NAME, "card"))
    wait(browser, VIDEOS_LOADED)
    assert all(ready >= 1 and error is None for ready, error in browser.execute_script(VIDEO_STATE))

    # one button plays both videos of a card; the slider seeks both
    card = browser.find_element(By.CLASS_NAME, "card")
    card.find_element(By.CSS_SELECTOR, "button.play").click()
    wait(browser, "return [...document.querySelectorAll('.card')[0].querySelectorAll('video')].every(v => !v.paused)")
    card.find_element(By.CSS_SELECTOR, "button.play").click()
    slider = "document.querySelector('.card input[type=range]')"
    browser.execute_script(f"const s = {slider}; s.value = 500; s.dispatchEvent(new Event('input'))")
    times = browser.execute_script("return [...document.querySelectorAll('.card')[0].querySelectorAll('video')]"
                                   ".map(v => [v.paused, v.currentTime / v.duration])")  # fmt: skip
    assert all(paused and t == pytest.approx(0.5, abs=0.05) for paused, t in times)

    # sorted by margin, largest first, then smallest first; paging walks the rest
    by_margin = sorted(pairs, key=lambda k: -pairs[k]["margin"])
    assert card_ids(browser) == by_margin[:2]
    Select(browser.find_element(By.ID, "sort")).select_by_value("margin-asc")
    assert card_ids(browser) == by_margin[::-1][:2]
    assert browser.find_element(By.ID, "prev").get_attribute("disabled")
    browser.find_element(By.ID, "next").click()
    assert card_ids(browser) == by_margin[::-1][2:]
    assert browser.find_element(By.ID, "page").text == "page 2 of 2"
    wait(browser, VIDEOS_LOADED)

    # filtering by prompt text
    words = pairs[by_margin[0]]["prompt"].split(" on ")[0]  # e.g. "a yellow circle moving left quickly"
    browser.find_element(By.ID, "filter").send_keys(words.upper())
    assert card_ids(browser) == [k for k in by_margin[::-1] if pairs[k]["prompt"].startswith(words)]
    assert browser.find_element(By.ID, "page").text == "page 1 of 1"
    assert browser.find_element(By.ID, "count").text.endswith("of 4 pairs")
    assert_no_console_errors(browser)


def test_samples_page_ranks_candidates(cli, run, browser, tmp_path):
    from selenium.webdriver.common.by import By

    it = run / "iter-0001"
    code, _, err = cli("report", it / "samples.parquet", "--scores", it / "scores.parquet", "--out", tmp_path)
    assert code == 0, err
    browser.get((tmp_path / "index.html").as_uri())
    assert not browser.find_elements(By.ID, "curves")  # a lone manifest has no metrics
    cards = browser.find_elements(By.CLASS_NAME, "card")
    assert len(cards) == 2 and browser.find_element(By.ID, "count").text == "2 of 2 prompts"
    overall = {r["sample_id"]: r["overall"] for r in pq.read_table(it / "scores.parquet").to_pylist()}
    for card in cards:
        videos = card.find_elements(By.TAG_NAME, "video")
        ranked = [overall[v.get_attribute("title")] for v in videos]
        assert len(videos) == 2 and ranked == sorted(ranked, reverse=True)
        assert card.find_element(By.CSS_SELECTOR, "figcaption").text.startswith("#1 · candidate")
    wait(browser, VIDEOS_LOADED)
    assert all(ready >= 1 and error is None for ready, error in browser.execute_script(VIDEO_STATE))
    assert_no_console_errors(browser)


def test_eval_of_long_videos_plots_the_drift_curves():
    from vpotool.report.html import drift_plots, evaluation

    rows = [
        dict(checkpoint=c, metric=f"world.rate.static.seg{k}", mean=v, std=0.0, n=4, win_rate=0.5)
        for c, vals in (("base", (0.0, 0.25, 0.5)), ("run/step-8", (0.0, 0.0, 0.25)))
        for k, v in enumerate(vals, 1)
    ]
    rows += [dict(checkpoint="base", metric="world.drift.static", mean=0.25, std=math.nan, n=4, win_rate=math.nan)]
    html = drift_plots(rows)
    assert html.count("<figure>") == 1 and "static per segment<small>slope: base +0.250</small>" in html
    assert html.count("<path") >= 2  # one line per checkpoint
    short = [dict(checkpoint="base", metric="world.rate.static", mean=0.1, std=0.0, n=4, win_rate=0.5)]
    assert drift_plots(short) == "" and "<figure>" not in evaluation(short)


def test_eval_table_marks_each_metric_with_its_direction(tmp_path):
    from vpotool.manifest import write_manifest
    from vpotool.report.html import eval_section
    from vpotool.stages.eval import write_eval

    rows = [
        dict(checkpoint=c, metric=m, mean=0.1, std=0.0, n=4, win_rate=0.5)
        for c in ("base", "run/step-8")
        for m in ("world.overall", "world.rate.flicker", "world.rate.static", "world.frechet")
    ]
    write_eval(tmp_path / "eval.parquet", rows, {})
    write_manifest(tmp_path / "old.parquet", rows, "eval")  # written before eval recorded directions
    for name in ("eval.parquet", "old.parquet"):
        html = eval_section(tmp_path / name)
        assert "<th>world.overall ↑</th>" in html and "<th>world.frechet ↓</th>" in html
        assert "<th>world.rate.flicker ↓</th>" in html and "<th>world.rate.static ↓</th>" in html
