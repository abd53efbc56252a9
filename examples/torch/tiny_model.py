"""A tiny model of Grove layers in PyTorch, trained with grove_torch (docs/torch.md).

The task is the C++ experiment's (examples/experiment): every input belongs to one of 32
clusters, drawn with Zipf frequencies, and the target is that cluster's own linear map of the
input, so different inputs need different experts. The model is an input projection, two
pre-norm residual GroveMoE blocks, a final RMSNorm and a linear head, trained with AdamW, the
auxiliary-loss-free bias update and a small auxiliary loss. It prints progress and writes a
plot of the loss (SVG).

    PYTHONPATH=build/python /usr/bin/python3 examples/torch/tiny_model.py [--steps 300] [--out loss.svg]
"""

import argparse
import math
import time

import torch
from torch import nn

import grove_torch

GROVE = dict(hidden_size=64, num_experts=32, num_experts_per_tok=4, num_experts_per_group=4,
             moe_intermediate_size=32, small_experts_intermediate_size=16, small_experts_weight=0.2)


class Task:
    """Inputs near one of C cluster centres; the target is the cluster's linear map."""

    def __init__(self, seed, dim=16, clusters=32, families=8, zipf=1.0, noise=0.35):
        g = torch.Generator().manual_seed(seed)
        self.g, self.noise = g, noise
        self.centers = torch.randn(clusters, dim, generator=g)
        scale = 1.0 / math.sqrt(dim)
        family = scale * torch.randn(families, dim, dim, generator=g)
        self.maps = family[torch.arange(clusters) % families] + 0.7 * scale * torch.randn(clusters, dim, dim, generator=g)
        self.probs = torch.arange(1, clusters + 1, dtype=torch.float64) ** -zipf
        self.probs /= self.probs.sum()

    def sample(self, tokens):
        ids = torch.multinomial(self.probs, tokens, replacement=True, generator=self.g)
        u = self.centers[ids] + self.noise * torch.randn(tokens, self.centers.shape[1], generator=self.g)
        return u, torch.einsum("ti,toi->to", u, self.maps[ids])


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class TinyModel(nn.Module):
    def __init__(self, dim, layers=2):
        super().__init__()
        hidden = GROVE["hidden_size"]
        self.inp = nn.Linear(dim, hidden, bias=False)
        self.norms = nn.ModuleList(RMSNorm(hidden) for _ in range(layers))
        self.blocks = nn.ModuleList(grove_torch.GroveMoE(**GROVE) for _ in range(layers))
        for block in self.blocks:  # the paper's initialisation of the adjugates' down projections
            for adjugate in block.chunk_experts:
                nn.init.zeros_(adjugate.down_proj.weight)
        self.final = RMSNorm(hidden)
        self.head = nn.Linear(hidden, dim, bias=False)

    def forward(self, u):
        h = self.inp(u).unsqueeze(0)  # [batch 1, seq T, H], the released block's input shape
        logits = []
        for norm, block in zip(self.norms, self.blocks):
            y, router_logits = block(norm(h))
            h = h + y
            logits.append(router_logits)
        return self.head(self.final(h)).squeeze(0), torch.cat(logits)


def write_svg(path, losses, title):
    w, h, pad = 640, 360, 50
    logs = [math.log10(v) for v in losses]
    lo, hi = min(logs), max(logs)
    hi = hi if hi > lo else lo + 1
    pts = " ".join(
        f"{pad + (w - 2 * pad) * i / max(1, len(logs) - 1):.1f},{h - pad - (h - 2 * pad) * (v - lo) / (hi - lo):.1f}"
        for i, v in enumerate(logs))
    ticks = "".join(
        f'<text x="{pad - 6}" y="{h - pad - (h - 2 * pad) * (e - lo) / (hi - lo) + 4:.1f}" text-anchor="end" '
        f'font-size="11">1e{e}</text>' for e in range(math.ceil(lo), math.floor(hi) + 1))
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">'
                f'<rect width="{w}" height="{h}" fill="white"/>'
                f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="14">{title}</text>'
                f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>'
                f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>{ticks}'
                f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle" font-size="12">step (0 to {len(losses) - 1})</text>'
                f'<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{pts}"/></svg>\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="tiny_model_loss.svg")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    task = Task(args.seed)
    model = TinyModel(task.centers.shape[1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        u, target = task.sample(args.tokens)
        out, router_logits = model(u)
        loss = nn.functional.mse_loss(out, target)
        aux = model.blocks[0].load_balancing_loss(router_logits)
        optimizer.zero_grad(set_to_none=True)
        (loss + 0.001 * aux).backward()
        optimizer.step()
        for block in model.blocks:
            block.update_bias(rate=0.005)
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  aux {aux.item():.3f}  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    write_svg(args.out, losses, f"grove_torch tiny model: training loss ({args.steps} steps of {args.tokens} tokens)")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote '{args.out}'")


if __name__ == "__main__":
    main()
