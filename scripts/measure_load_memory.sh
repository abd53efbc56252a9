#!/usr/bin/env bash
# Peak memory of `grove run` on one GroveMoE-Inst-sized layer (H=2048, E=128, I=768, G=64,
# Ia=128) stored in BF16, with the weights kept in BF16 (--dtype bf16) and in fp32 (--dtype f32):
#   scripts/measure_load_memory.sh [GROVE_TOOL]     (default: build/tools/grove)
# Writes a synthetic 1.3 GB checkpoint (every weight 2^-7, bf16-exact) to a temporary folder,
# removed at the end; needs python3 and /usr/bin/time. Prints each run's maximum resident set
# size and its ratio to the layer's BF16 bytes (docs/io.md, "BF16 weights").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tool="${1:-$root/build/tools/grove}"
[[ -x "$tool" ]] || { echo "measure_load_memory: no grove tool at $tool (build it first)" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'PY'
import json, struct, sys
work = sys.argv[1]
H, E, I, G, Ia = 2048, 128, 768, 64, 128
shapes = [("gate.weight", (E, H))]
for e in range(E):
    shapes += [(f"experts.{e}.gate_proj.weight", (I, H)), (f"experts.{e}.up_proj.weight", (I, H)),
               (f"experts.{e}.down_proj.weight", (H, I))]
for j in range(G):
    shapes += [(f"chunk_experts.{j}.gate_proj.weight", (Ia, H)), (f"chunk_experts.{j}.up_proj.weight", (Ia, H)),
               (f"chunk_experts.{j}.down_proj.weight", (H, Ia))]
header, offset = {}, 0
for name, (r, c) in shapes:
    header["model.layers.0.mlp." + name] = {"dtype": "BF16", "shape": [r, c], "data_offsets": [offset, offset + 2 * r * c]}
    offset += 2 * r * c
text = json.dumps(header).encode()
text += b" " * (-len(text) % 8)
with open(f"{work}/layer.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    value = struct.pack("<H", 0x3C00)  # bf16 2^-7
    for _, (r, c) in shapes:
        f.write(value * (r * c))
x = json.dumps({"x": {"dtype": "F32", "shape": [1, H], "data_offsets": [0, 4 * H]}}).encode()
x += b" " * (-len(x) % 8)
with open(f"{work}/x.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(x)) + x + struct.pack("<f", 1.0) * H)
print(f"bf16 bytes of the layer's tensors: {offset}")
PY

bf16_bytes=$(( (2048*128 + 3*128*2048*768 + 3*64*2048*128) * 2 ))
for dtype in bf16 f32; do
  /usr/bin/time -v "$tool" run --weights "$work/layer.safetensors" --prefix model.layers.0.mlp \
    --input "$work/x.safetensors" --output "$work/y-$dtype.safetensors" --dtype "$dtype" \
    >/dev/null 2>"$work/time-$dtype.txt"
  kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time-$dtype.txt")
  python3 -c "import sys; k=int(sys.argv[1]); b=int(sys.argv[2]); print(f'--dtype {sys.argv[3]}: peak RSS {k*1024:,} bytes = {k*1024/b:.3f} x the BF16 bytes ({b:,})')" \
    "$kib" "$bf16_bytes" "$dtype"
done
