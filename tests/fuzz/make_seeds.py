#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus (tests/fuzz/corpus/<harness>/): a few small valid inputs of
each kind, from which libFuzzer mutates. Run from anywhere: python3 tests/fuzz/make_seeds.py.
The files are committed; rerun only to change them."""
import json
import pathlib
import struct

here = pathlib.Path(__file__).resolve().parent
H, E, G, I, IA = 4, 4, 2, 3, 2  # the layer every seed holds: prefix "m"


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes). The format: u64 header length, JSON, data."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def bf16(values):
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:] for v in values)


def matrix(rows, cols, seed):
    return [((i * 7 + seed * 13) % 29 - 14) / 16.0 for i in range(rows * cols)]


def layer(adjugates=True, encode=f32, dtype="F32", bias=True):
    out, seed = [], 0

    def add(name, rows, cols):
        nonlocal seed
        out.append(("m." + name, dtype, [rows, cols], encode(matrix(rows, cols, seed))))
        seed += 1

    add("gate.weight", E, H)
    for e in range(E):
        add("experts.%d.gate_proj.weight" % e, I, H)
        add("experts.%d.up_proj.weight" % e, I, H)
        add("experts.%d.down_proj.weight" % e, H, I)
    for j in range(G if adjugates else 0):
        add("chunk_experts.%d.gate_proj.weight" % j, IA, H)
        add("chunk_experts.%d.up_proj.weight" % j, IA, H)
        add("chunk_experts.%d.down_proj.weight" % j, H, IA)
    if bias:
        out.append(("m.expert_bias", dtype, [E], encode([0.5, -0.25, 0.0, 1.0])))
    return out


def write(harness, name, content):
    folder = here / "corpus" / harness
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


write("safetensors", "mixed.safetensors", safetensors(
    [("a", "F32", [2, 3], f32([1, 2, 3, 4, 5, 6])), ("b", "BF16", [3], bf16([1, 2, -3])),
     ("c", "I32", [1], struct.pack("<i", 7)), ("d", "F16", [0], b""), ("e", "I64", [1], struct.pack("<q", -1))],
    {"format": "pt"}))
write("safetensors", "empty.safetensors", safetensors([]))
write("layer", "grove-f32.safetensors", safetensors(layer()))
write("layer", "grove-bf16.safetensors", safetensors(layer(encode=bf16, dtype="BF16", bias=False)))
write("layer", "plain-f32.safetensors", safetensors(layer(adjugates=False)))

names = [t[0] for t in layer()]
early = [n for n in names if n == "m.gate.weight" or n.startswith("m.experts.0.")]
index = {"metadata": {"total_size": 1234},
         "weight_map": {n: ("model-1.safetensors" if n in early else "model-2.safetensors") for n in names}}
write("index", "model.safetensors.index.json", json.dumps(index, indent=2))
write("index", "missing-shard.json", json.dumps({"weight_map": {"m.gate.weight": "model-3.safetensors"}}))

write("config", "grovemoe.json", json.dumps({
    "architectures": ["GroveMoeForCausalLM"], "hidden_size": 2048, "num_experts": 128, "num_experts_per_tok": 8,
    "num_experts_per_group": 2, "moe_intermediate_size": 768, "small_experts_intermediate_size": 128,
    "small_experts_weight": 0.05, "rope_theta": 1e6}, indent=2))
write("config", "nested.json", json.dumps({"model_type": "x", "text_config": {"num_experts_per_tok": 4,
                                                                            "small_experts_weight": 0.25}}))
