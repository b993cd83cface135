"""The ``reference`` reward and ``eval --fvd-reference``: videos compared with a folder of clips unpaired to the
prompts, in the tiny world's features or cd-FVD's VideoMAE features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from vpotool.errors import VpoError
from vpotool.rewards import load_reward
from vpotool.rewards.reference import ReferenceReward, VideoMAEEmbedder, load_embedder, windows
from vpotool.video import to_uint8, write_video
from vpotool.world.features import frechet_distance


class MeanEmbedder:
    """One feature per clip: its mean pixel value."""

    name, clip_frames = "mean", None

    def __call__(self, frames):
        return frames.float().mean((1, 2, 3, 4))[:, None]


def flat(value: float, frames: int = 4) -> torch.Tensor:
    return torch.full((frames, 3, 8, 8), value)


def test_reference_score_is_the_nearest_distance_in_units_of_the_references_own():
    refs = [flat(v) for v in (0.0, 0.2, 0.4, 0.6)]
    reward = ReferenceReward(MeanEmbedder(), refs, k=1)
    # standardised by the references' spread sqrt(0.05); each reference's nearest other is 0.2 away, so the scale
    # is 0.2 / sqrt(0.05); a clip at 0.3 is 0.1 from its nearest, at 1.0 it is 0.4 from 0.6
    got = reward(torch.stack([flat(0.3), flat(1.0)]), ["", ""])["overall"]
    assert torch.allclose(got, torch.tensor([-0.5, -2.0]), atol=1e-5)


def test_windows_cover_a_long_video_overlapping_by_one_frame():
    x = torch.arange(40.0).view(1, 40, 1, 1, 1)
    w, n = windows(x, 17)
    assert n == 3 and w[:, 0, 0, 0, 0].tolist() == [0, 16, 23] and w.shape[1] == 17
    assert windows(x[:, :33], 17)[1] == 2 and windows(x[:, :10], 17)[1] == 1


@pytest.fixture
def world_refs(tmp_path):
    from vpotool.world.grammar import world_prompts
    from vpotool.world.long import render_long_clip

    folder = tmp_path / "refs"
    folder.mkdir()
    for i, p in enumerate(world_prompts("train")[:60]):
        write_video(folder / f"{i}.mp4", to_uint8(render_long_clip(p, 17, 32, 32, i)), 8)
    return folder


def test_world_features_prefer_rendered_clips_to_noise(world_refs):
    from vpotool.world.grammar import world_prompts
    from vpotool.world.long import render_long_clip

    reward = load_reward("reference", options=f"reference.videos={world_refs}")
    clips = torch.stack([render_long_clip(p, 33, 32, 32, 9) for p in world_prompts("val")[:4]])
    good, noise = reward(clips, [""] * 4)["overall"], reward(torch.rand_like(clips), [""] * 4)["overall"]
    assert (good > noise + 10).all() and (good > -5).all()


def test_bad_reference_folders_are_one_line(tmp_path):
    with pytest.raises(VpoError, match="needs its reference clips"):
        load_reward("reference")
    with pytest.raises(VpoError, match="is not a folder"):
        load_reward("reference", options=f"reference.videos={tmp_path / 'none'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VpoError, match="holds no videos"):
        load_reward("reference", options=f"reference.videos={tmp_path / 'empty'}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.mp4").write_bytes(b"not a video")
    with pytest.raises(VpoError, match="corrupt or unreadable video"):
        load_reward("reference", options=f"reference.videos={tmp_path / 'bad'}")


def tiny_videomae(folder):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    config = VideoMAEConfig(image_size=32, patch_size=16, num_frames=4, tubelet_size=2, hidden_size=32,
                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3,
                            use_mean_pooling=True)  # fmt: skip
    model = VideoMAEForVideoClassification(config)
    with torch.no_grad():  # a random, not a zero-initialised, norm
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    return folder


def cd_fvd_features(model, videos_uint8: np.ndarray, size: int) -> torch.Tensor:
    """cd-fvd's VideoMAE path on uint8 ``[B, T, H, W, 3]``: each video as ``[C, T, H, W]`` in [0, 1], resized
    with ``interpolate(size, bilinear, align_corners=False)``, no normalisation, then the classifier's pooled
    feature (its head sees exactly this: logits = classifier(feature))."""
    vids = [torch.from_numpy(v).permute(3, 0, 1, 2).float() / 255 for v in videos_uint8]
    x = torch.stack([F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False) for v in vids])
    with torch.no_grad():
        out = model(pixel_values=x.permute(0, 2, 1, 3, 4), output_hidden_states=True)
    tokens = out.hidden_states[-1]
    if model.videomae.layernorm is not None:
        tokens = model.videomae.layernorm(tokens)
    feats = model.fc_norm(tokens.mean(1))
    assert torch.allclose(model.classifier(feats), out.logits, atol=1e-5)  # the feature the head classifies
    return feats


def test_videomae_features_and_fvd_match_cd_fvd(tmp_path):
    from scipy import linalg

    path = tiny_videomae(tmp_path / "videomae")
    embed = load_embedder(str(path))
    assert isinstance(embed, VideoMAEEmbedder)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 5, 40, 48, 3), dtype=np.uint8)  # 5 frames: the first 4 are the clip
    b = rng.integers(0, 128, (6, 4, 40, 48, 3), dtype=np.uint8)
    to_float = lambda v: torch.from_numpy(v).permute(0, 1, 4, 2, 3).float() / 255  # noqa: E731
    mine_a, mine_b = embed(to_float(a)), embed(to_float(b))
    ref_a, ref_b = cd_fvd_features(embed.model, a[:, :4], 32), cd_fvd_features(embed.model, b, 32)
    assert torch.allclose(mine_a, ref_a, atol=1e-5) and torch.allclose(mine_b, ref_b, atol=1e-5)
    # cd-fvd's distance: |mu_r - mu_f|^2 + tr(S_f + S_r - 2 sqrtm(S_r S_f)) (numpy covariances, divisor n - 1)
    fa, fb = ref_a.double().numpy(), ref_b.double().numpy()
    mu_a, mu_b, s_a, s_b = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    root, _ = linalg.sqrtm(s_b @ s_a, disp=False)
    want = np.real(((mu_b - mu_a) ** 2).sum() + np.trace(s_a + s_b - 2 * root))
    assert frechet_distance(mine_a, mine_b) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_a_folder_that_is_no_videomae_is_refused(tmp_path):
    with pytest.raises(VpoError, match="VideoMAE"):
        load_embedder(str(tmp_path))


def test_eval_reports_fvd_against_a_reference_folder(cli, world_refs, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a red circle moving left slowly on a black background\n")
    out = tmp_path / "ev"
    args = ["eval", "--prompts", p, "--seeds", 2, "--steps", 2, "--reward", "world", "--out", out, "--device", "cpu"]
    code, _, err = cli(*args, "--fvd-reference", world_refs)
    assert code == 0, err
    rows = pd.read_parquet(out / "eval.parquet")
    fvd = rows[rows.metric == "fvd"]
    assert len(fvd) == 1 and fvd["mean"].iloc[0] > 0
    code, _, err = cli(*args[:-4], "--out", tmp_path / "ev2", "--fvd-reference", tmp_path / "nothing")
    assert code == 2 and "is not a folder" in err and not (tmp_path / "ev2").exists()
    code, _, err = cli(*args[:-4], "--out", tmp_path / "ev3", "--fvd-model", tmp_path)
    assert code == 2 and "needs --fvd-reference" in err


def test_scst_optimises_the_reference_reward(tmp_path, world_refs):
    from vpotool.models import load_backend
    from vpotool.training.config import ScstConfig
    from vpotool.training.scst import train_scst

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left slowly on a black background\n")
    cfg = ScstConfig(prompts=str(prompts), out=str(tmp_path / "o"), reward="reference", max_steps=1, batch_size=1,
                     reward_options=f"reference.videos={world_refs}", frames=33, height=32, width=32, steps=2,
                     lora_rank=4, device="cpu")  # fmt: skip
    out = train_scst(cfg, backend=load_backend("tiny-ar"))
    metrics = pd.read_parquet(out / "metrics.parquet")
    assert len(metrics) == 1 and metrics["reward"].iloc[0] < 0  # minus a distance
