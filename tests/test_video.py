"""vpotool.video: mp4 round trips of tiny synthetic clips, odd-size padding, uint8 conversion and the errors that
missing, corrupt or truncated files raise."""

import os

import numpy as np
import pytest
import torch

from vpotool.errors import VpoError
from vpotool.video import frames_to_tensor, read_video, to_uint8, write_video

# Mean absolute error in uint8 levels after an H.264 (crf 12, yuv420p) round trip of ``ramps``. Measured: 1.62 at
# 32x48, 2.37 at 17x23 (chroma subsampling and limited-range YUV account for it); the bounds leave about 2x margin.
MAE_EVEN, MAE_ODD = 4.0, 5.0


def ramps(frames=6, height=32, width=48) -> np.ndarray:
    """A smooth synthetic clip, uint8 ``[T, H, W, 3]``: red ramps along x, green along y, blue drifts over time."""
    t = np.arange(frames)[:, None, None] / frames
    y = np.arange(height)[None, :, None] / height
    x = np.arange(width)[None, None, :] / width
    rgb = np.broadcast_arrays(0.2 + 0.6 * x, 0.2 + 0.6 * y, 0.3 + 0.2 * (x + y) + 0.1 * t)
    return (np.stack(rgb, -1) * 255).round().astype(np.uint8)


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_round_trip(tmp_path):
    clip = ramps()
    path = tmp_path / "a.mp4"
    write_video(path, clip, fps=8)
    back = read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    assert mae(back, clip) < MAE_EVEN
    assert os.listdir(tmp_path) == ["a.mp4"]  # atomic: no temporary file left behind


def test_round_trip_tells_frames_apart(tmp_path):
    # A clip whose frames differ a lot must come back in order (catches dropped or duplicated frames).
    clip = np.zeros((5, 16, 16, 3), np.uint8) + (np.arange(5) * 50).astype(np.uint8)[:, None, None, None]
    write_video(tmp_path / "steps.mp4", clip, fps=4)
    back = read_video(tmp_path / "steps.mp4")
    np.testing.assert_allclose(back.reshape(5, -1).mean(1), np.arange(5) * 50, atol=3)


def test_odd_size_is_padded_and_cropped_back(tmp_path):
    clip = ramps(frames=4, height=17, width=23)
    write_video(tmp_path / "odd.mp4", clip, fps=8)
    back = read_video(tmp_path / "odd.mp4")
    assert back.shape == (4, 18, 24, 3)
    # The padding repeats the last row and column.
    assert mae(back[:, 17], back[:, 16]) < MAE_ODD and mae(back[:, :, 23], back[:, :, 22]) < MAE_ODD
    x = frames_to_tensor(back, 17, 23)
    assert x.shape == (4, 3, 17, 23) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    expected = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255
    assert float((x - expected).abs().mean()) < MAE_ODD / 255


def test_frames_to_tensor_by_hand():
    frames = np.zeros((1, 2, 3, 3), np.uint8)
    frames[0, 1, 2] = [255, 51, 0]
    x = frames_to_tensor(frames)
    assert x.shape == (1, 3, 2, 3)
    torch.testing.assert_close(x[0, :, 1, 2], torch.tensor([1.0, 0.2, 0.0]))
    assert float(x.sum()) == pytest.approx(1.2)
    assert frames_to_tensor(frames, height=1).shape == (1, 3, 1, 3)


def test_to_uint8_by_hand():
    levels = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5, 0.2])
    frames = levels.view(1, 1, 1, 6).expand(2, 3, 4, 6).clone().requires_grad_(True)
    out = to_uint8(frames)
    assert out.shape == (2, 4, 6, 3) and out.dtype == np.uint8
    # clipped to [0, 1], times 255, rounded: 0.5 -> 127.5 -> 128 (half to even), 0.2 -> 51
    assert out[1, 3, :, 2].tolist() == [0, 0, 128, 255, 255, 51]
    np.testing.assert_array_equal(to_uint8(frames.detach().numpy()), out)


def test_to_uint8_keeps_channel_order():
    frames = torch.zeros(1, 3, 2, 2)
    frames[:, 0], frames[:, 2] = 1.0, 0.2
    assert to_uint8(frames)[0, 1, 1].tolist() == [255, 0, 51]


def test_write_video_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", ramps().astype(np.float32) / 255, fps=8)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_video(tmp_path / "c.mp4", np.zeros((2, 3, 8, 8), np.uint8), fps=8)
    assert os.listdir(tmp_path) == []


def test_missing_video(tmp_path):
    with pytest.raises(VpoError, match="video not found") as e:
        read_video(tmp_path / "nope.mp4")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["random", "empty", "truncated"])
def test_corrupt_video(tmp_path, kind):
    path = tmp_path / "bad.mp4"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        write_video(path, ramps(), fps=8)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VpoError, match="corrupt or unreadable video") as e:
        read_video(path)
    assert "\n" not in str(e.value) and "bad.mp4" in str(e.value)


def test_the_same_frames_encode_to_the_same_video_every_time(tmp_path):
    """eval's reference clips go through the H.264 round trip on every run: the same frames must decode to the same
    pixels each time, or world.frechet changes between identical evals."""
    import hashlib

    from vpotool.video import read_video, to_uint8, write_video
    from vpotool.world import render_batch
    from vpotool.world.grammar import world_prompts

    clip = to_uint8(render_batch(world_prompts("val")[:1], [0], 17, 32, 32)[0])
    seen = set()
    for i in range(20):
        write_video(tmp_path / f"{i}.mp4", clip, 8)
        seen.add(hashlib.md5(read_video(tmp_path / f"{i}.mp4").tobytes()).hexdigest())
    assert len(seen) == 1
