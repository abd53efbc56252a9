"""The layer as a function with autograd, on grove's operators (torch.ops.grove)."""

from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from ._ops import ops


class _GroveLayer(torch.autograd.Function):
    """y, router_logits, topk_ids, topk_weights = layer(x); backward through grove's fused pass.

    The forward keeps grove's routing plan (and, when a gradient is wanted, the SwiGLU
    pre-activations) in a context object, so the backward neither re-routes nor recomputes.
    """

    @staticmethod
    def forward(ctx, x, router, bias, top_k, scale, expert_count, *weights):
        # The operator keeps the pre-activations only for weights with a backward (not bf16).
        keep = any(ctx.needs_input_grad)
        experts, adjugates = list(weights[:expert_count]), list(weights[expert_count:])
        y, logits, ids, topk_weights, context = ops.forward(
            x, router, bias, experts, adjugates, top_k, scale, keep
        )
        ctx.context = context
        ctx.expert_count = expert_count
        ctx.weight_dtype = router.dtype
        ctx.save_for_backward(x, router, *weights)
        ctx.mark_non_differentiable(ids)
        ctx.set_materialize_grads(False)
        return y, logits, ids, topk_weights

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, d_logits, _d_ids, d_topk_weights):
        if ctx.weight_dtype == torch.bfloat16:
            raise RuntimeError(
                "grove_torch: no backward for bfloat16 weights: grove trains float32 (or float64) "
                "parameters. Keep fp32 masters, or run the bf16 layer under torch.no_grad() or "
                "with its parameters' requires_grad_(False)."
            )
        x, router, *weights = ctx.saved_tensors
        n = ctx.expert_count
        if dy is None:
            dy = torch.zeros_like(x)
        dx, d_router, d_experts, d_adjugates = ops.backward(
            ctx.context,
            x,
            router,
            list(weights[:n]),
            list(weights[n:]),
            dy.contiguous(),
            None if d_logits is None else d_logits.contiguous(),
            None if d_topk_weights is None else d_topk_weights.contiguous(),
        )
        return (dx, d_router, None, None, None, None, *d_experts, *d_adjugates)


def grove_layer(
    x: torch.Tensor,
    router: torch.Tensor,
    bias: Optional[torch.Tensor],
    experts: List[torch.Tensor],
    adjugates: List[torch.Tensor],
    top_k: int,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Grove layer on x [T, H] (docs/math.md).

    router [E, H]; bias [E] or None (the selection bias, no gradient); experts: for each routed
    expert e its gate [I, H], up [I, H] and down [H, I] in that order (3E tensors); adjugates:
    likewise for each group j with Ia (3G tensors). All CPU, contiguous, of one dtype: float32
    or float64 (which train) or bfloat16 (forward only, with x in float32).
    Returns y [T, H], router_logits [T, E], topk_ids [T, k] (int64) and topk_weights [T, k].
    """
    return _GroveLayer.apply(x, router, bias, int(top_k), float(scale), len(experts), *experts, *adjugates)


class _LoadBalancingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k):
        loss, d_logits = ops.load_balancing_loss(logits, top_k)
        ctx.save_for_backward(d_logits)
        return logits.new_tensor(loss)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_loss):
        (d_logits,) = ctx.saved_tensors
        return d_logits * d_loss, None


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The released load_balancing_loss_func's Switch-style L_aux = E·Σ_e f_e·P_e over router
    logits [N, E] (several layers' logits concatenated, as the released code does), with its
    gradient through P only (docs/math.md, "Load balancing")."""
    if router_logits.dtype not in (torch.float32, torch.float64):
        router_logits = router_logits.float()
    return _LoadBalancingLoss.apply(router_logits.contiguous(), int(top_k))
