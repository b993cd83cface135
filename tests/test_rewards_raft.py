"""RAFT and the ``raft`` dynamic-degree reward: checkpoint key names, structure, gradients and VBench's arithmetic.

Key names and shapes below are read off princeton-vl/RAFT (commit 2888e15): ``core/raft.py`` (``fnet``, ``cnet``,
``update_block``), ``core/extractor.py`` (``BasicEncoder``/``SmallEncoder``: ``conv1``, ``norm1``, ``layer1-3`` of
two ``ResidualBlock``/``BottleneckBlock`` each with ``normN`` also held as ``downsample.1``, ``conv2``),
``core/update.py`` (``BasicMotionEncoder`` ``convc1/convc2/convf1/convf2/conv``, ``SepConvGRU`` ``convz1..convq2``,
``FlowHead`` ``conv1/conv2``, ``mask`` Sequential 0 and 2; RAFT-S: ``ConvGRU`` ``convz/convr/convq``);
``raft-things.pth`` stores them under DataParallel's ``module.`` prefix. The key counts (179 and 106, BatchNorm buffers
included) equal those of upstream's own ``RAFT(args).state_dict()``, and upstream's flow matched this module's to
1e-5 on random weights when checked during development (upstream is not vendored, so that check is not repeated here).
Parameter counts: torchvision's ``Raft_Large_Weights.C_T_V1`` / ``Raft_Small_Weights.C_T_V1`` (weights ported from
princeton-vl/RAFT) list ``num_params`` 5,257,536 and 990,162. VBench's rule: ``vbench/dynamic_degree.py``.
"""

import pytest
import torch

from vpotool.errors import VpoError
from vpotool.rewards import Reward
from vpotool.rewards.raft import (
    RAFT,
    RaftDynamicReward,
    convex_upsample,
    dynamic_scores,
    load_raft,
    lookup,
    top_magnitude,
    vbench_count,
    vbench_threshold,
)

PUBLISHED = {  # raft-things.pth key -> shape
    "module.fnet.conv1.weight": (64, 3, 7, 7),
    "module.fnet.layer1.0.conv1.weight": (64, 64, 3, 3),
    "module.fnet.layer2.0.downsample.0.weight": (96, 64, 1, 1),
    "module.fnet.layer3.1.conv2.bias": (128,),
    "module.fnet.conv2.weight": (256, 128, 1, 1),
    "module.cnet.norm1.running_mean": (64,),
    "module.cnet.layer2.0.norm3.weight": (96,),
    "module.cnet.layer2.0.downsample.1.running_var": (96,),
    "module.cnet.conv2.weight": (256, 128, 1, 1),
    "module.update_block.encoder.convc1.weight": (256, 324, 1, 1),
    "module.update_block.encoder.convc2.weight": (192, 256, 3, 3),
    "module.update_block.encoder.convf1.weight": (128, 2, 7, 7),
    "module.update_block.encoder.convf2.weight": (64, 128, 3, 3),
    "module.update_block.encoder.conv.weight": (126, 256, 3, 3),
    "module.update_block.gru.convz1.weight": (128, 384, 1, 5),
    "module.update_block.gru.convr1.weight": (128, 384, 1, 5),
    "module.update_block.gru.convq2.weight": (128, 384, 5, 1),
    "module.update_block.flow_head.conv1.weight": (256, 128, 3, 3),
    "module.update_block.flow_head.conv2.weight": (2, 256, 3, 3),
    "module.update_block.mask.0.weight": (256, 128, 3, 3),
    "module.update_block.mask.2.weight": (576, 256, 1, 1),
}
PUBLISHED_SMALL = {  # raft-small.pth
    "module.fnet.layer1.0.conv3.weight": (32, 8, 1, 1),
    "module.fnet.layer2.0.downsample.0.weight": (64, 32, 1, 1),
    "module.cnet.conv2.weight": (160, 96, 1, 1),
    "module.update_block.encoder.convc1.weight": (96, 196, 1, 1),
    "module.update_block.encoder.conv.weight": (80, 128, 3, 3),
    "module.update_block.gru.convz.weight": (96, 242, 3, 3),
    "module.update_block.flow_head.conv1.weight": (128, 96, 3, 3),
}


def published_state(model: RAFT) -> dict[str, torch.Tensor]:
    """The model's weights under raft-things.pth's names (DataParallel prefix)."""
    return {f"module.{k}": v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def things(tmp_path_factory):
    """A random RAFT saved as a .pth under the published key names: (path, model)."""
    torch.manual_seed(0)
    model = RAFT().eval()
    path = tmp_path_factory.mktemp("raft") / "raft-things.pth"
    torch.save(published_state(model), path)
    return path, model


@pytest.mark.parametrize(("small", "published", "count"), [(False, PUBLISHED, 179), (True, PUBLISHED_SMALL, 106)])
def test_key_names_match_the_published_checkpoints(small, published, count):
    with torch.device("meta"):
        state = published_state(RAFT(small=small))
    assert len(state) == count
    assert {k: tuple(state[k].shape) for k in published if k in state} == published


def test_parameter_counts_match_published_raft():
    with torch.device("meta"):
        large, small = RAFT(), RAFT(small=True)
    assert sum(p.numel() for p in large.parameters()) == 5_257_536  # "5.3M" in the RAFT paper
    assert sum(p.numel() for p in small.parameters()) == 990_162


def test_lookup_by_hand():
    # one level, one query point at (x=3, y=2), radius 1, correlation "image" 100 * y + x on a 5x6 grid
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(6.0), indexing="ij")
    corr = (100 * ys + xs).view(1, 1, 5, 6)
    out = lookup([corr], torch.tensor([3.0, 2.0]).view(1, 2, 1, 1), radius=1).flatten()
    # channel i * 3 + j holds offset x = i - 1, y = j - 1 (RAFT's window order: x outer)
    expected = [100 * (2 + j - 1) + (3 + i - 1) for i in range(3) for j in range(3)]
    assert out.tolist() == pytest.approx(expected)
    # half-pixel positions interpolate bilinearly; outside the grid reads zero
    out = lookup([corr], torch.tensor([5.5, 0.0]).view(1, 2, 1, 1), radius=1).flatten()
    assert out[3 * 1 + 1].item() == pytest.approx(0.5 * 5)  # (5.5, 0): half of pixel (5, 0), half zero padding
    assert out[3 * 0 + 0].item() == pytest.approx(0.0)  # (4.5, -1): outside


def test_convex_upsample_of_constant_flow():
    flow = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1).expand(1, 2, 3, 4)
    up = convex_upsample(flow, torch.zeros(1, 576, 3, 4))
    assert up.shape == (1, 2, 24, 32)
    # uniform weights over the 3x3 neighbours: inside, 8x the flow (fine pixels); borders also mix in zero padding
    assert up[0, :, 8:16, 8:24].flatten(1).tolist() == [[8.0] * 128, [-16.0] * 128]


def test_flow_shape_and_gradients_through_raft():
    torch.manual_seed(0)
    model = RAFT().eval().requires_grad_(False)
    a, b = torch.rand(1, 3, 64, 72, requires_grad=True), torch.rand(1, 3, 64, 72, requires_grad=True)
    flow = model(a, b, iters=2)
    assert flow.shape == (1, 2, 64, 72) and flow.dtype == torch.float32 and torch.isfinite(flow).all()
    top_magnitude(flow).sum().backward()
    for image in (a, b):  # b only through the correlation volume, i.e. the grid_sample lookup
        assert torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0


def test_load_roundtrip(things):
    path, model = things
    reward = load_raft(path, iters=2)
    assert isinstance(reward, Reward) and reward.dimensions == ("flow_magnitude", "dynamic_degree", "overall")
    assert not reward.model.small and reward.iters == 2
    loaded = reward.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_load_small_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    model = RAFT(small=True)
    path = tmp_path / "raft-small.safetensors"
    save_file({k: v.clone().contiguous() for k, v in published_state(model).items()}, path)  # no shared storage
    assert load_raft(path).model.small


def test_load_errors(things, tmp_path):
    with pytest.raises(VpoError, match="needs weights"):
        load_raft(None)
    with pytest.raises(VpoError, match="no file at"):
        load_raft(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(VpoError, match="could not read"):
        load_raft(tmp_path / "junk.pth")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(VpoError, match="does not fit RAFT .*missing"):
        load_raft(tmp_path / "linear.pth")
    state = torch.load(things[0], weights_only=True)
    state["module.fnet.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    torch.save(state, tmp_path / "mismatched.pth")
    with pytest.raises(VpoError, match="1 mismatched weights, e.g. fnet.conv2.weight"):
        load_raft(tmp_path / "mismatched.pth")
    with pytest.raises(VpoError, match="known options: iters, pairs_per_batch"):
        load_raft(things[0], small=True)
    with pytest.raises(VpoError, match="iters"):
        load_raft(things[0], iters=0)


def test_top_magnitude_by_hand():
    flow = torch.zeros(1, 2, 10, 10)
    flow[0, 0] = 1.0  # magnitude 1 everywhere
    flow[0, :, 0, :3] = torch.tensor([3.0, 4.0]).view(2, 1)  # three pixels of magnitude 5
    # 100 pixels * 5% = 5 values: 5, 5, 5, 1, 1
    assert top_magnitude(flow).item() == pytest.approx(17 / 5)
    assert top_magnitude(flow, fraction=0.03).item() == pytest.approx(5.0)
    assert top_magnitude(torch.zeros(1, 2, 4, 4)).item() == 0.0  # fewer than 20 pixels: the largest one


def test_vbench_constants():
    assert vbench_threshold(256, 512) == 6.0
    assert vbench_threshold(480, 320) == pytest.approx(7.5)
    # round(4 * T / 16), Python's half-to-even rounding
    assert [vbench_count(t) for t in (1, 2, 6, 8, 10, 14, 16)] == [0, 0, 2, 2, 2, 4, 4]


def test_dynamic_scores_by_hand():
    # 8 frames (7 pairs) of 256 x 256: threshold 6, two pairs must exceed it
    m = torch.tensor([[7.0, 0, 0, 6.5, 0, 0, 0], [7.0, 3.0, 0, 6.0, 0, 0, 0], [0.0] * 7])
    out = dynamic_scores(m, 256, 256)
    assert out["flow_magnitude"].tolist() == pytest.approx([13.5 / 7, 16 / 7, 0.0])
    assert out["dynamic_degree"].tolist() == [1.0, 0.0, 0.0]  # 6.0 is not above the threshold
    # soft progress of the 2 pairs asked for: min(1, m / 6) over the two largest, averaged
    assert out["overall"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    slow = dynamic_scores(torch.full((1, 7), 5.0), 256, 256)  # every pair just under the threshold
    assert slow["dynamic_degree"].item() == 0.0 and slow["overall"].item() == pytest.approx(5 / 6)
    out = dynamic_scores(torch.tensor([[7.0, 3.0, 0, 0, 0, 0, 0]]), 256, 256)
    assert (out["dynamic_degree"].item(), out["overall"].item()) == (0.0, pytest.approx(0.75))
    # VBench's quirk: two frames ask for round(0.5) = 0 pairs, so any pair is dynamic
    out = dynamic_scores(torch.tensor([[0.0]]), 256, 256)
    assert out["dynamic_degree"].item() == 1.0 and out["overall"].item() == 0.0
    out = dynamic_scores(torch.zeros(2, 0), 64, 64)  # one frame: no pairs
    assert all(v.tolist() == [0.0, 0.0] for v in out.values())


def test_overall_gradient_only_below_the_threshold():
    m = torch.tensor([[3.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    dynamic_scores(m, 256, 256)["overall"].sum().backward()
    assert m.grad[0].tolist() == pytest.approx([1 / 12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # only 3.0 is short of it


class ShiftByChange(torch.nn.Module):
    """A stand-in flow network: horizontal flow of 10x the mean intensity change, at the input's resolution."""

    def forward(self, a, b, iters):
        assert a.shape[-2] % 8 == 0 and a.shape[-1] % 8 == 0 and min(a.shape[-2:]) >= 64
        u = 10 * (b - a).mean(1, keepdim=True)
        return torch.cat([u, torch.zeros_like(u)], 1)


def constant_video(levels, h, w):
    """[B, T, 3, h, w] with frame t of video b filled with levels[b][t]."""
    return torch.tensor(levels).view(len(levels), -1, 1, 1, 1).expand(-1, -1, 3, h, w).contiguous()


@pytest.mark.parametrize(("h", "w", "scale"), [(64, 64, 1), (64, 70, 1), (16, 24, 4)])
def test_reward_pairs_padding_and_scale(h, w, scale):
    reward = RaftDynamicReward(ShiftByChange(), pairs_per_batch=3)
    video = constant_video([[0.0, 0.1, 0.3], [0.5, 0.5, 0.9]], h, w)
    pairs = reward.pair_magnitudes(video)
    # pairs in order per video; frames under 64 px are upsampled 4x and the magnitude scaled back to their pixels
    torch.testing.assert_close(pairs, torch.tensor([[1.0, 2.0], [0.0, 4.0]]) / scale)
    out = reward(video, ["a", "b"])
    assert {k: v.tolist() for k, v in out.items()} == {k: v.tolist() for k, v in dynamic_scores(pairs, h, w).items()}
    still = reward(constant_video([[0.2]], h, w), ["one frame"])  # no pairs: no motion
    assert all(v.tolist() == [0.0] for v in still.values())


def test_reward_end_to_end(things):
    reward = load_raft(things[0], iters=2)
    frames = torch.rand(2, 3, 3, 16, 16, requires_grad=True)
    out = reward(frames, ["a", "b"])
    assert all(v.shape == (2,) and torch.isfinite(v).all() for v in out.values())
    assert set(out["dynamic_degree"].tolist()) <= {0.0, 1.0}
    out["flow_magnitude"].sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0


class TrackBrightColumn(torch.nn.Module):
    """An exact flow oracle for clips whose brightest column is the moving object: horizontal flow of the column's
    displacement, read back from the (upsampled, padded) frames."""

    def forward(self, a, b, iters):
        col = lambda x: x.mean((1, 2)).argmax(-1).float()  # noqa: E731
        u = (col(b) - col(a)).view(-1, 1, 1, 1).expand(-1, 1, *a.shape[-2:])
        return torch.cat([u, torch.zeros_like(u)], 1)


@pytest.mark.parametrize("fps", [8, 16, 24])
def test_frame_stride_gives_vbench_decision_at_each_fps(fps):
    """A 64 x 64 clip of 24 frames whose bright column moves 1 px a frame: VBench keeps every round(fps / 8)-th
    frame, so the motion per compared pair is 1, 2 or 3 px against a threshold of 6 * 64 / 256 = 1.5 px, and
    round(4 * kept / 16) pairs must pass. Computed here from that rule: static at 8 fps, dynamic at 16 and 24."""
    t, size = 24, 64
    clip = torch.zeros(1, t, 3, size, size)
    for i in range(t):
        clip[0, i, :, :, 10 + i] = 1.0
    stride = max(1, round(fps / 8))
    kept = len(range(0, t, stride))
    pairs_over = (kept - 1) if stride * 1.0 > 6 * size / 256 else 0
    expected = float(pairs_over >= round(4 * kept / 16))
    reward = RaftDynamicReward(TrackBrightColumn())
    out = reward(clip, ["a bar"], fps=fps)
    assert out["dynamic_degree"].item() == expected == (0.0 if fps == 8 else 1.0)
    assert out["flow_magnitude"].item() == pytest.approx(stride, abs=1e-4)
