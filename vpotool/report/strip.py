"""Frame strips: a PNG that shows, for a few prompts, a handful of frames of each checkpoint's video side by side,
so a reader sees what a model makes before reading a number about it.

It reads samples manifests (and their videos) only. ``vpotool eval`` writes one to ``OUT/strip.png``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from vpotool.manifest import read_manifest, resolve
from vpotool.video import read_video

LABEL_WIDTH = 150  # pixels of text column left of each row
LABEL_CHARS = 24  # characters per label line that fit it
GAP = 4


def pick_frames(n_frames: int, count: int) -> list[int]:
    """``count`` frame indices spread evenly from the first to the last frame."""
    if count >= n_frames:
        return list(range(n_frames))
    return [round(i * (n_frames - 1) / (count - 1)) for i in range(count)]


def _scaled(frame: np.ndarray, height: int) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    size = (max(1, round(w * height / h)), height)
    resample = Image.NEAREST if height >= h else Image.BILINEAR
    return np.asarray(Image.fromarray(frame).resize(size, resample))


def frame_strip(
    runs: dict[str, str | Path], out: str | Path, prompts: int = 6, frames: int = 6, candidate: int = 0,
    tile_height: int = 96,
) -> Path:  # fmt: skip
    """Write ``out`` (PNG): for each of the first ``prompts`` prompt ids shared by every run, one row per run
    (``runs``: name -> samples.parquet) with ``frames`` frames of its ``candidate`` video, each scaled to
    ``tile_height`` pixels high (pixel-exact when enlarged). Every run's video of a prompt has the same seed when
    the runs were sampled with the same ``--seed`` (as eval does), so rows differ only by the model."""
    tables = {name: read_manifest(path, "samples").to_pylist() for name, path in runs.items()}
    videos = {
        name: {r["prompt_id"]: (r, Path(path)) for r in rows if r["candidate"] == candidate}
        for (name, rows), path in zip(tables.items(), runs.values(), strict=True)
    }
    shared = [pid for pid in videos[next(iter(runs))] if all(pid in v for v in videos.values())][:prompts]
    groups = []
    for pid in shared:
        clips = []
        for name in runs:
            row, manifest = videos[name][pid]
            clips.append((name, read_video(resolve(manifest, row["video"]))[:, : row["height"], : row["width"]]))
        groups.append((row["prompt"], clips))  # a prompt id's prompt is the same in every run
    if not groups:
        raise ValueError("no prompt is shared by every run; nothing to draw")
    return draw_strip(groups, out, frames, tile_height)


def draw_strip(
    groups: list[tuple[str, list[tuple[str, np.ndarray]]]], out: str | Path, frames: int | None = 6,
    tile_height: int = 96,
) -> Path:  # fmt: skip
    """Write ``out`` (PNG): per group (a prompt and its named clips, uint8 ``[T, H, W, 3]``), one row per clip with
    ``frames`` of its frames spread from first to last (every frame when None), each scaled to ``tile_height``
    pixels high; the prompt labels the group's first row, the clip's name each row."""
    from PIL import Image, ImageDraw

    tiles, labels, heights = [], [], []
    for prompt, clips in groups:
        for j, (name, clip) in enumerate(clips):
            picked = [_scaled(clip[i], tile_height) for i in pick_frames(len(clip), frames or len(clip))]
            tiles.append(
                np.concatenate([np.pad(f, ((0, 0), (0, GAP), (0, 0)), constant_values=255) for f in picked], 1)
            )
            labels.append((name, prompt if j == 0 else None))  # the prompt labels the group's first row
            heights.append(tiles[-1].shape[0] + GAP + (GAP * 2 if j == len(clips) - 1 else 0))  # groups apart
    width = LABEL_WIDTH + max(t.shape[1] for t in tiles)
    canvas = Image.new("RGB", (width, sum(heights)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for tile, (name, prompt), height in zip(tiles, labels, heights, strict=True):
        canvas.paste(Image.fromarray(tile), (LABEL_WIDTH, y))
        if prompt is not None:  # the prompt, wrapped; its background (" on a ... background") in gray
            subject, _, rest = prompt.partition(" on ")
            lines = [(t, "black") for t in textwrap.wrap(subject, LABEL_CHARS)]
            lines += [(t, "gray") for t in textwrap.wrap("on " + rest, LABEL_CHARS)] if rest else []
            for j, (text, colour) in enumerate(lines[: max(1, (tile.shape[0] - 16) // 12)]):
                draw.text((2, y + 2 + 12 * j), text, fill=colour)
        draw.text((2, y + tile.shape[0] - 12), name[:24], fill="navy")
        y += height
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(out)
    return out
