"""Feature-consistency rewards (``subject`` on DINO, ``vjepa`` on V-JEPA 2 / VideoMAE) with tiny random models.

Tiny configs are built in code and saved with ``save_pretrained``, then loaded back through the loaders. Values are
checked against VBench's subject-consistency loop (``vbench/subject_consistency.py``: per frame, the mean of the
cosine similarity to the first and to the previous frame, each clamped at 0) run on features taken from the model
directly.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from vpotool.errors import VpoError
from vpotool.rewards import Reward
from vpotool.rewards.features import load_subject, load_vjepa
from vpotool.rewards.pretrained import IMAGENET_MEAN, IMAGENET_STD, normalize

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random checkpoints: DINOv2 and DINO ViT (32 px, patch 8), V-JEPA 2 and VideoMAE (4 frames, tubelet 2)."""
    from transformers import (
        Dinov2Config,
        Dinov2Model,
        VideoMAEConfig,
        VideoMAEModel,
        ViTConfig,
        ViTModel,
        VJEPA2Config,
        VJEPA2Model,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("features")
    vjepa = VJEPA2Config(
        crop_size=32,
        patch_size=8,
        frames_per_clip=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_ratio=2.0,
        pred_hidden_size=16,
        pred_num_hidden_layers=1,
        pred_num_attention_heads=2,
    )
    models = {
        "dinov2": Dinov2Model(Dinov2Config(image_size=32, patch_size=8, **TINY)),
        "vit": ViTModel(ViTConfig(image_size=32, patch_size=8, **TINY), add_pooling_layer=False),
        "vjepa2": VJEPA2Model(vjepa),
        "videomae": VideoMAEModel(VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, **TINY)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


def vbench_consistency(features: torch.Tensor) -> float:
    """VBench's loop over one video's per-frame features ``[T, D]``."""
    total, first, prev = 0.0, None, None
    for i, f in enumerate(F.normalize(features, dim=-1)):
        if i == 0:
            first = f
        else:
            total += (max(0.0, (prev @ f).item()) + max(0.0, (first @ f).item())) / 2
        prev = f
    return total / (len(features) - 1)


def videos(size=32, frames=4):
    """Two videos of random frames and one static video: ([2, T, 3, s, s], [1, T, 3, s, s])."""
    g = torch.Generator().manual_seed(1)
    random = torch.rand(2, frames, 3, size, size, generator=g)
    static = torch.rand(1, 1, 3, size, size, generator=g).expand(1, frames, 3, size, size).contiguous()
    return random, static


@pytest.mark.parametrize("kind", ["dinov2", "vit"])
def test_subject_matches_vbench_on_model_features(folders, kind):
    reward = load_subject(folders[kind], size=32)
    assert isinstance(reward, Reward) and reward.dimensions == ("subject_consistency", "overall")
    random, static = videos()
    out = reward(random, ["a", "b"])
    assert set(out) == set(reward.dimensions) and out["overall"].shape == (2,)
    assert torch.isfinite(out["overall"]).all()
    # by hand: 32 px frames need no resize, so the model sees ImageNet-normalised pixels; CLS after the final norm
    with torch.no_grad():
        for b in range(2):
            cls = reward.model(pixel_values=normalize(random[b], IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
            assert out["subject_consistency"][b].item() == pytest.approx(vbench_consistency(cls), abs=1e-5)
    assert reward(static, ["s"])["overall"].item() == pytest.approx(1.0, abs=1e-5)
    assert (out["overall"] < 0.999).all()


def test_subject_resizes_as_vbench_dino_transform(folders):
    """VBench's ``dino_transform(n)`` is torchvision's ``Resize(n, antialias=False)``: the short side to ``n``, the
    long side to ``int(n * long / short)`` (truncated: 40 x 61 frames at 32 give 32 x 48, where rounding gives 49),
    bilinear without antialiasing; ``resize=bicubic`` keeps the antialiased bicubic resize, long side rounded."""
    frames = torch.rand(1, 3, 3, 40, 61, generator=torch.Generator().manual_seed(2))
    by_hand = {
        "vbench": F.interpolate(frames[0], size=(32, 48), mode="bilinear", align_corners=False, antialias=False),
        "bicubic": F.interpolate(frames[0], size=(32, 49), mode="bicubic", align_corners=False, antialias=True),
    }
    for resize, pixels in by_hand.items():
        reward = load_subject(folders["dinov2"], size=32, **({} if resize == "vbench" else {"resize": resize}))
        with torch.no_grad():
            cls = reward.model(pixel_values=normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
            torch.testing.assert_close(reward.features(frames)[0], cls, atol=1e-5, rtol=1e-4)


def test_subject_keeps_aspect_and_picks_frames(folders):
    reward = load_subject(folders["dinov2"], size=32, num_frames=3)
    feats = reward.features(torch.rand(1, 5, 3, 32, 48))
    assert feats.shape == (1, 3, 32)


@pytest.mark.parametrize("kind", ["dinov2", "vjepa2"])
def test_gradients_reach_the_pixels(folders, kind):
    reward = load_subject(folders[kind], size=32) if kind == "dinov2" else load_vjepa(folders[kind])
    frames = videos()[0].requires_grad_(True)
    reward(frames, ["a", "b"])["overall"].sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())


def test_vjepa_matches_pooled_tubelets(folders):
    reward = load_vjepa(folders["vjepa2"])
    assert isinstance(reward, Reward) and reward.dimensions == ("temporal_consistency", "overall")
    assert (reward.num_frames, reward.resize, reward.crop) == (4, 36, 32)  # resize 32 * 256 / 224, crop 32
    random, static = videos(size=36)
    out = reward(random, ["a", "b"])
    assert out["overall"].shape == (2,) and torch.isfinite(out["overall"]).all()
    # by hand: 36 px frames need no resize; centre crop 32; mean over the 4x4 patch tokens of each of 2 tubelets
    with torch.no_grad():
        x = normalize(random[..., 2:34, 2:34], IMAGENET_MEAN, IMAGENET_STD)
        tokens = reward.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
        pooled = tokens.view(2, 2, 16, 32).mean(2)
    for b in range(2):
        assert out["temporal_consistency"][b].item() == pytest.approx(vbench_consistency(pooled[b]), abs=1e-5)
    assert reward(static, ["s"])["overall"].item() == pytest.approx(1.0, abs=1e-4)
    assert (out["overall"] < 0.99).all()


def test_vjepa_clip_lengths(folders):
    reward = load_vjepa(folders["vjepa2"])
    assert reward.features(torch.rand(1, 9, 3, 36, 36)).shape == (1, 2, 32)  # 4 of 9 frames: 2 tubelets
    assert reward.features(torch.rand(1, 3, 3, 36, 36)).shape == (1, 1, 32)  # trimmed to a tubelet multiple
    assert reward.features(torch.rand(1, 1, 3, 36, 36)).shape == (1, 1, 32)  # one frame repeated
    assert load_vjepa(folders["vjepa2"], num_frames=2).num_frames == 2
    with pytest.raises(VpoError, match="multiple of the tubelet"):
        load_vjepa(folders["vjepa2"], num_frames=3)


def test_videomae(folders):
    reward = load_vjepa(folders["videomae"])
    assert (reward.kind, reward.num_frames, reward.crop) == ("videomae", 4, 32)
    random, static = videos()
    out = reward(random, ["a", "b"])
    with torch.no_grad():
        tokens = reward.model(pixel_values=normalize(random, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
        pooled = tokens.view(2, 2, 16, 32).mean(2)
    for b in range(2):
        assert out["overall"][b].item() == pytest.approx(vbench_consistency(pooled[b]), abs=1e-5)
    # fixed temporal position embeddings keep a static clip below 1 (see the docstring); random frames score lower
    assert (out["overall"] < reward(static, ["s"])["overall"]).all()
    assert reward.features(torch.rand(1, 2, 3, 32, 32)).shape == (1, 2, 32)  # 2 frames repeated to the 4 it needs
    with pytest.raises(VpoError, match="exactly 4 frames"):
        load_vjepa(folders["videomae"], num_frames=2)


def test_processor_stats_come_from_the_checkpoint(folders, tmp_path):
    import shutil

    folder = tmp_path / "videomae"
    shutil.copytree(folders["videomae"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    assert load_vjepa(folder).mean == (0.5, 0.5, 0.5)
    assert load_vjepa(folders["videomae"]).mean == IMAGENET_MEAN


def test_errors(folders, tmp_path):
    with pytest.raises(VpoError, match="no weights at"):
        load_subject(tmp_path / "missing")
    with pytest.raises(VpoError, match="no weights at"):
        load_vjepa(tmp_path / "missing")
    with pytest.raises(VpoError, match="'vjepa2' model"):
        load_subject(folders["vjepa2"])
    with pytest.raises(VpoError, match="'vit' model"):
        load_vjepa(folders["vit"])
    with pytest.raises(VpoError, match="could not read a config"):
        load_vjepa(tmp_path)
    with pytest.raises(VpoError, match="known options: size, num_frames"):
        load_subject(folders["dinov2"], crop=True)
    with pytest.raises(ValueError, match="prompts"):
        load_subject(folders["dinov2"], size=32)(videos()[0], ["only one"])
