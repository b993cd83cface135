"""mp4 encode/decode with PyAV: uint8 frames ``[T, H, W, C]`` <-> H.264 files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vpotool.errors import VpoError, disk_space


def to_uint8(frames) -> np.ndarray:
    """Float frames in [0, 1] ``[T, C, H, W]`` (a torch tensor or array) -> uint8 ``[T, H, W, C]``."""
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)


def write_video(path: str | Path, frames: np.ndarray, fps: int, crf: int = 12) -> None:
    """Encode uint8 ``frames [T, H, W, 3]`` as H.264 (yuv420p, so browsers play it) at ``fps``; atomic.

    Odd sizes are padded to even ones by repeating the last row/column (yuv420p needs even sizes); a low
    ``crf`` keeps small synthetic videos close to their pixels.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video takes uint8 frames [T, H, W, 3]; got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.mp4")
    try:
        with disk_space(path):
            _encode(tmp, frames, fps, crf)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _encode(tmp: Path, frames: np.ndarray, fps: int, crf: int) -> None:
    import av

    with av.open(str(tmp), mode="w") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # asm=0: libx264's SIMD made the same small frames encode differently from one call to the next (a 32x32
        # world clip: 8 different decodings in 25 encodes), so eval's reference clips and a rerun's videos differed;
        # its C code encodes them identically every time, at about 1.7x the encoding time (480p)
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "asm=0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file -> uint8 ``[T, H, W, 3]``. Missing or corrupt files raise ``VpoError``."""
    import av

    path = Path(path)
    if not path.is_file():
        raise VpoError(f"video not found: {path} (manifests keep paths relative to their folder; move them together)")
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise VpoError(f"corrupt or unreadable video: {path} ({e}); regenerate it with `vpotool sample`") from e
    if not frames:
        raise VpoError(f"corrupt or unreadable video: {path} (no frames); regenerate it with `vpotool sample`")
    return np.stack(frames)


def frames_to_tensor(frames: np.ndarray, height: int | None = None, width: int | None = None):
    """uint8 ``[T, H, W, 3]`` -> float32 torch ``[T, 3, H, W]`` in [0, 1], cropped to ``height x width`` if given
    (undoes write_video's even-size padding)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    return x[:, :, : height or x.shape[2], : width or x.shape[3]]
