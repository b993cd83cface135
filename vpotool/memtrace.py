"""Peak memory and FLOPs of a piece of code without running it (``vpotool plan``).

Weights are built on the meta device (shapes and dtypes, no values, no memory) and the code runs on meta tensors
under :class:`MemoryTrace`, a dispatch mode that sees every tensor an operator makes and keeps the live storages'
sizes, each rounded up to the 512-byte blocks of a GPU's caching allocator, and their peak: what
``torch.cuda.max_memory_allocated`` reports for the same code. Storages are freed when Python frees them, so
autograd's saved tensors, gradient checkpointing's recomputation and the optimizer's state are counted as the run
holds them.

Attention is traced as a flash kernel keeps it (the output and its log-sum-exp, no attention matrix), as GPUs and
CPUs run ``scaled_dot_product_attention``; on meta tensors torch would otherwise take the math fallback, which
materialises the matrix. A value read back from the device (``.item()``, a data-dependent branch) has no
value on meta tensors: it reads as :func:`read_back` says.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

BLOCK = 512  # the CUDA caching allocator's smallest block: every allocation is rounded up to it


def block_bytes(n: int) -> int:
    return -(-n // BLOCK) * BLOCK if n else 0


class MemoryTrace(TorchDispatchMode):
    """Live and peak bytes of the tensors made while active, by category.

    Allocations are charged to :attr:`category` (``with trace.charge("VAE"):``); :meth:`adopt` charges tensors
    made before the trace (a model's weights), :meth:`move` re-charges live ones (a gradient that became an
    optimizer's), :meth:`release` takes tensors off the device (an offloaded text encoder)."""

    def __init__(self):
        super().__init__()
        self.category = "activations"
        self.live: dict[int, tuple[int, str]] = {}  # key -> (bytes, category)
        self.totals: dict[str, int] = {}
        self.current = self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._keys = WeakIdKeyDictionary()  # storage -> key
        self._next = itertools.count()
        self.base = self.step_peak = 0  # see mark()
        self.flops = 0  # of the matrix products, convolutions and attention, as torch's FlopCounterMode counts them
        self.exchanged = 0  # bytes this process sends to the others of its context group (see exchanged_bytes)

    def mark(self) -> None:
        """A step starts here: :attr:`step_peak` - :attr:`base` is then what the step adds at its peak (what a
        measurement of the step alone sees)."""
        self.base = self.step_peak = self.current

    # --- bookkeeping
    def _add(self, storage, category: str) -> None:
        if storage in self._keys:
            return
        n = block_bytes(storage.nbytes())
        key = next(self._next)
        self._keys[storage] = key
        self.live[key] = (n, category)
        weakref.finalize(storage, self._free, key)
        self.totals[category] = self.totals.get(category, 0) + n
        self.current += n
        self.step_peak = max(self.step_peak, self.current)
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = dict(self.totals)

    def _free(self, key: int) -> None:
        n, category = self.live.pop(key, (0, None))
        if category is not None:
            self.totals[category] -= n
            self.current -= n

    def _storages(self, tensors):
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                yield t.untyped_storage()

    def adopt(self, tensors, category: str) -> None:
        """Count ``tensors`` (made before the trace, e.g. parameters) under ``category``."""
        for st in self._storages(tensors):
            self._add(st, category)

    def move(self, tensors, category: str) -> None:
        """Re-charge live ``tensors`` to ``category`` (counted once)."""
        for st in self._storages(tensors):
            key = self._keys.get(st)
            if key is None:
                self._add(st, category)
                continue
            n, old = self.live[key]
            self.totals[old] -= n
            self.totals[category] = self.totals.get(category, 0) + n
            self.live[key] = (n, category)

    def release(self, tensors) -> None:
        """``tensors`` leave the device (moved to host memory): no longer counted."""
        for st in self._storages(tensors):
            key = self._keys.pop(st, None)
            if key is not None:
                self._free(key)

    @contextlib.contextmanager
    def charge(self, category: str):
        """Charge allocations inside the block to ``category``."""
        before, self.category = self.category, category
        try:
            yield
        finally:
            self.category = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return read_back(args[0])
        out = func(*args, **(kwargs or {}))
        count = FLOPS.get(func.overloadpacket)
        if count is not None:
            self.flops += count(*args, **(kwargs or {}), out_val=out)
        if func.namespace == "_c10d_functional":
            self.exchanged += exchanged_bytes(func, args, out)
        for st in self._storages(tree_leaves(out)):
            self._add(st, self.category)
        return out


def exchanged_bytes(func, args, out) -> int:
    """What one process sends in a functional collective of context parallelism: an all-to-all keeps 1/N of its
    input and sends the rest; an all-gather sends its input to each of the N - 1 others (ring algorithms forward as
    much again; the figure is the data's, as a direct exchange moves it). Other collectives count 0."""
    import torch.distributed as dist

    name = func.overloadpacket.__name__
    if name not in ("all_to_all_single", "all_gather_into_tensor"):
        return 0
    group = dist.distributed_c10d._resolve_process_group(args[-1])
    n = dist.get_world_size(group)
    sent = args[0].numel() * args[0].element_size()
    return sent * (n - 1) // n if name == "all_to_all_single" else sent * (n - 1)


def read_back(t: torch.Tensor):
    """The value a traced ``.item()`` reads, which a meta tensor has none of: ``False`` for a boolean (a mask has
    padding, a check found nothing: the path that holds more), 1 for a number (a step count, a scale)."""
    if t.dtype == torch.bool:
        return False
    return 1 if not t.dtype.is_floating_point and not t.dtype.is_complex else 1.0


def flash_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    q, k, v = query, key, value
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    # the kernel takes 4-d [B, H, L, D]; fold any other leading shape into B
    lead = q.shape[:-2]
    q4, k4, v4 = (x.reshape(-1, 1, *x.shape[-2:]) if x.dim() != 4 else x for x in (q, k, v))
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q4, k4, v4, dropout_p=dropout_p, is_causal=is_causal, attn_mask=mask, scale=scale
    )[0]
    return out.reshape(*lead, *out.shape[-2:]) if q.dim() != 4 else out


def _flop_formulas() -> dict:
    """torch's FLOP formulas by operator, with the CPU flash kernel's (what meta tensors trace) counted as the CUDA
    one's. (torch's ``FlopCounterMode`` itself is not used: its module tracker keeps the tensors that gradient
    checkpointing recomputes alive through the backward pass, which the memory trace would count.)"""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    formulas = dict(fc.flop_registry)

    def forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    def backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)

    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return formulas


FLOPS = _flop_formulas()


@contextlib.contextmanager
def traced():
    """A :class:`MemoryTrace` active for the block (``trace.flops`` counts its FLOPs), attention on meta tensors
    traced as flash attention."""
    trace = MemoryTrace()
    with flash_on_meta(), trace:
        yield trace


@contextlib.contextmanager
def flash_on_meta():
    """``torch.nn.functional.scaled_dot_product_attention`` on meta tensors runs as :func:`flash_attention` inside
    the block; the function itself is swapped (the models look it up at call time), not a torch-function mode,
    whose stack the backward pass does not see: gradient checkpointing's recomputation would take the math path and
    no longer match its forward."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        query = args[0] if args else kwargs.get("query")
        if isinstance(query, torch.Tensor) and query.device.type == "meta":
            return flash_attention(*args, **kwargs)
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def allocator_peak(fn) -> int:
    """Run ``fn()`` for real and return the most memory it held at once beyond what was live before it, from the
    CPU allocator's own record of every allocation and free (torch's profiler): the measurement the plan is checked
    against, independent of :class:`MemoryTrace`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = [e for e in walk(tree) if e.tag == _EventType.Allocation]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_time_ns):
        current += e.extra_fields.alloc_size
        peak = max(peak, current)
    return peak
