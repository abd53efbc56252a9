"""grove_torch against a PyTorch loop written like the released block, in one process.

    PYTHONPATH=build/python /usr/bin/python3 adapters/torch/bench/bench_torch.py [--tokens 1 128 512]
        [--threads 1 2] [--repetitions 5] [--shape inst|tiny] [--json OUT.json]

At GroveMoE-Inst's shape (H 2048, E 128, k 8, I 768, G 64, Ia 128, fp32) it times forward and
forward + backward of both, at each thread count (torch.set_num_threads), and prints a markdown
table of medians with the loop / grove ratio (docs/torch.md). The loop is the tests' reference
(tests/released_block.py): a Python loop over the picked experts, each adjugate once per pick.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import grove_torch  # noqa: E402
from released_block import ReleasedGroveBlock  # noqa: E402

SHAPES = {
    "inst": dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, num_experts_per_group=2,
                 moe_intermediate_size=768, small_experts_intermediate_size=128, small_experts_weight=0.05),
    "tiny": dict(hidden_size=64, num_experts=16, num_experts_per_tok=4, num_experts_per_group=2,
                 moe_intermediate_size=32, small_experts_intermediate_size=16, small_experts_weight=0.05),
}


def median_seconds(fn, repetitions):
    fn()  # warm-up: first-touch of the workspace, allocator
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="inst")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    config = SHAPES[args.shape]
    torch.manual_seed(0)
    loop = ReleasedGroveBlock(**config)
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_(0.0, 0.02)
    grove = grove_torch.GroveMoE(**config)
    grove.load_state_dict(loop.state_dict())
    grove.eval()

    def forward(model, x):
        with torch.no_grad():
            model(x)

    def forward_backward(model, x):
        model.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_(True)
        y, _ = model(xi)
        y.backward(torch.ones_like(y))

    results = []
    print(f"shape {args.shape}: {config}; torch {torch.__version__}; median of {args.repetitions}", flush=True)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for tokens in args.tokens:
            x = torch.randn(1, tokens, config["hidden_size"])
            for mode, fn in (("forward", forward), ("forward+backward", forward_backward)):
                t_loop = median_seconds(lambda: fn(loop, x), args.repetitions)
                t_grove = median_seconds(lambda: fn(grove, x), args.repetitions)
                row = dict(threads=threads, tokens=tokens, mode=mode, loop_ms=1e3 * t_loop, grove_ms=1e3 * t_grove,
                           speedup=t_loop / t_grove)
                results.append(row)
                print(f"  threads {threads}  T {tokens:4d}  {mode:17s} loop {row['loop_ms']:9.2f} ms  "
                      f"grove {row['grove_ms']:9.2f} ms  x{row['speedup']:.2f}", flush=True)

    print("\n| threads | T | pass | PyTorch loop (ms) | grove_torch (ms) | loop / grove |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['threads']} | {r['tokens']} | {r['mode']} | {r['loop_ms']:.2f} | {r['grove_ms']:.2f} | "
              f"{r['speedup']:.2f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(config=config, torch=torch.__version__, results=results),
                                                      indent=1))


if __name__ == "__main__":
    main()
