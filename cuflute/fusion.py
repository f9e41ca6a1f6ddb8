"""Fusing a gated MLP's gate and up projections into one linear layer over the same input.

At decode sizes each projection is a pass over its weight, and a short one pays the launch and
the ramp of a whole kernel: one layer twice as tall does the two in one pass (on the H100 at
M = 1, Llama-3-8B's two 14336 x 4096 4-bit projections take 18.8 us each, the fused
28672 x 4096 one 31.3 us; tuning/configs). ``fuse_gated_mlps`` replaces every module with
``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` (the MLP of Llama, Mistral and Qwen2 in
transformers) by a ``GatedMLP`` over nn.Linear or QuantizedLinear layers alike. It is a runtime
transform: checkpoints keep the unfused layout, so fuse after loading.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from .packing import TILE_N, PackedWeight
from .torch import QuantizedLinear


class GatedMLP(nn.Module):
    """``down_proj(act_fn(gate) * up)`` with ``[gate | up] = gate_up_proj(x)``."""

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn, intermediate_size: int):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn
        self.intermediate_size = intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def stack_rows(layers: list[nn.Module]) -> nn.Module:
    """One layer whose outputs are the given layers' outputs side by side (their weights'
    rows stacked), of the same kind: nn.Linear, or QuantizedLinear with one format."""
    first = layers[0]
    if any(type(layer) is not type(first) for layer in layers) or \
            any(layer.in_features != first.in_features for layer in layers):
        raise ValueError("layers to stack must be of one kind with one in_features")
    present = [layer.bias for layer in layers if layer.bias is not None]
    bias = torch.cat([present[0].new_zeros(layer.out_features) if layer.bias is None
                      else layer.bias.detach() for layer in layers]) if present else None
    if isinstance(first, nn.Linear):
        weight = torch.cat([layer.weight.detach() for layer in layers])
        # Built on the meta device and given the stacked tensors: no second copy, no init.
        stacked = nn.Linear(first.in_features, weight.shape[0], bias=bias is not None, device="meta")
        stacked.weight = nn.Parameter(weight, requires_grad=first.weight.requires_grad)
        if bias is not None:
            stacked.bias = nn.Parameter(bias, requires_grad=first.weight.requires_grad)
        return stacked
    if not isinstance(first, QuantizedLinear):
        raise TypeError(f"can stack nn.Linear or QuantizedLinear layers, not {type(first).__name__}")
    return QuantizedLinear.from_packed(_stack_packed([layer.packed() for layer in layers]), bias)


def _stack_packed(parts: list[PackedWeight]) -> PackedWeight:
    """Packed weights of one format stacked along N: whole 16-row tiles, so every part but the
    last must have a multiple of 16 rows (the last one's padding stays the padding)."""
    first = parts[0]
    for p in parts:
        same = (p.bits, p.group_size, p.dtype, p.device) == \
            (first.bits, first.group_size, first.dtype, first.device)
        if not same or not np.array_equal(np.asarray(p.table), np.asarray(first.table)):
            raise ValueError("quantized layers to stack must share bits, group size, table, dtype "
                             "and device")
    if any(p.n % TILE_N for p in parts[:-1]):
        raise ValueError(f"every stacked layer but the last needs a multiple of {TILE_N} output "
                         f"features, got {[p.n for p in parts]}")
    if first.device is None:
        xp, on_device = np, contextlib.nullcontext()
    else:
        import cupy as xp

        on_device = xp.cuda.Device(first.device)
    with on_device:
        return PackedWeight(n=sum(p.n for p in parts), k=first.k, bits=first.bits,
                            group_size=first.group_size, dtype=first.dtype, table=first.table,
                            device=first.device,
                            qweight=xp.concatenate([p.qweight for p in parts]),
                            scales=xp.concatenate([p.scales for p in parts]),
                            pair_lut=first.pair_lut.copy())


def fuse_gated_mlps(model: nn.Module) -> list[str]:
    """Replace every gated MLP of ``model`` (a module with ``gate_proj``, ``up_proj``,
    ``down_proj`` and ``act_fn``) in place by a ``GatedMLP`` with one ``gate_up_proj``; returns
    the names of the modules replaced."""
    names = [name for name, m in model.named_modules()
             if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    for name in names:
        mlp = model.get_submodule(name)
        gate_up = stack_rows([mlp.gate_proj, mlp.up_proj])
        model.set_submodule(name, GatedMLP(gate_up, mlp.down_proj, mlp.act_fn, mlp.gate_proj.out_features))
    return names
