"""Context (sequence) parallelism: the processes of a context group share one video's tokens, so that a video too
long for one accelerator's activations trains and samples across several. It is diffusers' engine
(``ContextParallelConfig``, ``ModelMixin.enable_parallelism`` and the transformer's ``_cp_plan``) in its Ulysses form:
each process holds 1/N of the tokens through every block, and each self-attention exchanges them for 1/N of the
heads by all-to-all, attends over the whole sequence, and exchanges back; the denoiser's output is gathered whole
on every process of the group. Groups split the data as processes do without it, so a launch of WORLD_SIZE processes
with ``--context-parallel N`` runs WORLD_SIZE / N groups (consecutive ranks form a group, so a group of up to one
node's GPUs exchanges over its NVLink).

Every process of a group computes the same inputs (noise, timesteps, rewards: all seeded per example) and gets the
same output and loss; the backward pass gives each process the gradient of its own tokens only, so a group's
gradient is the sum over its processes, where DDP averages: :func:`gradient_scale` undoes that.

Ring attention (diffusers' ``ring_degree``) is not offered: it needs the attention's log-sum-exp, which the SDPA
backend vpotool runs (diffusers' ``native``) does not return.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass

import torch

from vpotool.errors import VpoError


def _wan_tokens(config, shape) -> int:
    _, f, h, w = shape
    pt, ph, pw = config.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def _ltx_tokens(config, shape) -> int:
    _, f, h, w = shape
    p = config.patch_size
    return (f // config.patch_size_t) * (h // p) * (w // p)


# --model names whose denoiser has a context-parallel plan in diffusers (WanTransformer3DModel's, the tiny model's and
# Wan 2.2's two experts'; LTXVideoTransformer3DModel's), with the token count of a latent ``(C, F, h, w)``. Others
# (CogVideoX, Open-Sora, SkyReels-V2 and tiny-ar, Self-Forcing's block-causal attention) have none.
FAMILIES = {"tiny": _wan_tokens, "wan": _wan_tokens, "ltx": _ltx_tokens}


@dataclass(frozen=True)
class Layout:
    """Where a process sits in a launch: ``degree`` processes share each video (a context group), ``world``
    processes in all, this one ``rank``."""

    degree: int = 1
    rank: int = 0
    world: int = 1

    @property
    def groups(self) -> int:
        """Context groups of the launch: they split the data between them."""
        return self.world // self.degree

    @property
    def group(self) -> int:
        return self.rank // self.degree

    @property
    def writes(self) -> bool:
        """Whether this process writes its group's outputs: the first of each group (the others compute the same)."""
        return self.rank % self.degree == 0


def check_family(model: str, n: int) -> None:
    """Refuse ``--context-parallel n`` (n > 1) for ``--model model`` when its denoiser has no parallel plan."""
    if n < 1:
        raise VpoError(f"--context-parallel must be at least 1 (got {n})")
    if n > 1 and model not in FAMILIES:
        raise VpoError(
            f"--context-parallel {n}: --model {model} has no context-parallel plan in diffusers; the families that "
            f"take it are {', '.join(FAMILIES)} (or run with --context-parallel 1)"
        )


def launch_layout(n: int, model: str) -> Layout:
    """This process's :class:`Layout` for ``--context-parallel n`` under the launch the environment describes
    (``WORLD_SIZE`` and ``RANK``, as torchrun and accelerate launch set them). Refuses, in one line, a family without
    a plan, n > 1 without a distributed launch, and an n that does not divide the launch's processes."""
    check_family(model, n)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if n > 1 and world == 1:
        raise VpoError(
            f"--context-parallel {n} shares each video over {n} processes: launch it with torchrun --nproc_per_node "
            f"{n} -m vpotool ... (or accelerate launch --num_processes {n} -m vpotool ...)"
        )
    if world % n:
        divisors = ", ".join(str(d) for d in range(1, world + 1) if world % d == 0)
        raise VpoError(
            f"--context-parallel {n} must divide the {world} processes of this launch (WORLD_SIZE) into whole "
            f"groups; pass one of {divisors}, or launch a multiple of {n} processes"
        )
    return Layout(n, rank, world)


def transformers_of(denoiser) -> list[torch.nn.Module]:
    """The diffusers transformers of a denoiser: itself, or both experts of a two-expert Wan 2.2 one."""
    from vpotool.models.experts import TimestepExperts

    return list(denoiser.experts.values()) if isinstance(denoiser, TimestepExperts) else [denoiser]


def check_heads(backend, n: int) -> None:
    """Refuse a degree that does not divide the denoiser's attention heads (Ulysses gives each process 1/N)."""
    for model in transformers_of(backend.model):
        heads = model.config.num_attention_heads
        if heads % n:
            divisors = ", ".join(str(d) for d in range(2, heads + 1) if heads % d == 0)
            raise VpoError(
                f"--context-parallel {n}: {type(model).__name__} has {heads} attention heads, which Ulysses attention "
                f"splits evenly over the processes of a group; pass one of {divisors}"
            )


def check_tokens(backend, shape: tuple[int, ...], n: int) -> None:
    """Refuse a video whose tokens (of a latent ``shape`` ``(C, F, h, w)``) do not split evenly over ``n``
    processes."""
    if n == 1:
        return
    name = backend.info.name
    tokens = FAMILIES[name](backend.model.config, shape)
    if tokens % n:
        raise VpoError(
            f"--context-parallel {n}: a latent of {shape[1]} x {shape[2]} x {shape[3]} is {tokens} tokens for "
            f"--model {name}, which do not split evenly over {n} processes; change --frames, --height or --width "
            f"so that the token count is a multiple of {n}"
        )


@contextlib.contextmanager
def _accelerator_count():
    """diffusers 0.42 picks each process's device as ``rank % torch.accelerator.device_count()``: a division by
    zero on a machine without accelerators (CPU processes). The device it picks is recorded and not used (the mesh
    passed in decides where the collectives run), so a count of 1 stands in while it runs."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = count


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers warns on every process, at every ``enable_parallelism``, that the feature is experimental."""
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class LocalCrossAttention:
    """The cross-attention of an LTX block (diffusers' ``LTXVideoAttnProcessor`` there) computed by each process on
    its own video tokens against the whole prompt, as Wan's plan does it: LTX's own plan splits the prompt's tokens
    too and runs the cross-attention as Ulysses attention, whose backward pass in diffusers 0.42 assumes as many
    keys as queries (training fails), and whose forward pass receives the prompt mask repeated to every head beside
    queries holding 1/N of them (sampling fails). Without context parallelism the two compute the same."""

    _attention_backend = None
    _parallel_config = None  # set by enable_parallelism, and not used: the attention is the process's own

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None or image_rotary_emb is not None:
            raise ValueError("LocalCrossAttention is for an LTX block's cross-attention (attn2) only")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
        if attention_mask is not None:  # the transformer's additive [B, 1, S_text], as [B, 1, 1, S_text]
            attention_mask = attention_mask.reshape(hidden_states.shape[0], 1, 1, attention_mask.shape[-1])
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend)
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))


def plan_of(model) -> dict:
    """The context-parallel plan vpotool applies to ``model``: its own, but LTX's with the prompt left whole (see
    :class:`LocalCrossAttention`)."""
    from diffusers import LTXVideoTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelInput

    plan = dict(model._cp_plan)
    if isinstance(model, LTXVideoTransformer3DModel):
        plan[""] = {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)}
    return plan


def _apply(model, config) -> None:
    """diffusers' ``enable_parallelism`` with ``config`` and :func:`plan_of`'s plan (LTX's cross-attention local)."""
    from diffusers import LTXVideoTransformer3DModel

    if isinstance(model, LTXVideoTransformer3DModel):
        for block in model.transformer_blocks:
            block.attn2.set_processor(LocalCrossAttention())
    with _accelerator_count(), _quiet_diffusers():
        model.enable_parallelism(config=config, cp_plan=plan_of(model))


def enable(backend, layout: Layout) -> None:
    """Share the backend's denoiser over the processes of each context group of ``layout``: a device mesh of
    ``(groups, 1, degree)`` (data, ring, ulysses) over the launch, and diffusers' plan on each transformer. Call after
    the LoRA adapters are added (the plan hooks the modules that are there) and before DDP or FSDP wraps the
    denoiser. Refuses, in one line, a degree that does not divide the attention heads."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    n = layout.degree
    check_heads(backend, n)
    # diffusers' all-gather of the output calls a functional collective torch 2.13 renamed; same operation
    warnings.filterwarnings("ignore", message=r".*all_gather_tensor.* is deprecated", category=FutureWarning)
    # and at the first forward that Wan's plan leaves a timestep of one value per video unsplit, as it must
    logging.getLogger("diffusers.hooks.context_parallel").setLevel(logging.ERROR)
    kind = "cpu" if backend.device.type == "meta" else backend.device.type  # a plan's model: a CPU group of its own
    mesh = init_device_mesh(kind, (layout.groups, 1, n), mesh_dim_names=("data", "ring", "ulysses"))
    for model in transformers_of(backend.model):
        _apply(model, ContextParallelConfig(ulysses_degree=n, mesh=mesh))


@contextlib.contextmanager
def suspended(denoiser):
    """The denoiser (unwrapped) as one process runs it alone inside the block (the plan's hooks removed, attention
    local), shared again after: for work one process does by itself, such as ``loop``'s final comparison."""
    from diffusers.hooks.context_parallel import remove_context_parallel

    models = [m for m in transformers_of(denoiser) if getattr(m, "_parallel_config", None) is not None]
    configs = [m._parallel_config for m in models]
    for m in models:
        remove_context_parallel(m, plan_of(m))
        _set_processors(m, None)
        m._parallel_config = None
    try:
        yield
    finally:
        for m, config in zip(models, configs, strict=True):
            _apply(m, config.context_parallel_config)


def _set_processors(model, config) -> None:
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config


def gradient_scale(layout: Layout) -> int:
    """What the gradients DDP (or FSDP) averaged over every process must be multiplied by to be the mean over the
    context groups of each group's gradient: a group's is the sum of its processes' (each holds its tokens')."""
    return layout.degree


def process_device(device: str) -> str:
    """``--device`` for this process of a launch: a bare ``cuda`` (or ``auto`` on a GPU machine) is the process's own
    GPU, ``cuda:LOCAL_RANK``, as accelerate places the trainers' processes."""
    from vpotool.models import resolve_device

    device = resolve_device(device)
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if device == "cuda" else device


def init_process_group(device: str) -> None:
    """The launch's process group (NCCL on GPUs, gloo on CPUs), for a stage that runs without accelerate (``sample``);
    a no-op when it exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


@contextlib.contextmanager
def planning_group(n: int):
    """A process group of ``n`` ranks that is rank 0's alone (torch's fake backend: collectives exchange nothing and
    return tensors of the right shapes), so that ``vpotool plan`` traces one process of a context group in one
    process, collectives included. Refused under a real launch."""
    import torch.distributed as dist
    import torch.testing._internal.distributed.fake_pg  # noqa: F401  (registers torch's "fake" backend)

    if dist.is_initialized():
        raise VpoError("vpotool plan --context-parallel runs in one process; run it without torchrun")
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=n)
    try:
        yield Layout(n, 0, n)
    finally:
        dist.destroy_process_group()
