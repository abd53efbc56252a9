#!/usr/bin/env python3
"""Turn one run of bench/bench_layer (Google Benchmark JSON) into the results section of
docs/performance.md: the machine, every measurement (minimum over repetitions) and the target
ratios of the fast CPU path, each marked met or missed and by how much.

Regenerate the page (runs the benchmark, ~15 minutes on 2 cores, ~7 GB of memory):

    python3 scripts/bench_table.py --bench build/bench/bench_layer --out docs/performance.md

or from a JSON file of an earlier run (`bench_layer --benchmark_format=json
--benchmark_repetitions=3 --benchmark_out=run.json`):

    python3 scripts/bench_table.py --json run.json --out docs/performance.md

Only the part of the page between the `<!-- bench:begin -->` and `<!-- bench:end -->` markers
is replaced; the rest of the page is prose kept by hand.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
TOKENS = [1, 16, 128, 512]
THREADS = [1, 2]


def lscpu_summary():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    flags = info.get("Flags", "").split()
    wanted = ["avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"]
    return {
        "model": info.get("Model name", "?"),
        "cpus": info.get("CPU(s)", "?"),
        "cores_per_socket": info.get("Core(s) per socket", "?"),
        "threads_per_core": info.get("Thread(s) per core", "?"),
        "l2": info.get("L2 cache", "?"),
        "l3": info.get("L3 cache", "?"),
        "hypervisor": info.get("Hypervisor vendor", ""),
        "flags": " ".join(f for f in wanted if f in flags),
    }


def run_benchmark(bench, repetitions, extra):
    fd, path = tempfile.mkstemp(suffix=".json", prefix="bench_layer_")
    os.close(fd)
    cmd = [bench, "--benchmark_format=console", f"--benchmark_out={path}", "--benchmark_out_format=json",
           f"--benchmark_repetitions={repetitions}", "--benchmark_min_time=0.5"] + extra
    print("running:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    with open(path) as f:
        data = json.load(f)
    os.unlink(path)
    data.setdefault("context", {})["grove_machine"] = lscpu_summary()
    data["context"]["grove_command"] = " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd)
                                               if not c.startswith("--benchmark_out"))
    return data


class Results:
    """Minimum real time over repetitions for each benchmark, and its per-iteration counters."""

    def __init__(self, data):
        self.best = {}
        self.samples = defaultdict(int)
        for b in data.get("benchmarks", []):
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            name = re.sub(r"/min_time:[0-9.]+", "", b["name"].replace("/real_time", ""))
            seconds = b["real_time"] * {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
            self.samples[name] += 1
            if name not in self.best or seconds < self.best[name]["seconds"]:
                self.best[name] = {"seconds": seconds, "flops": b.get("flops_per_iter", 0.0),
                                   "cpu_s": b.get("cpu_s_per_iter"),
                                   "threads": int(re.search(r"threads:(\d+)", name).group(1))
                                   if "threads:" in name else 1,
                                   "bytes": b.get("bytes_per_iter", 0.0), "label": b.get("label", ""),
                                   "workspace_mb": b.get("workspace_mb"), "gate_up_ms": b.get("gate_up_ms"),
                                   "down_ms": b.get("down_ms"), "dh_ms": b.get("dh_ms"),
                                   "gradients_ms": b.get("gradients_ms")}

    def get(self, name):
        return self.best.get(name)

    def seconds(self, name):
        r = self.get(name)
        return r["seconds"] if r else None

    def gflops(self, name):
        r = self.get(name)
        return r["flops"] / r["seconds"] * 1e-9 if r and r["flops"] else None

    def gbps(self, name):
        r = self.get(name)
        return r["bytes"] / r["seconds"] * 1e-9 if r and r["bytes"] else None

    def share(self, name):
        """CPU time over wall time × threads: the share of its cores the benchmark got."""
        r = self.get(name)
        return r["cpu_s"] / (r["seconds"] * r["threads"]) if r and r.get("cpu_s") else None

    def cpu_seconds(self, name):
        """Seconds per iteration had every thread run on its own core: CPU time / threads."""
        r = self.get(name)
        return r["cpu_s"] / r["threads"] if r and r.get("cpu_s") else None

    def gflops_cpu(self, name):
        r, t = self.get(name), self.cpu_seconds(name)
        return r["flops"] / t * 1e-9 if r and t and r["flops"] else None

    def gbps_cpu(self, name):
        r, t = self.get(name), self.cpu_seconds(name)
        return r["bytes"] / t * 1e-9 if r and t and r["bytes"] else None


def fmt_ms(s):
    return "–" if s is None else (f"{s * 1e3:.3g}" if s < 1 else f"{s * 1e3:,.0f}")


def fmt_pct(v):
    return "–" if v is None else f"{v:.0%}"


def fmt_num(v, digits=3):
    return "–" if v is None else f"{v:.{digits}g}"


def verdict(value, target, higher_is_better=True, unit="points"):
    if value is None or target is None:
        return "not measured"
    if higher_is_better:
        if value >= target:
            return f"**met** ({value / target - 1:+.0%})"
        return f"**missed** by {1 - value / target:.0%}"
    if unit == "points":
        if value <= target:
            return f"**met** ({target - value:.1f} points to spare)"
        return f"**missed** by {value - target:.1f} points"
    if value <= target:
        return f"**met** ({1 - value / target:.0%} to spare)"
    return f"**missed** by {value / target - 1:.0%}"


def render(data):
    r = Results(data)
    ctx = data.get("context", {})
    m = ctx.get("grove_machine") or lscpu_summary()
    lines = []
    out = lines.append
    out(BEGIN)
    out("")
    out("## Results")
    out("")
    out("_Generated by `scripts/bench_table.py` from one run of `bench_layer`; do not edit by hand._")
    out("")
    out(f"- Machine: {m.get('model', '?')}, {m.get('cpus', '?')} CPUs ({m.get('cores_per_socket', '?')} cores per "
        f"socket, {m.get('threads_per_core', '?')} thread(s) per core), L2 {m.get('l2', '?')}, L3 {m.get('l3', '?')}"
        + (f", virtualised ({m['hypervisor']})" if m.get("hypervisor") else "") + ".")
    out(f"- Instruction sets: {m.get('flags', '?')}; grove picked `{ctx.get('grove_isa', '?')}`. "
        f"Build: {ctx.get('grove_build', '?')}.")
    load = ctx.get("load_avg")
    out(f"- Run: {ctx.get('date', '?')}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in load) if load else '?'} (the machine is shared: each figure is the "
        f"minimum over {max(r.samples.values()) if r.samples else 0} repetitions).")
    if ctx.get("grove_command"):
        out(f"- Command: `{ctx['grove_command']}`.")
    out(f"- Shape: {ctx.get('grove_shape', 'GroveMoE-Inst')}. Random router weights route almost uniformly "
        "(at T = 128 nearly all 128 experts are active), the least favourable case for weight reuse.")
    out("")

    # ---- main table ----
    out("### Fused expert pass (`grove::cpu_runner`)")
    out("")
    out("Wall-clock time per batch (ms), tokens/s, GFLOP/s on activated FLOPs, GB/s of the weight bytes the "
        "batch activates (each read once); `core share`: process CPU time over wall time × threads (below 100% the "
        "benchmark waited for a core, the machine being shared); `per CPU-s`: the same rates per CPU-second of each "
        "thread, i.e. what the code does while it runs (an estimate for an idle machine that ignores waits at the "
        "two synchronisations); workspace (MB); gate/up and down phase times (ms, last iteration).")
    out("")
    out("| weights | T | threads | ms | tokens/s | GFLOP/s | weight GB/s | core share | GFLOP/s per CPU-s | GB/s per CPU-s "
        "| workspace MB | gate/up ms | down ms |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f in ["fp32", "bf16"]:
        for T in TOKENS:
            for n in THREADS:
                name = f"grove/{f}/T:{T}/threads:{n}"
                g = r.get(name)
                if not g:
                    continue
                out(f"| {f} | {T} | {n} | {fmt_ms(g['seconds'])} | {T / g['seconds']:,.0f} | {fmt_num(r.gflops(name))} | "
                    f"{fmt_num(r.gbps(name))} | {fmt_pct(r.share(name))} | {fmt_num(r.gflops_cpu(name))} | "
                    f"{fmt_num(r.gbps_cpu(name))} | {fmt_num(g['workspace_mb'])} | {fmt_num(g['gate_up_ms'])} | "
                    f"{fmt_num(g['down_ms'])} |")
    out("")

    # ---- backward ----
    out("### Fused backward (`cpu_runner::backward`)")
    out("")
    out("fp32 weights. `saved`: g and u kept by the training forward (`forward_saving`); `recompute`: backward "
        "recomputes them with the forward's gate/up tiles. GFLOP/s on the backward's FLOPs (twice the forward's: "
        "Dᵀdy, ∂D, ∂G and ∂U, dx); GB/s on the weights read once plus their gradients read and written once (3× the "
        "forward's bytes). `× forward`: this time over the fused forward's at the same T and threads. Phase times "
        "(ms, last iteration): recomputing g and u, the dh tiles, the dx and weight-gradient tiles. `plain`: "
        "`cpu::backward_experts_simple` (per-item Eigen products, one thread, from saved activations).")
    out("")
    out("| variant | T | threads | ms | × forward | tokens/s | GFLOP/s | GB/s | core share | recompute ms | dh ms "
        "| gradients ms | workspace MB |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, prefix in [("saved", "backward"), ("recompute", "backward_recompute")]:
        for T in TOKENS:
            for n in THREADS:
                name = f"{prefix}/fp32/T:{T}/threads:{n}"
                g = r.get(name)
                if not g:
                    continue
                fwd = r.seconds(f"grove/fp32/T:{T}/threads:{n}")
                over_forward = f"{g['seconds'] / fwd:.2f}×" if fwd else "–"
                out(f"| {variant} | {T} | {n} | {fmt_ms(g['seconds'])} | {over_forward} | "
                    f"{T / g['seconds']:,.0f} | {fmt_num(r.gflops(name))} | {fmt_num(r.gbps(name))} | "
                    f"{fmt_pct(r.share(name))} | {fmt_num(g['gate_up_ms'])} | {fmt_num(g['dh_ms'])} | "
                    f"{fmt_num(g['gradients_ms'])} | {fmt_num(g['workspace_mb'])} |")
    for T in TOKENS:
        name = f"simple_backward/T:{T}"
        g = r.get(name)
        if g:
            fused = r.seconds(f"backward/fp32/T:{T}/threads:1")
            speedup = f"fused (1 thread) speed-up: {g['seconds'] / fused:.2f}×" if fused else "–"
            out(f"| plain (Eigen), 1 thread | {T} | 1 | {fmt_ms(g['seconds'])} | – | {T / g['seconds']:,.0f} | "
                f"{fmt_num(r.gflops(name))} | {fmt_num(r.gbps(name))} | {fmt_pct(r.share(name))} | – | – | – | "
                f"{speedup} |")
    out("")

    # ---- baselines ----
    out("### Baselines (same run)")
    out("")
    out("| baseline | T | threads | ms | GFLOP/s | GB/s | core share | GFLOP/s per CPU-s | GB/s per CPU-s |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def row(label, name, T, n):
        out(f"| {label} | {T} | {n} | {fmt_ms(r.seconds(name))} | {fmt_num(r.gflops(name))} | {fmt_num(r.gbps(name))} | "
            f"{fmt_pct(r.share(name))} | {fmt_num(r.gflops_cpu(name))} | {fmt_num(r.gbps_cpu(name))} |")

    for n in THREADS:
        name = f"fma_peak/threads:{n}"
        if r.get(name):
            row("(c) register-only FMA loop", name, "–", n)
    for T in TOKENS:
        for n in THREADS:
            for label, name in [("(a) dense Eigen sgemm, same FLOPs", f"dense_sgemm/T:{T}/threads:{n}"),
                                ("(b) read sweep, fp32 bytes", f"read_sweep/fp32/T:{T}/threads:{n}"),
                                ("(b) read sweep, bf16 bytes", f"read_sweep/bf16/T:{T}/threads:{n}"),
                                ("(d) adjugates once per pick, fp32", f"per_pick/fp32/T:{T}/threads:{n}"),
                                ("(e) plain MoE (no adjugates), fp32", f"plain_moe/fp32/T:{T}/threads:{n}"),
                                ("(e) plain MoE (no adjugates), bf16", f"plain_moe/bf16/T:{T}/threads:{n}")]:
                if r.get(name):
                    row(label, name, T, n)
        for label, name in [("(f) naive per-token loop (Eigen GEMV)", f"naive/T:{T}"),
                            ("former kernel (`forward_experts_simple`)", f"simple/T:{T}"),
                            ("routing (`grove::route`)", f"route/T:{T}")]:
            if r.get(name):
                row(label, name, T, 1)
    out("")

    # ---- targets ----
    out("### Targets")
    out("")
    out("Each target is evaluated on wall-clock times as measured and, in the last two columns, on the "
        "per-CPU-second rates (both sides of every ratio normalised the same way), which is what an idle machine "
        "would show if the waiting for a core were the only difference.")
    out("")
    out("| target | case | wall-clock | verdict | per CPU-s | verdict |")
    out("|---|---|---:|---|---:|---|")

    def target(label, case, wall, cpu, goal, fmt, higher=True):
        unit = "points" if fmt is points else "ratio"
        out(f"| {label} | {case} | {fmt(wall)} | {verdict(wall, goal, higher, unit)} | {fmt(cpu)} | "
            f"{verdict(cpu, goal, higher, unit)} |")

    def pct(v):
        return "–" if v is None else f"{v:.0%}"

    def times(v):
        return "–" if v is None else f"{v:.2f}×"

    def points(v):
        return "–" if v is None else f"+{v:.1f}%"

    def ratio(a, b):
        return a / b if a is not None and b else None

    for n in THREADS:
        g, gc = f"grove/fp32/T:512/threads:{n}", f"grove/fp32/T:512/threads:{n}"
        peak, dense = f"fma_peak/threads:{n}", f"dense_sgemm/T:512/threads:{n}"
        if r.get(g) and r.get(peak):
            target("T = 512 forward ≥ 65% of (c)", f"fp32, {n} thread(s)", ratio(r.gflops(g), r.gflops(peak)),
                   ratio(r.gflops_cpu(gc), r.gflops_cpu(peak)), 0.65, pct)
        if r.get(g) and r.get(dense):
            target("T = 512 forward ≥ 90% of (a)", f"fp32, {n} thread(s)", ratio(r.gflops(g), r.gflops(dense)),
                   ratio(r.gflops_cpu(gc), r.gflops_cpu(dense)), 0.90, pct)
    for T in [1, 128]:
        for f in ["fp32", "bf16"]:
            for n in THREADS:
                g, sweep = f"grove/{f}/T:{T}/threads:{n}", f"read_sweep/{f}/T:{T}/threads:{n}"
                if r.get(g) and r.get(sweep):
                    target(f"T = {T} forward ≥ 80% of (b) GB/s", f"{f}, {n} thread(s)", ratio(r.gbps(g), r.gbps(sweep)),
                           ratio(r.gbps_cpu(g), r.gbps_cpu(sweep)), 0.80, pct)
    for n in THREADS:
        a, b = f"grove/fp32/T:1/threads:{n}", f"grove/bf16/T:1/threads:{n}"
        if r.get(a) and r.get(b):
            target("BF16 ≥ 1.7× fp32 at T = 1", f"{n} thread(s)", ratio(r.seconds(a), r.seconds(b)),
                   ratio(r.cpu_seconds(a), r.cpu_seconds(b)), 1.7, times)
    for f in ["fp32", "bf16"]:
        for T in TOKENS:
            for n in THREADS:
                gn, en = f"grove/{f}/T:{T}/threads:{n}", f"plain_moe/{f}/T:{T}/threads:{n}"
                g, e = r.get(gn), r.get(en)
                if not (g and e):
                    continue
                extra_flops = (g["flops"] / e["flops"] - 1) * 100
                extra_bytes = (g["bytes"] / e["bytes"] - 1) * 100
                allowed = max(extra_flops, extra_bytes) + 3
                over = (g["seconds"] / e["seconds"] - 1) * 100
                over_cpu = (r.cpu_seconds(gn) / r.cpu_seconds(en) - 1) * 100 if r.cpu_seconds(gn) and r.cpu_seconds(en) else None
                target(f"Grove over (e) ≤ max(extra FLOPs, extra bytes) + 3 points",
                       f"{f}, T = {T}, {n} thread(s); extra FLOPs +{extra_flops:.1f}%, bytes +{extra_bytes:.1f}% → "
                       f"≤ +{allowed:.1f}%", over, over_cpu, allowed, points, higher=False)
    for T in TOKENS:
        for n in THREADS:
            b, f = f"backward/fp32/T:{T}/threads:{n}", f"grove/fp32/T:{T}/threads:{n}"
            if r.get(b) and r.get(f):
                target("backward ≤ 2.5× forward (saved g, u)", f"fp32, T = {T}, {n} thread(s)",
                       ratio(r.seconds(b), r.seconds(f)), ratio(r.cpu_seconds(b), r.cpu_seconds(f)), 2.5, times,
                       higher=False)
    for T in TOKENS:
        naive = f"naive/T:{T}"
        for n in THREADS:
            g = f"grove/fp32/T:{T}/threads:{n}"
            if r.get(naive) and r.get(g):
                target("≥ 2.5× faster than (f) naive", f"fp32, T = {T}, {n} thread(s)", ratio(r.seconds(naive), r.seconds(g)),
                       ratio(r.cpu_seconds(naive), r.cpu_seconds(g)), 2.5, times)
    for T in TOKENS:
        simple = f"simple/T:{T}"
        g = f"grove/fp32/T:{T}/threads:1"
        if r.get(simple) and r.get(g):
            out(f"| (information) speed-up over the former kernel | fp32, T = {T}, 1 thread | "
                f"{times(ratio(r.seconds(simple), r.seconds(g)))} | – | "
                f"{times(ratio(r.cpu_seconds(simple), r.cpu_seconds(g)))} | – |")
    out("")
    out(END)
    return "\n".join(lines) + "\n"


def write_page(path, section, begin=BEGIN, end=END):
    """Replaces the part of the page between the markers `begin` and `end` (which `section` holds
    too) with `section`, or appends it when the page has no such part."""
    text = open(path).read() if os.path.exists(path) else "# CPU performance\n\n" + begin + "\n" + end + "\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + section.rstrip("\n") + post
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bench", help="path of the bench_layer executable to run")
    src.add_argument("--json", help="Google Benchmark JSON output of an earlier bench_layer run")
    p.add_argument("--out", default="docs/performance.md", help="page to update (default docs/performance.md)")
    p.add_argument("--repetitions", type=int, default=3, help="repetitions per benchmark (minimum is reported)")
    p.add_argument("--save-json", help="also keep the raw JSON of this run here")
    p.add_argument("bench_args", nargs="*", help="extra arguments for bench_layer (after --)")
    args = p.parse_args()
    if args.bench:
        data = run_benchmark(args.bench, args.repetitions, args.bench_args)
        if args.save_json:
            with open(args.save_json, "w") as f:
                json.dump(data, f, indent=1)
    else:
        with open(args.json) as f:
            data = json.load(f)
    write_page(args.out, render(data))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
