"""RAFT optical flow (Teed & Deng, ECCV 2020) and VBench's dynamic degree on top of it (``raft`` reward).

vpotool's own implementation of the network. Module and parameter names follow the published checkpoints
(princeton-vl/RAFT ``raft-things.pth``, ``raft-small.pth``: ``fnet``, ``cnet``, ``update_block.{encoder,gru,flow_head,
mask}``), so those load directly once DataParallel's ``module.`` prefix is stripped. Everything is plain torch with a
``grid_sample`` correlation lookup, so flow, and the reward, pass gradients back to the pixels.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from vpotool.errors import VpoError
from vpotool.rewards.base import check_frames
from vpotool.rewards.pretrained import check_options, read_state_dict

RAFT_WHAT = "RAFT weights (raft-things.pth from princeton-vl/RAFT's download_models.sh, or a .safetensors of them)"
MIN_SIZE = 64  # RAFT's 4-level correlation pyramid at 1/8 resolution needs at least 8 cells per side


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # affine-free: no weights, as in RAFT
    return nn.Identity()


class ResidualBlock(nn.Module):
    """Two 3x3 convs with a skip; ``small`` uses the 1x1-3x3-1x1 bottleneck of RAFT-S."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int = 1, small: bool = False):
        super().__init__()
        mid = cout // 4 if small else cout
        self.relu = nn.ReLU()
        self.depth = 3 if small else 2
        if small:
            self.conv1 = nn.Conv2d(cin, mid, 1)
            self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, stride=stride)
            self.conv3 = nn.Conv2d(mid, cout, 1)
            self.norm1, self.norm2, self.norm3 = _norm(norm, mid), _norm(norm, mid), _norm(norm, cout)
        else:
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, stride=stride)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
            self.norm1, self.norm2 = _norm(norm, cout), _norm(norm, cout)
        self.downsample = None
        if stride != 1:
            # the checkpoints hold this norm twice, as normN and as downsample.1 (one module, two names)
            skip_norm = _norm(norm, cout)
            setattr(self, "norm4" if small else "norm3", skip_norm)
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), skip_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for i in range(1, self.depth + 1):
            y = self.relu(getattr(self, f"norm{i}")(getattr(self, f"conv{i}")(y)))
        return self.relu((x if self.downsample is None else self.downsample(x)) + y)


class Encoder(nn.Module):
    """Feature or context encoder: ``[N, 3, H, W]`` in [-1, 1] -> ``[N, out, H/8, W/8]``."""

    def __init__(self, out: int, norm: str, small: bool = False):
        super().__init__()
        widths = (32, 64, 96) if small else (64, 96, 128)
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3)
        self.norm1 = _norm(norm, widths[0])
        self.relu1 = nn.ReLU()
        cin = widths[0]
        for i, (width, stride) in enumerate(zip(widths, (1, 2, 2), strict=True), start=1):
            blocks = [ResidualBlock(cin, width, norm, stride, small), ResidualBlock(width, width, norm, 1, small)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = width
        self.conv2 = nn.Conv2d(cin, out, 1)
        for m in self.modules():  # RAFT's initialisation; pretrained weights replace it
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class MotionEncoder(nn.Module):
    """Correlation features and current flow -> motion features (the flow appended as the last two channels)."""

    def __init__(self, corr_channels: int, small: bool = False):
        super().__init__()
        c1, f1, f2, out = (96, 64, 32, 80) if small else (256, 128, 64, 126)
        self.convc1 = nn.Conv2d(corr_channels, c1, 1)
        self.convc2 = None if small else nn.Conv2d(c1, 192, 3, padding=1)
        self.convf1 = nn.Conv2d(2, f1, 7, padding=3)
        self.convf2 = nn.Conv2d(f1, f2, 3, padding=1)
        self.conv = nn.Conv2d((c1 if small else 192) + f2, out, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.convc1(corr))
        if self.convc2 is not None:
            c = F.relu(self.convc2(c))
        f = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([c, f], 1))), flow], 1)


class GRU(nn.Module):
    """Convolutional GRU: one 3x3 pass (``kernels=((3, 3),)``, RAFT-S) or a 1x5 then a 5x1 pass (RAFT)."""

    def __init__(self, hidden: int, inp: int, kernels):
        super().__init__()
        self.suffixes = [""] if len(kernels) == 1 else [str(i + 1) for i in range(len(kernels))]
        for suffix, (kh, kw) in zip(self.suffixes, kernels, strict=True):
            for gate in "zrq":
                setattr(
                    self, f"conv{gate}{suffix}", nn.Conv2d(hidden + inp, hidden, (kh, kw), padding=(kh // 2, kw // 2))
                )

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for s in self.suffixes:
            hx = torch.cat([h, x], 1)
            z = torch.sigmoid(getattr(self, f"convz{s}")(hx))
            r = torch.sigmoid(getattr(self, f"convr{s}")(hx))
            q = torch.tanh(getattr(self, f"convq{s}")(torch.cat([r * h, x], 1)))
            h = (1 - z) * h + z * q
        return h


class FlowHead(nn.Module):
    def __init__(self, inp: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    """One refinement step: (hidden, context, correlation, flow) -> (hidden, upsampling mask or None, delta flow)."""

    def __init__(self, corr_channels: int, hidden: int, context: int, small: bool = False):
        super().__init__()
        self.encoder = MotionEncoder(corr_channels, small)
        motion = 82 if small else 128
        self.gru = GRU(hidden, context + motion, ((3, 3),) if small else ((1, 5), (5, 1)))
        self.flow_head = FlowHead(hidden, 128 if small else 256)
        # RAFT-S upsamples bilinearly; RAFT predicts 8x8 convex weights over a 3x3 neighbourhood per coarse cell
        self.mask = (
            None if small else nn.Sequential(nn.Conv2d(hidden, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 576, 1))
        )

    def forward(self, net, inp, corr, flow):
        net = self.gru(net, torch.cat([inp, self.encoder(flow, corr)], 1))
        mask = None if self.mask is None else 0.25 * self.mask(net)  # RAFT's 0.25 scale, part of the trained model
        return net, mask, self.flow_head(net)


def correlation_pyramid(fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int = 4) -> list[torch.Tensor]:
    """All-pairs correlation ``<f1(p), f2(q)> / sqrt(D)`` as ``[N*h*w, 1, h, w]``, average-pooled ``levels - 1``
    times by 2. fmap: float ``[N, D, h, w]``."""
    n, d, h, w = fmap1.shape
    corr = torch.einsum("ndp,ndq->npq", fmap1.flatten(2), fmap2.flatten(2)) / d**0.5
    pyramid = [corr.reshape(n * h * w, 1, h, w)]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2, stride=2))
    return pyramid


def lookup(pyramid: list[torch.Tensor], coords: torch.Tensor, radius: int) -> torch.Tensor:
    """Bilinear correlation lookup in a ``(2r+1)^2`` window around ``coords [N, 2, h, w]`` (x, y in 1/8 pixels) on
    every level (coordinates divided by ``2**level``); zero outside. Returns ``[N, levels*(2r+1)^2, h, w]``.

    Channel order matches the trained weights: within a level, index ``i*(2r+1) + j`` holds offset x = i - r,
    y = j - r (RAFT's window runs over x in its outer index).
    """
    n, _, h, w = coords.shape
    offsets = torch.arange(-radius, radius + 1, device=coords.device, dtype=coords.dtype)
    window = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), -1)  # [k, k, 2] as (x, y) offsets
    centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
    out = []
    for level, corr in enumerate(pyramid):
        points = centre / 2**level + window
        hl, wl = corr.shape[-2:]
        # pixel centres to grid_sample's [-1, 1] (align_corners=False): exact for any size, one-cell levels included
        scale = torch.tensor([2.0 / wl, 2.0 / hl], device=coords.device, dtype=coords.dtype)
        sampled = F.grid_sample(corr, (points + 0.5) * scale - 1, align_corners=False)
        out.append(sampled.view(n, h, w, -1))
    return torch.cat(out, -1).permute(0, 3, 1, 2)


def convex_upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, 2, h, w]`` flow -> ``[N, 2, 8h, 8w]``, each fine pixel a softmax-weighted mix of the 3x3 coarse
    neighbours (``mask [N, 576, h, w]``), flow scaled by 8 to fine pixels."""
    n, _, h, w = flow.shape
    weights = mask.view(n, 1, 9, 8, 8, h, w).softmax(2)
    neighbours = F.unfold(8 * flow, 3, padding=1).view(n, 2, 9, 1, 1, h, w)
    up = (weights * neighbours).sum(2)  # [n, 2, 8, 8, h, w]
    return up.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, 8 * h, 8 * w)


class RAFT(nn.Module):
    """RAFT (``small=False``: 5.3M parameters, raft-things.pth) or RAFT-S (``small=True``: 1.0M, raft-small.pth)."""

    def __init__(self, small: bool = False):
        super().__init__()
        self.small = small
        self.hidden, self.context = (96, 64) if small else (128, 128)
        self.levels, self.radius = 4, 3 if small else 4
        self.fnet = Encoder(128 if small else 256, "instance", small)
        self.cnet = Encoder(self.hidden + self.context, "none" if small else "batch", small)
        self.update_block = UpdateBlock(self.levels * (2 * self.radius + 1) ** 2, self.hidden, self.context, small)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = 20) -> torch.Tensor:
        """Flow from ``image1`` to ``image2``: float ``[N, 3, H, W]`` in [0, 1], H and W multiples of 8 (at least
        64) -> float32 ``[N, 2, H, W]`` in pixels, (x, y) order.

        Gradients reach the images through the feature and context encoders and the correlation values; as in
        RAFT, the lookup coordinates are detached between iterations.
        """
        x1, x2 = 2 * image1 - 1, 2 * image2 - 1
        fmap1, fmap2 = self.fnet(torch.cat([x1, x2])).float().chunk(2)
        pyramid = correlation_pyramid(fmap1, fmap2, self.levels)
        net, inp = self.cnet(x1).split([self.hidden, self.context], 1)
        net, inp = torch.tanh(net), torch.relu(inp)
        n, _, h, w = fmap1.shape
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coords0 = torch.stack([xs, ys]).to(fmap1).expand(n, 2, h, w)
        coords1, mask = coords0, None
        for _ in range(iters):
            coords1 = coords1.detach()
            net, mask, delta = self.update_block(net, inp, lookup(pyramid, coords1, self.radius), coords1 - coords0)
            coords1 = coords1 + delta
        flow = coords1 - coords0
        if mask is None:
            return 8 * F.interpolate(flow, size=(8 * h, 8 * w), mode="bilinear", align_corners=True)
        return convex_upsample(flow, mask)


def vbench_threshold(height: int, width: int) -> float:
    """VBench's per-pair motion threshold in pixels: 6 at a 256-pixel short side, scaled linearly."""
    return 6.0 * min(height, width) / 256.0


def vbench_stride(fps: float) -> int:
    """VBench's frame stride for dynamic degree: ``round(fps / 8)`` (every frame at 8 fps, every third at 24;
    at least 1, where VBench would stop on a stride of 0 below 4 fps)."""
    return max(1, round(fps / 8))


def vbench_count(frames: int) -> int:
    """Pairs that must pass the threshold for VBench to call a video of ``frames`` frames dynamic:
    ``round(4 * frames / 16)`` with Python's round-half-to-even (so 0 for 2 frames, 2 for 6 and for 10)."""
    return round(4 * (frames / 16.0))


def top_magnitude(flow: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """Mean of the largest ``fraction`` of flow magnitudes: ``[N, 2, H, W]`` -> float32 ``[N]`` (pixels).

    As VBench: ``int(H * W * fraction)`` values (at least one here; VBench would average an empty set).
    """
    magnitude = torch.linalg.vector_norm(flow.float(), dim=1).flatten(1)  # gradient 0, not NaN, at zero flow
    k = max(1, int(magnitude.shape[1] * fraction))
    return magnitude.topk(k, dim=1).values.mean(1)


def dynamic_scores(pair_magnitudes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    """The ``raft`` reward's dimensions from per-pair top-5% magnitudes ``[B, P]`` (P = T - 1 consecutive pairs)
    of ``height`` x ``width`` frames; each a float32 ``[B]``.

    - ``flow_magnitude``: the mean over pairs, in pixels.
    - ``dynamic_degree``: VBench's rule, 1.0 when at least ``vbench_count(P + 1)`` pairs exceed
      ``vbench_threshold(height, width)`` (with VBench's quirk: a count of 0 calls any video with a pair dynamic).
    - ``overall``: its smooth surrogate, the mean of ``min(1, m / threshold)`` over the ``max(1, count)`` pairs that
      move most: the soft progress of the pairs VBench needs towards its threshold. It is 1.0 when those pairs reach
      the threshold (so whenever VBench calls the video dynamic, for count >= 1), 0.0 for a still video, and below
      that it keeps a gradient until they get there (many pairs of slow motion do not add up to 1.0), never for
      motion beyond the threshold.
    """
    b, p = pair_magnitudes.shape
    m = pair_magnitudes.float()
    if p == 0:
        zero = m.new_zeros(b)
        return {"flow_magnitude": zero, "dynamic_degree": zero, "overall": zero}
    threshold, count = vbench_threshold(height, width), vbench_count(p + 1)
    dynamic = ((m > threshold).sum(1) >= count).float()
    k = max(1, count)
    soft = (m / threshold).clamp(max=1.0).topk(min(k, p), dim=1).values.sum(1) / k
    return {"flow_magnitude": m.mean(1), "dynamic_degree": dynamic, "overall": soft}


def pad8(images: torch.Tensor) -> torch.Tensor:
    """Replicate-pad ``[N, C, H, W]`` to multiples of 8, split evenly between sides (RAFT's ``InputPadder``)."""
    h, w = images.shape[-2:]
    ph, pw = -h % 8, -w % 8
    return F.pad(images, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="replicate")


class RaftDynamicReward:
    """VBench dynamic degree with RAFT flow between consecutive frames. See ``dynamic_scores`` for the dimensions.

    As VBench: frames at their own resolution, every ``round(fps / 8)``-th frame (``score`` passes each video's
    fps), padded to multiples of 8, ``iters`` refinement steps (VBench: 20), the top-5% mean of the padded
    flow's magnitudes per pair, and the threshold and pair count scaled by resolution and frame count. Frames with a
    short side under 64 pixels are upsampled to 64 first (RAFT's pyramid needs it) and magnitudes scaled back.
    """

    name = "raft"
    takes_fps = True  # score passes each video's fps (VBench's frame stride depends on it)
    differentiable = True
    dimensions = ("flow_magnitude", "dynamic_degree", "overall")
    score_range = (0.0, 1.0)

    def __init__(self, model: RAFT, iters: int = 20, pairs_per_batch: int = 8, device="cpu"):
        if iters < 1 or pairs_per_batch < 1:
            raise VpoError(f"reward raft: iters and pairs_per_batch must be >= 1; got {iters} and {pairs_per_batch}")
        self.model, self.iters, self.pairs_per_batch, self.device = model, iters, pairs_per_batch, device

    def pair_magnitudes(self, frames: torch.Tensor) -> torch.Tensor:
        """Top-5% flow magnitude per consecutive pair: float ``[B, T, 3, H, W]`` in [0, 1] -> float32 ``[B, T-1]``."""
        b, t, _, h, w = frames.shape
        x = frames.float().to(self.device)
        scale = max(1.0, MIN_SIZE / min(h, w))
        first, second = x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1)
        if scale > 1:
            size = (max(MIN_SIZE, round(h * scale)), max(MIN_SIZE, round(w * scale)))
            first, second = (
                F.interpolate(i, size=size, mode="bilinear", align_corners=False) for i in (first, second)
            )
        first, second = pad8(first), pad8(second)
        out = [
            top_magnitude(
                self.model(first[i : i + self.pairs_per_batch], second[i : i + self.pairs_per_batch], self.iters)
            )
            for i in range(0, first.shape[0], self.pairs_per_batch)
        ]
        return (torch.cat(out) / scale if out else x.new_zeros(0)).view(b, t - 1)

    def __call__(self, frames: torch.Tensor, prompts: list[str], fps: float | None = None) -> dict[str, torch.Tensor]:
        """``fps``: the video's frame rate; as VBench, every ``vbench_stride(fps)``-th frame is compared with the
        next one kept (about 8 fps). Without it (``fps`` None) every frame is used."""
        check_frames(frames, prompts)
        frames = frames[:, :: vbench_stride(fps)] if fps else frames
        return dynamic_scores(self.pair_magnitudes(frames), *frames.shape[-2:])


def load_raft(path=None, device="cpu", dtype=torch.float32, **options) -> RaftDynamicReward:
    """The ``raft`` reward. ``path``: raft-things.pth (RAFT-S weights are recognised by their keys). Options:
    ``iters`` (refinement steps, default 20 as VBench) and ``pairs_per_batch`` (frame pairs per RAFT call, default
    8; bounds memory). RAFT always runs in float32 (its correlation volume is float32 upstream too); ``dtype`` is
    accepted for the common loader signature."""
    check_options("raft", options, dict.fromkeys(("iters", "pairs_per_batch")))
    if not path:
        raise VpoError(f"reward raft needs weights: pass --reward-path with {RAFT_WHAT}")
    if not os.path.isfile(path):
        raise VpoError(f"reward raft: no file at {path}; pass --reward-path with {RAFT_WHAT}")
    state = read_state_dict(path, "raft", RAFT_WHAT)
    model = RAFT(small="update_block.gru.convz.weight" in state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        example = (missing or unexpected or mismatched)[0]
        raise VpoError(
            f"reward raft: {path} does not fit RAFT ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} mismatched weights, e.g. {example}); pass --reward-path with {RAFT_WHAT}"
        )
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return RaftDynamicReward(model.to(device), device=device, **options)
