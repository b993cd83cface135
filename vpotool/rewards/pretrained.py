"""What every model-based reward shares: loading weights with one clear error line, and torch preprocessing.

Preprocessing stays in torch (resize, crop, normalise, frame picking) so a differentiable reward passes gradients
back to the pixels; no PIL, no numpy, no image processors on the scoring path.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from vpotool.errors import VpoError, first_line

try:
    from safetensors import SafetensorError
except ImportError:  # older safetensors: the error is a plain exception class there
    SafetensorError = OSError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def looks_local(path: str) -> bool:
    """True for a filesystem path (absolute, relative with a separator, or existing); False for a hub id."""
    p = str(path)
    return os.path.isabs(p) or p.startswith(".") or os.path.exists(p) or p.count("/") != 1


def weights_path(path: str | None, default_id: str, reward: str, what: str) -> str:
    """``path`` or the reward's default hub id; a local path that does not exist is a ``VpoError``.

    ``what`` names the weights for the message, e.g. "a VideoScore checkpoint folder".
    """
    path = str(path) if path else default_id
    if looks_local(path) and not os.path.exists(path):
        raise VpoError(
            f"reward {reward}: no weights at {path}; download {what} (e.g. hub id {default_id}) and pass its folder "
            f"with --reward-path"
        )
    return path


def load_pretrained(cls, path: str | None, default_id: str, reward: str, what: str, device="cpu", dtype=None, **kw):
    """``cls.from_pretrained`` for a reward's weights, frozen and in eval mode on ``device``.

    A missing folder, an unreachable hub id or a checkpoint whose weights do not fit ``cls`` (missing or
    mismatched keys: transformers would silently initialise them at random) becomes one ``VpoError`` line.
    """
    from vpotool.models.loading import build_from_config, quiet_loading, weightless

    path = weights_path(path, default_id, reward, what)
    quiet_loading()
    if weightless():  # `vpotool plan`: the architecture from the folder's config.json, on the meta device
        return freeze(build_from_config(cls, path, None, f"reward {reward}", dtype))
    if dtype is not None:
        kw["dtype"] = dtype
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kw)
    # a checkpoint of another kind fails inside the model's constructor with any of these
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, SafetensorError) as e:
        first = first_line(e)
        damaged = damaged_weights(path)
        if damaged:
            raise VpoError(f"reward {reward}: {damaged} is damaged or cut short ({first[:120]}); download {what} "
                           "again and pass it with --reward-path") from e  # fmt: skip
        raise VpoError(
            f"reward {reward}: could not load {what} from {path}: {first} (pass --reward-path with {what})"
        ) from e
    bad = list(info.get("missing_keys") or []) + [str(m) for m in info.get("mismatched_keys") or []]
    if bad:
        raise VpoError(
            f"reward {reward}: {path} does not fit {cls.__name__} ({len(bad)} missing or mismatched weights, e.g. "
            f"{bad[0]}); pass --reward-path with {what}"
        )
    return freeze(model.to(device))


def damaged_weights(path: str) -> str | None:
    """The first ``.safetensors`` file under local folder ``path`` whose header cannot be read (a download cut
    short), or None."""
    from safetensors import safe_open

    if not os.path.isdir(str(path)):
        return None
    for root, _, files in sorted(os.walk(str(path))):
        for name in sorted(f for f in files if f.endswith(".safetensors")):
            try:
                with safe_open(os.path.join(root, name), "pt"):
                    pass
            except Exception:  # noqa: BLE001 - any failure to open the header is the damage being looked for
                return os.path.join(root, name)
    return None


def read_state_dict(path: str, reward: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch (``.pt``/``.pth``/``.bin``) file, loaded with ``weights_only=True``.

    A ``{"state_dict": ...}`` wrapper and a DDP ``module.`` prefix are removed. Unreadable files are a ``VpoError``.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VpoError(f"reward {reward}: no file at {path}; pass --reward-path with {what}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors have no common base class
        first = first_line(e)
        raise VpoError(
            f"reward {reward}: could not read {path}: {first[:200]} (pass --reward-path with {what})"
        ) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VpoError(f"reward {reward}: {path} holds no state dict of tensors; pass --reward-path with {what}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def check_options(reward: str, options: dict, known: dict) -> dict:
    """``known`` (option -> default) updated with ``options``; an unknown option or a bad ``frames`` is a
    ``VpoError``. ``frames`` (when known) becomes a positive int or None."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise VpoError(f"reward {reward}: unknown option(s) {', '.join(unknown)}; known options: {', '.join(known)}")
    out = {**known, **options}
    if "frames" in out and out["frames"] is not None:
        n = out["frames"]
        if isinstance(n, str) and n.strip().isdigit():
            n = int(n)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise VpoError(f"reward {reward}: option frames must be a positive integer or None; got {n!r}")
        out["frames"] = n
    return out


def optional_file(path: str, filename: str) -> str | None:
    """The local path of a checkpoint's optional file (local folder or hub id); None when it has none or the hub
    cannot be reached."""
    from transformers.utils import cached_file

    try:
        return cached_file(
            path, filename, _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False
        )
    except (OSError, ValueError):
        return None


def read_config(file: str | os.PathLike, owner: str, what: str) -> dict:
    """The json object in a checkpoint's config ``file``; an unreadable, empty or malformed file is one
    ``VpoError`` line naming the file, ``owner`` (e.g. ``reward videoalign``) and the checkpoint ``what`` expected.
    The one way model-based rewards and judges read their config files."""
    fix = f"restore it from {what}" if what else "restore it from the checkpoint's download"
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise VpoError(f"{owner}: cannot read {file} ({getattr(e, 'strerror', None) or e}); {fix}") from e
    if not text.strip():
        raise VpoError(f"{owner}: {file} is empty; {fix}")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise VpoError(f"{owner}: {file} is not valid JSON ({e.msg}, line {e.lineno}); {fix}") from e
    if not isinstance(config, dict):
        raise VpoError(f"{owner}: {file} holds a JSON {type(config).__name__}, not an object; {fix}")
    return config


def read_json(path: str, filename: str, owner: str = "", what: str = "") -> dict:
    """A checkpoint's optional json file (e.g. ``preprocessor_config.json``) as a dict; ``{}`` when it has none.
    A damaged one is one line (see :func:`read_config`)."""
    found = optional_file(path, filename)
    if not found:
        return {}
    return read_config(found, owner or f"checkpoint {path}", what)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Eval mode with no parameter gradients: rewards pass gradients to the pixels, never to their own weights."""
    module.eval()
    module.requires_grad_(False)
    return module


def pick_frames(frames: torch.Tensor, n: int | None) -> torch.Tensor:
    """``n`` evenly spaced frames (first and last included) of ``[B, T, ...]``; all of them when ``n`` is None or
    at least T."""
    t = frames.shape[1]
    if n is None or n >= t:
        return frames
    index = torch.linspace(0, t - 1, n).round().long().to(frames.device)
    return frames.index_select(1, index)


def resize_crop(images: torch.Tensor, size: int | tuple[int, int], crop: bool = True) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` float images as CLIP-style processors do, differentiably.

    With ``crop`` and an int ``size``: the short side goes to ``size`` (bicubic, antialiased), then a centre crop
    of ``size`` x ``size``. Otherwise a plain resize to ``size`` (an int means square).
    """
    h, w = images.shape[-2:]
    if isinstance(size, int) and crop:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        images = F.interpolate(images, size=new, mode="bicubic", align_corners=False, antialias=True)
        top, left = (new[0] - size) // 2, (new[1] - size) // 2
        return images[..., top : top + size, left : left + size]
    target = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(images, size=target, mode="bicubic", align_corners=False, antialias=True)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(images - mean) / std`` per channel for ``[..., C, H, W]`` float images."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - m) / s


def frame_similarity(features: torch.Tensor) -> torch.Tensor:
    """VBench's consistency statistic on per-frame features ``[B, T, D]`` -> ``[B]``.

    For each frame after the first: the mean of its cosine similarity to the first frame and to the previous
    frame, each clamped at 0; averaged over those frames. 1.0 for a single frame.
    """
    if features.shape[1] < 2:
        return torch.ones(features.shape[0], dtype=torch.float32, device=features.device)
    f = F.normalize(features.float(), dim=-1)
    to_first = (f[:, 1:] * f[:, :1]).sum(-1).clamp(min=0)
    to_prev = (f[:, 1:] * f[:, :-1]).sum(-1).clamp(min=0)
    return ((to_first + to_prev) / 2).mean(1)
