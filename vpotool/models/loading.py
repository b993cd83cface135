"""Loading model components with ``from_pretrained`` and turning loader failures into one clear line."""

from __future__ import annotations

import contextlib
import contextvars
import os

from vpotool.errors import VpoError, first_line

_WEIGHTLESS = contextvars.ContextVar("weightless", default=False)


@contextlib.contextmanager
def without_weights():
    """Inside the block, :func:`load_component` builds each component from its config alone on the meta device
    (shapes, no values, no weights file read): what ``vpotool plan`` traces. A tokenizer still loads from its
    folder, or is :class:`PlanTokenizer` where the folder has none."""
    token = _WEIGHTLESS.set(True)
    try:
        yield
    finally:
        _WEIGHTLESS.reset(token)


def weightless() -> bool:
    return _WEIGHTLESS.get()


class PlanTokenizer:
    """A stand-in tokenizer for a config-only folder: every prompt fills ``max_length`` tokens (the longest the
    family encodes, the most memory), ids 0."""

    model_max_length = 1 << 30

    def __call__(self, prompts, max_length: int = 512, **_):
        import torch
        from transformers import BatchEncoding

        shape = (len(prompts), max_length)
        return BatchEncoding(
            {"input_ids": torch.zeros(shape, dtype=torch.long), "attention_mask": torch.ones(shape, dtype=torch.long)}
        )


def build_from_config(cls, path: str, subfolder: str | None, family: str, dtype=None):
    """``cls`` built from the config in ``path/subfolder`` on the meta device, in ``dtype`` (see
    :func:`without_weights`)."""
    import torch

    sub = {"subfolder": subfolder} if subfolder else {}
    where = f"{path}/{subfolder}" if subfolder else path
    if cls.__name__ == "AutoTokenizer":
        try:
            return cls.from_pretrained(path, **sub)
        except (OSError, ValueError, KeyError, TypeError):
            return PlanTokenizer()
    try:
        with torch.device("meta"):
            if cls.__module__.startswith("diffusers"):
                model = cls.from_config(cls.load_config(path, **sub))
            else:
                from transformers import AutoConfig

                model = cls._from_config(AutoConfig.from_pretrained(path, **sub))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VpoError(f"could not build the {family} {subfolder or 'model'} from the config in {where}: "
                       f"{first_line(e)}; `vpotool plan` needs each part's config.json") from e  # fmt: skip
    return cast_like_loading(model, dtype) if dtype is not None else model


def cast_like_loading(model, dtype):
    """``model`` in ``dtype`` as ``from_pretrained`` leaves it: the modules the class keeps in float32 stay float32
    (diffusers: ``_keep_in_fp32_modules`` in any dtype, e.g. Wan's norms and time embedder; transformers:
    ``_keep_in_fp32_modules_strict``, and ``_keep_in_fp32_modules`` in float16 only, e.g. T5's ``wo``)."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if type(model).__module__.startswith("diffusers") or dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model


def quiet_loading() -> None:
    """No per-file "Loading weights" progress bars from transformers and diffusers (stages show their own), and no
    load reports or hub retry warnings: loaders turn failures into one ``VpoError`` line."""
    import diffusers
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # Missing weights and unreachable hubs become one VpoError line; no load reports or retry chatter on top.
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()


def load_component(cls, path: str, subfolder: str | None, family: str, dtype=None, **kwargs):
    """``cls.from_pretrained(path, subfolder=...)``; a missing folder or bad checkpoint becomes a ``VpoError``.

    ``dtype`` is passed under the keyword each library expects (diffusers: ``torch_dtype``, transformers: ``dtype``).
    """
    if not path:
        raise VpoError(f"--model {family} needs --model-path (a local diffusers folder or a hub id)")
    looks_local = os.path.sep in str(path) or str(path).startswith(".") or os.path.exists(path)
    if looks_local and not os.path.isdir(path):
        raise VpoError(f"model folder not found: {path} (pass --model-path with a {family} checkpoint folder)")
    if looks_local and subfolder and not os.path.isdir(os.path.join(path, subfolder)):
        if weightless() and cls.__name__ == "AutoTokenizer":
            return PlanTokenizer()
        raise VpoError(
            f"{path} has no '{subfolder}/' folder; --model {family} expects the diffusers layout "
            f"(transformer/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    quiet_loading()
    if weightless():
        return build_from_config(cls, path, subfolder, family, dtype)
    sub = {"subfolder": subfolder} if subfolder else {}
    if dtype is not None:
        kwargs["torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"] = dtype
    try:
        return cls.from_pretrained(path, **sub, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = first_line(e)
        where = f"{path}/{subfolder}" if subfolder else path
        raise VpoError(f"could not load the {family} {subfolder or 'model'} from {where}: {first}") from e


def scheduler_shift(scheduler, default: float) -> float:
    """The flow shift a loaded scheduler was configured with (``flow_shift`` or ``shift``); ``default`` without one."""
    cfg = getattr(scheduler, "config", None) or {}
    return float(cfg.get("flow_shift") or cfg.get("shift") or default)


def pipeline_index(path: str) -> dict:
    """The checkpoint's ``model_index.json`` (component classes and pipeline settings); ``{}`` when it has none."""
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path))
    except (OSError, ValueError):
        return {}


def checkpoint_schedulers(path: str):
    """The checkpoint's own scheduler as ``(euler, other)``: a ``FlowMatchEulerDiscreteScheduler`` in ``euler``
    (its sigma grid is then vpotool's sampling grid, equal to the pipeline's), any other class (Wan's UniPC
    multistep) in ``other``, for the ``pipeline`` sampler; ``(None, None)`` when ``scheduler/`` has none."""
    import diffusers

    try:
        cfg = diffusers.FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
    except (OSError, ValueError):
        return None, None
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_config"):
        return None, None
    scheduler = cls.from_config(cfg)
    if isinstance(scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        return scheduler, None
    return None, scheduler


def load_parts(path: str, family: str, transformer_cls, vae_cls, text_encoder_cls, device, dtype):
    """The four weighted parts of a diffusers-layout video checkpoint: ``(transformer, vae, text_encoder,
    tokenizer)``, each on ``device`` in ``dtype``, the transformer and VAE in eval mode."""
    from transformers import AutoTokenizer

    transformer = load_component(transformer_cls, path, "transformer", family, dtype=dtype)
    vae = load_component(vae_cls, path, "vae", family, dtype=dtype)
    text_encoder = load_component(text_encoder_cls, path, "text_encoder", family, dtype=dtype)
    tokenizer = load_component(AutoTokenizer, path, "tokenizer", family)
    return transformer.to(device).eval(), vae.to(device).eval(), text_encoder.to(device).eval(), tokenizer
