"""GroveMoE: a drop-in for the released GroveMoeSparseMoeBlock, run by grove."""

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ._ops import ops
from .functional import grove_layer, load_balancing_loss


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), with the released names gate_proj, up_proj, down_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, **factory: Any):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _positive_int(fields: Mapping[str, Any], name: str) -> int:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"grove_torch: {name} must be a positive integer, got {value!r}")
    return value


class GroveMoE(nn.Module):
    """A Grove MoE layer (docs/math.md) with the released block's interface.

    Keyword arguments are the released config.json's fields; other fields are ignored, so
    ``GroveMoE(**config)`` works on a whole config. The state_dict uses the released names
    relative to the block: ``gate.weight``, ``experts.{e}.{gate,up,down}_proj.weight``,
    ``chunk_experts.{j}.{gate,up,down}_proj.weight`` and the buffer ``expert_bias``.

    ``forward(hidden_states [batch, seq, H])`` returns ``(y [batch, seq, H], router_logits
    [batch*seq, E])`` like the released block, computed by grove's fused pass with each adjugate
    once per token. float32 and float64 parameters train; bfloat16 parameters run forward only
    (in fp32 activations, y returned in the input's dtype).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        num_experts_per_group: int,
        moe_intermediate_size: int,
        small_experts_intermediate_size: int,
        small_experts_weight: float,
        *,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        **_ignored: Any,
    ):
        super().__init__()
        fields: Dict[str, Any] = dict(
            hidden_size=hidden_size,
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            num_experts_per_group=num_experts_per_group,
            moe_intermediate_size=moe_intermediate_size,
            small_experts_intermediate_size=small_experts_intermediate_size,
        )
        for name in fields:
            _positive_int(fields, name)
        if num_experts % num_experts_per_group:
            raise ValueError(
                f"grove_torch: num_experts_per_group = {num_experts_per_group} must divide "
                f"num_experts = {num_experts} (groups of consecutive experts)"
            )
        if num_experts_per_tok > num_experts:
            raise ValueError(
                f"grove_torch: num_experts_per_tok k = {num_experts_per_tok} exceeds num_experts E = {num_experts}"
            )
        scale = float(small_experts_weight)
        if not (scale == scale and abs(scale) != float("inf")):
            raise ValueError(f"grove_torch: small_experts_weight must be finite, got {small_experts_weight!r}")
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.num_groups = num_experts // num_experts_per_group
        self.scale = scale
        factory = {"device": device, "dtype": dtype}
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.experts = nn.ModuleList(SwiGLU(hidden_size, moe_intermediate_size, **factory) for _ in range(num_experts))
        self.chunk_experts = nn.ModuleList(
            SwiGLU(hidden_size, small_experts_intermediate_size, **factory) for _ in range(self.num_groups)
        )
        self.register_buffer("expert_bias", torch.zeros(num_experts, **factory))
        # Picks per expert since the last update_bias (training forwards only); not saved.
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.long, device=device), persistent=False)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> "GroveMoE":
        """From a config dict, or an object with the fields as attributes (a transformers config)."""
        fields = dict(config) if isinstance(config, Mapping) else dict(vars(config))
        if isinstance(fields.get("text_config"), Mapping):
            fields = dict(fields["text_config"])
        return cls(**fields, **kwargs)

    def _tensors(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        def projections(mlps: nn.ModuleList) -> List[torch.Tensor]:
            return [p.weight for m in mlps for p in (m.gate_proj, m.up_proj, m.down_proj)]

        return projections(self.experts), projections(self.chunk_experts)

    def forward(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"grove_torch: hidden_states has shape {tuple(hidden_states.shape)}; its last dimension "
                f"must be hidden_size = {self.hidden_size}"
            )
        weight_dtype = self.gate.weight.dtype
        x = hidden_states.reshape(-1, self.hidden_size)
        if weight_dtype == torch.bfloat16:
            x = x.to(torch.float32)  # BF16 weights run on fp32 activations
        elif x.dtype != weight_dtype:
            raise TypeError(
                f"grove_torch: hidden_states is {x.dtype} but the layer's weights are {weight_dtype}; "
                "convert one of them (module.to(dtype) or hidden_states.to(dtype))"
            )
        experts, adjugates = self._tensors()
        y, logits, ids, _ = grove_layer(
            x.contiguous(), self.gate.weight, self.expert_bias, experts, adjugates, self.top_k, self.scale
        )
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(ids.reshape(-1), minlength=self.num_experts)
        return y.to(hidden_states.dtype).reshape(hidden_states.shape), logits

    def route(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The picks and their weights, (topk_ids [T, k] int64, topk_weights [T, k]), no gradient."""
        with torch.no_grad():
            x = hidden_states.reshape(-1, self.hidden_size)
            if self.gate.weight.dtype == torch.bfloat16:
                x = x.to(torch.float32)
            experts, adjugates = self._tensors()
            _, _, ids, weights = grove_layer(
                x.contiguous(), self.gate.weight, self.expert_bias, experts, adjugates, self.top_k, self.scale
            )
        return ids, weights

    def load_balancing_loss(self, router_logits: torch.Tensor) -> torch.Tensor:
        """The released Switch-style auxiliary loss of this layer's router_logits (k = top_k)."""
        return load_balancing_loss(router_logits, self.top_k)

    @torch.no_grad()
    def update_bias(self, rate: float = 0.001, rule: str = "normalized") -> bool:
        """The auxiliary-loss-free bias update from the picks of the training forwards since the
        last call (b <- b - rate (F - Q)/||F - Q||, or rate·sign(F - Q) with rule="sign"), then
        resets the counts. Returns False, changing nothing, when the load was perfectly even or
        there were no picks."""
        bias = self.expert_bias.detach().to(torch.float32).contiguous()
        changed = bool(ops.update_selection_bias(bias, self.expert_load, float(rate), rule))
        self.expert_bias.copy_(bias)
        self.expert_load.zero_()
        return changed

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"groups={self.num_groups}, small_experts_weight={self.scale}"
        )
