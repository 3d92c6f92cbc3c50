"""Plain copies of sharded models: what `unwrap()` returns for ZeRO and FSDP2.

ZeRO-3 and FSDP2 leave no rank with a whole model, and ZeRO-2 keeps the exact (fp32) weights
only as shards of the optimizer's master copy. Samples and the export need a plain module with
full weights: `FullWeights` keeps a *skeleton* of the model, a deep copy taken before sharding
whose trainable parameters live on the meta device (no memory), and fills it on rank 0 with
consolidated weights whenever `unwrap()` is asked for.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


class FullWeights:
    """Rank 0's full-weight copy of a model that training shards.

    Create it from the model *before* it is sharded. Frozen parameters and buffers are copied
    then (frozen ones never change; buffers are refreshed from the live model on each `load`);
    trainable ones are placeholders until `load` assigns the consolidated tensors.
    """

    def __init__(self, model: nn.Module):
        placeholders = {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=True)
            for p in model.parameters()
            if p.requires_grad
        }
        # deepcopy consults the memo before copying, so trainable tensors are never duplicated.
        self.skeleton = copy.deepcopy(model, memo=placeholders)
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]

    def load(self, trainable: Mapping[str, torch.Tensor] | None, live: nn.Module) -> nn.Module:
        """Assign full trainable weights (rank 0) and the live buffers; return the module.

        Ranks that pass None (all but 0) get the skeleton back: the structure and configs, with
        trainable parameters on the meta device.
        """
        if trainable is None:
            return self.skeleton
        missing = set(self.trainable) - set(trainable)
        unexpected = set(trainable) - set(self.trainable)
        if missing or unexpected:
            raise KeyError(f"consolidated weights: missing {missing}, unexpected {unexpected}")
        # assign=True replaces the meta placeholders instead of copying into them.
        self.skeleton.load_state_dict(dict(trainable), strict=False, assign=True)
        for name, buffer in live.named_buffers():
            self.skeleton.get_buffer(name).copy_(buffer)
        return self.skeleton
