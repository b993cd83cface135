"""Two denoisers split by timestep, as Wan 2.2 A14B samples: ``transformer`` (the high-noise expert) for timesteps
at or above the boundary, ``transformer_2`` (the low-noise expert) below it.

:class:`TimestepExperts` is one ``nn.Module`` that the sampler, the trainers and DDP treat as the denoiser. Each
expert gets its own LoRA adapter under the same adapter name; saved adapters keep the experts' weights under the
pipeline's component names (``transformer.`` and ``transformer_2.``), which diffusers' ``load_lora_adapter``
selects with its ``prefix`` argument.
"""

from __future__ import annotations

import torch

EXPERT_NAMES = ("transformer", "transformer_2")


class TimestepExperts(torch.nn.Module):
    """``forward`` routes every batch entry to its expert by its timestep (``t >= boundary``: ``transformer``), so
    a training batch may mix both; the adapter calls go to both experts."""

    def __init__(self, transformer, transformer_2, boundary: float):
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2
        self.boundary = float(boundary)
        self.config = transformer.config
        self._supports_gradient_checkpointing = getattr(transformer, "_supports_gradient_checkpointing", False)

    @property
    def experts(self) -> dict[str, torch.nn.Module]:
        """The experts by their pipeline component names."""
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    def forward(self, hidden_states, timestep, return_dict: bool = False, **kwargs):
        """The experts' output for ``hidden_states [B, ...]`` at ``timestep [B]``; batch-first ``kwargs`` are split
        with the batch. Returns a one-element tuple, as the diffusers models do with ``return_dict=False``."""
        high = timestep >= self.boundary
        if bool(high.all()) or not bool(high.any()):
            expert = self.transformer if bool(high.all()) else self.transformer_2
            return (expert(hidden_states=hidden_states, timestep=timestep, return_dict=False, **kwargs)[0],)
        out = None
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            part = {k: v[rows] if torch.is_tensor(v) and v.shape[:1] == rows.shape else v for k, v in kwargs.items()}
            y = expert(hidden_states=hidden_states[rows], timestep=timestep[rows], return_dict=False, **part)[0]
            if out is None:
                out = y.new_zeros((hidden_states.shape[0], *y.shape[1:]))
            out = out.index_put((rows.nonzero().squeeze(1),), y)
        return (out,)

    # Adapter management, mirrored on both experts (diffusers' PeftAdapterMixin calls).
    @property
    def peft_config(self):
        return self.transformer.peft_config

    def add_adapter(self, config, adapter_name: str = "default") -> None:
        for expert in self.experts.values():
            expert.add_adapter(config, adapter_name=adapter_name)

    def set_adapter(self, name) -> None:
        for expert in self.experts.values():
            expert.set_adapter(name)

    def active_adapters(self) -> list[str]:
        return self.transformer.active_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts.values():
            expert.enable_adapters()

    def disable_adapters(self) -> None:
        for expert in self.experts.values():
            expert.disable_adapters()

    def delete_adapters(self, names) -> None:
        for expert in self.experts.values():
            expert.delete_adapters(names)

    def load_lora_adapter(self, path, prefix: str = "transformer", **kwargs) -> None:
        """Load each expert's part of a saved adapter (keys ``transformer.*`` and ``transformer_2.*``); ``prefix``
        is replaced by the experts' own names."""
        for name, expert in self.experts.items():
            expert.load_lora_adapter(path, prefix=name, **kwargs)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing()
