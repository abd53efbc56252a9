#!/usr/bin/env bash
# Peak memory of `grove run` on one GroveMoE-Inst-sized layer (H=2048, E=128, I=768, G=64,
# Ia=128) stored in BF16, with the weights kept in BF16 (--dtype bf16) and in fp32 (--dtype f32):
#   scripts/measure_load_memory.sh [GROVE_TOOL]     (default: build/tools/grove)
# Writes a synthetic 1.3 GB checkpoint (every weight 2^-7, bf16-exact) to a temporary folder,
# removed at the end; needs python3 and /usr/bin/time. Prints each run's maximum resident set
# size and its ratio to the layer's BF16 bytes (docs/io.md, "BF16 weights"). Then, when mpirun is
# there and grove was built with MPI, `mpirun -np P grove run --dtype bf16` for P = 2 and 4: each
# rank's peak against the BF16 bytes of its own shard (docs/distributed.md, "Memory").
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

# Expert parallelism: each rank reads and holds its own groups only.
if command -v mpirun >/dev/null 2>&1 && ldd "$tool" | grep -q libmpi; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  for ranks in 2 4; do
    TIMES="$work/time-ranks-$ranks" mpirun -x TIMES -np "$ranks" --oversubscribe --bind-to none sh -c '/usr/bin/time -v "$0" "$@" 2>"$TIMES-$OMPI_COMM_WORLD_RANK.txt"' \
      "$tool" run --weights "$work/layer.safetensors" --prefix model.layers.0.mlp --input "$work/x.safetensors" \
      --output "$work/y-ranks.safetensors" --dtype bf16 --threads 1 >/dev/null
    for ((rank = 0; rank < ranks; ++rank)); do
      kib=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time-ranks-$ranks-$rank.txt")
      python3 -c "
import sys
k, P, r = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
G, per_group = 64, (3*2*2048*768 + 3*2048*128) * 2
groups = G // P + (1 if r < G % P else 0)
shard = 2048*128*2 + groups * per_group
print(f'mpirun -np {P}, rank {r} ({groups} groups): peak RSS {k*1024:,} bytes = {k*1024/shard:.3f} x its shard\'s BF16 bytes ({shard:,})')
" "$kib" "$ranks" "$rank"
    done
  done
fi
