"""One pipeline call whose rows run under different LoRA adapters.

diffusers' pipelines run one set of active adapters for a whole call. peft's LoRA layers take an
`adapter_names` argument (one name per input row, "__base__" for none) that diffusers does not
pass through; forward pre-hooks on the layers supply it here, tiled to the layer's rows: the text
encoder sees the batch's prompts (and, in a call of its own, the negative prompts) once per row,
the UNet sees them twice under classifier-free guidance (the unconditional half, then the
conditional one).

peft's mixed-batch forward loops over the batch's adapters in every layer: for each, gather its
rows, run its two low-rank projections, scatter the result back, about six operations per adapter
per layer per step. With 8 adapters in a batch that is ~50 small operations per layer, which cost
the tiny model a third of its throughput (bench multi_adapter). For plain LoRA on linear layers
(what training produces), the rows are instead computed together: each layer's adapters stacked
once per call (A: adapters x rank x in, B: adapters x out x rank, zero-padded to the largest rank,
a zero slot for base rows), gathered per row and applied with two batched matmuls: the same five
operations whatever the number of adapters. peft still runs the base layer (its rows all
"__base__") and owns the weights; only the sum differs. Other LoRA layers (convolutions, DoRA)
keep peft's own per-adapter loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

# peft's name for "no adapter" in a mixed batch: the row runs the bare base.
BASE_ROW = "__base__"

_Stacks = tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


class RowAdapters:
    """Row i of a call over len(names) prompts runs under names[i] (BASE_ROW: the base)."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self._adapters = sorted(set(self.names) - {BASE_ROW})
        base_slot = len(self._adapters)  # the zero slot
        slots = [base_slot if n == BASE_ROW else self._adapters.index(n) for n in self.names]
        self._slots = torch.tensor(slots)
        # Per layer, built at its first call and reused by every denoising step of this call.
        self._stacks: dict[int, _Stacks] = {}
        # Each input's rows' slots, by (rows, device): copied to a GPU once, not per layer call.
        self._row_slots: dict[tuple[int, torch.device], torch.Tensor] = {}

    @contextmanager
    def applied(self, layers: Iterable[LoraLayer]) -> Iterator[None]:
        handles = []
        for layer in layers:
            if _gatherable(layer):
                handles.append(layer.register_forward_pre_hook(self._base_rows, with_kwargs=True))
                handles.append(layer.register_forward_hook(self._add_gathered))
            else:
                handles.append(layer.register_forward_pre_hook(self._named_rows, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _repeats(self, rows: int) -> int:
        repeats, rest = divmod(rows, len(self.names))
        if rest or not repeats:
            raise RuntimeError(f"a LoRA layer got {rows} rows for {len(self.names)} prompts")
        return repeats

    # diffusers and transformers pass a layer's input positionally: args[0].
    def _named_rows(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        repeats = self._repeats(len(args[0]))
        return args, {**kwargs, "adapter_names": self.names * repeats}

    def _base_rows(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        return args, {**kwargs, "adapter_names": [BASE_ROW] * len(args[0])}

    def _add_gathered(self, layer: LoraLinear, args: tuple, output: torch.Tensor) -> torch.Tensor:
        stacks = None if layer.disable_adapters else self._stacks_of(layer)
        if stacks is None:  # LoRA switched off, or none of this call's adapters has this layer
            return output
        down, up, scale = stacks
        x = args[0]
        rows = len(x)
        slots = self._slots_for(rows, down.device)
        inputs = x.reshape(rows, -1, x.shape[-1]).to(down.dtype)
        hidden = torch.bmm(inputs, down[slots].transpose(1, 2))
        delta = torch.bmm(hidden, up[slots].transpose(1, 2)) * scale[slots].view(rows, 1, 1)
        return output + delta.reshape(output.shape).to(output.dtype)

    def _slots_for(self, rows: int, device: torch.device) -> torch.Tensor:
        key = (rows, device)
        if key not in self._row_slots:
            self._row_slots[key] = self._slots.repeat(self._repeats(rows)).to(device)
        return self._row_slots[key]

    def _stacks_of(self, layer: LoraLinear) -> _Stacks:
        key = id(layer)
        if key not in self._stacks:
            self._stacks[key] = _stack(layer, self._adapters)
        return self._stacks[key]


def _gatherable(layer: LoraLayer) -> bool:
    """Plain LoRA on a linear layer (no DoRA or other variant, no bias on B); its dropout is
    the identity in an inference pipeline (eval mode)."""
    return (
        isinstance(layer, LoraLinear)
        and not getattr(layer, "lora_variant", None)
        and not any(layer.use_dora.values())
        and not any(getattr(layer, "lora_bias", {}).values())
    )


def _stack(layer: LoraLinear, adapters: list[str]) -> _Stacks:
    """(A, B, scale) of `adapters` on `layer`, one slot per adapter and a last zero slot;
    an adapter without this layer gets zeros too. None when no adapter has the layer."""
    present = [name for name in adapters if name in layer.lora_A]
    if not present:
        return None
    reference: Any = layer.lora_A[present[0]].weight
    rank = max(layer.r[name] for name in present)
    slots = len(adapters) + 1
    down = reference.new_zeros(slots, rank, layer.in_features)
    up = reference.new_zeros(slots, layer.out_features, rank)
    scale = reference.new_zeros(slots)
    with torch.no_grad():
        for slot, name in enumerate(adapters):
            if name not in present:
                continue
            r = layer.r[name]
            down[slot, :r] = layer.lora_A[name].weight
            up[slot, :, :r] = layer.lora_B[name].weight
            scale[slot] = layer.scaling[name]
    return down, up, scale
