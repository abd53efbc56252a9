"""The tests' own plain-autograd PyTorch implementation of the released GroveMoeSparseMoeBlock's
semantics (docs/math.md): a loop over the picked experts, each adjugate evaluated once per pick,
as the released code does. Independent of grove: only torch operations."""

import torch
import torch.nn.functional as F
from torch import nn


class PlainSwiGLU(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReleasedGroveBlock(nn.Module):
    """Same constructor fields and state_dict names as the released block."""

    def __init__(
        self,
        hidden_size,
        num_experts,
        num_experts_per_tok,
        num_experts_per_group,
        moe_intermediate_size,
        small_experts_intermediate_size,
        small_experts_weight,
        **_ignored,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = num_experts_per_tok
        self.group_size = num_experts_per_group
        self.scale = small_experts_weight
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(PlainSwiGLU(hidden_size, moe_intermediate_size) for _ in range(num_experts))
        self.chunk_experts = nn.ModuleList(
            PlainSwiGLU(hidden_size, small_experts_intermediate_size)
            for _ in range(num_experts // num_experts_per_group)
        )
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        router_logits = self.gate(x)
        # Selection on sigmoid(l) + b; the weights are the renormalised softmax of the picks.
        scores = torch.sigmoid(router_logits.detach()) + self.expert_bias
        selected = torch.topk(scores, self.top_k, dim=-1).indices
        probs = F.softmax(router_logits, dim=-1)
        picked = probs.gather(1, selected)
        weights = picked / picked.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, self.num_experts).permute(2, 1, 0)  # [E, k, T]
        for e in range(self.num_experts):
            slot, token = torch.where(mask[e])
            if token.numel() == 0:
                continue
            rows = x[token]
            w = weights[token, slot, None]
            contribution = self.experts[e](rows) * w
            contribution = contribution + self.scale * self.chunk_experts[e // self.group_size](rows) * w
            out = out.index_add(0, token, contribution)
        return out.reshape(shape), router_logits

    def picks(self, hidden_states):
        x = hidden_states.reshape(-1, self.hidden_size)
        scores = torch.sigmoid(self.gate(x)) + self.expert_bias
        return torch.topk(scores, self.top_k, dim=-1).indices


def released_load_balancing_loss(router_logits, num_experts, top_k):
    """The released load_balancing_loss_func (Switch style) for one layer's logits."""
    probs = F.softmax(router_logits, dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices
    expert_mask = F.one_hot(selected, num_experts).to(probs.dtype)  # [T, k, E]
    tokens_per_expert = expert_mask.mean(dim=0)  # [k, E]
    router_prob_per_expert = probs.mean(dim=0)  # [E]
    return (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * num_experts
