"""LoRA dropout that keeps no copy of its input for the backward pass.

PEFT computes a LoRA path as ``lora_B(lora_A(dropout(x)))``: every adapted
linear layer makes its own dropped copy of its input and ``lora_A`` keeps that
copy (and dropout its mask) until the backward pass. In a Llama decoder layer
``q_proj``, ``k_proj`` and ``v_proj`` read the same input, as do ``gate_proj``
and ``up_proj``, and Mllama's cross-attention ``k_proj`` / ``v_proj`` read the
projected image states (2 x 4 x 1601 positions at 4 tiles, batch 2), which
stay alive anyway: the copies are the largest part of a recomputed layer's
memory under activation checkpointing.

Here dropout and ``lora_A`` are one autograd function that keeps the input
itself (shared by the layers that read it) and a random seed; the backward pass
draws the same mask again from that seed. The result is the same dropout, with
the same distribution; only its random numbers come from another stream.
Under activation checkpointing the recomputed forward draws the same seed (the
checkpoint restores the CPU random state, which the seed comes from), so the
mask of the backward pass is the mask of the forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DroppedInputLinear", "fuse_lora_dropout"]


def _keep(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The dropout mask of ``seed``: 1 where an element is kept (probability ``1 - p``), as uint8."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device).bernoulli_(1 - p, generator=gen)


def _dropped(x: torch.Tensor, keep: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with the mask ``keep`` applied, the kept elements scaled by ``1 / (1 - p)``."""
    return (x.to(dtype) * keep).mul_(1 / (1 - p))


class _DroppedInputMatmul(torch.autograd.Function):
    """``dropout(x, p) @ weight.T`` computed in ``dtype``, keeping ``x`` (not its dropped copy) and the seed."""

    @staticmethod
    def forward(ctx, x, weight, p: float, seed: int, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            out = _dropped(x, _keep(x, p, seed), p, dtype) @ weight.to(dtype).t()
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed, ctx.dtype = p, seed, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        p, seed, dtype = ctx.p, ctx.seed, ctx.dtype
        grad_x = grad_w = None
        with torch.autocast(x.device.type, enabled=False):
            g = grad_out.to(dtype)
            keep = _keep(x, p, seed)  # drawn once for both gradients
            if ctx.needs_input_grad[1]:
                flat = _dropped(x, keep, p, dtype).reshape(-1, x.shape[-1])
                grad_w = (g.reshape(-1, g.shape[-1]).t() @ flat).to(weight.dtype)
                del flat
            if ctx.needs_input_grad[0]:
                grad_x = (g @ weight.to(dtype)).mul_(keep).mul_(1 / (1 - p)).to(x.dtype)
        return grad_x, grad_w, None, None, None


class DroppedInputLinear(nn.Linear):
    """A LoRA ``lora_A`` (a bias-free ``nn.Linear``) that applies the layer's dropout itself, in training.

    Its weight, state-dict key and evaluation output are those of the ``nn.Linear`` it replaces. The input is
    computed in the autocast dtype when autocast is on (what ``nn.Linear`` does under it), else in the
    weight's dtype; the result has that dtype.
    """

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x.to(self.weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x)
        dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                 else self.weight.dtype)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # the CPU generator: a checkpoint restores it
        return _DroppedInputMatmul.apply(x, self.weight, self.p, seed, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def fuse_lora_dropout(model) -> int:
    """Move the dropout of every vanilla LoRA path of ``model`` into its ``lora_A``
    (:class:`DroppedInputLinear`); returns how many paths changed. Paths without dropout, LoRA variants (DoRA
    and others) and any ``lora_A`` that is not a bias-free ``nn.Linear`` keep PEFT's own forward."""
    from peft.tuners.lora import LoraLayer

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        here = 0
        for name, dropout in list(module.lora_dropout.items()):
            lora_a = module.lora_A[name] if name in module.lora_A else None
            if (not isinstance(dropout, nn.Dropout) or dropout.p == 0 or name in variants
                    or type(lora_a) is not nn.Linear or lora_a.bias is not None):
                continue
            lora_a.__class__ = DroppedInputLinear
            lora_a.p = float(dropout.p)
            module.lora_dropout[name] = nn.Identity()
            here += 1
        if here and here == len(module.lora_A):
            # the input reaches lora_A as it is (DroppedInputLinear casts it without keeping the cast): PEFT's
            # cast would make one more copy per layer, kept for the backward pass
            module.cast_input_dtype_enabled = False
        fused += here
    return fused
