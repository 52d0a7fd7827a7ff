#!/usr/bin/env python3
"""Walks one integer Add of an integer model (format v4) on real numbers: python3 tools/explain_add.py MODEL [OP]

Reads the file's header only (docs/int-graph-format.md: the safetensors header, its __metadata__.graph and the
ops.<i>.scale tensor of the add), prints the Add's scales, zero points, clamp and fixed-point multipliers
(section 4, "From rescale scales to multipliers"), then adds two example codes the way the integer runtime does
(eq. 10 of docs/quantization.md: one rounding of an exact 64-bit sum) next to the same sum in real numbers.
OP is the add's name (default: the first add). The standard library only.
"""
import json
import math
import struct
import sys


def read_model(path):
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))  # 8-byte little-endian header length
        header = json.loads(f.read(header_len))  # JSON: name -> dtype, shape, data_offsets
        data = f.read()  # offsets are relative to this data area
    meta = header.pop("__metadata__")
    if meta.get("format") != "lowbit-int-graph" or meta.get("format_version") != "4":
        sys.exit(f"{path}: not an integer model of format version 4 (convert it with the current lowbit)")
    return json.loads(meta["graph"]), header, data


def f32_tensor(header, data, name):
    entry = header[name]
    begin, end = entry["data_offsets"]
    return list(struct.unpack(f"<{(end - begin) // 4}f", data[begin:end]))


def multiplier_and_shift(m_float):
    """m·2^−n = M exactly, m in [2^30, 2^31) (frexp, docs/int-graph-format.md section 4)."""
    f, e = math.frexp(m_float)
    return int(f * 2**31), 31 - e


def round_half_away(x_num, shift):
    """round_half_away(x / 2^shift) for an integer x, exactly (rounding_right_shift_half_away)."""
    half = 1 << (shift - 1)
    return (x_num + half) >> shift if x_num >= 0 else -((-x_num + half) >> shift)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python3 tools/explain_add.py MODEL.int8.safetensors [ADD_OP_NAME]")
    graph, header, data = read_model(sys.argv[1])
    ops = graph["ops"]
    index = {op["name"]: i for i, op in enumerate(ops)}
    wanted = sys.argv[2] if len(sys.argv) == 3 else None  # the op name or its first float node ("b2_add")
    adds = [i for i, op in enumerate(ops)
            if op["kind"] == "add" and wanted in (None, op["name"], op["name"].split(" + ")[0])]
    if not adds:
        sys.exit(f"{sys.argv[1]}: no add op{' named ' + sys.argv[2] if len(sys.argv) == 3 else ''}")
    i = adds[0]
    op = ops[i]
    inputs = [index[name] for name in op["inputs"]]
    s_in = [ops[k]["output_scale"] for k in inputs]  # report fields: what each input's codes mean
    z_in = op["input_zero_points"]
    s_out, z_out = op["output_scale"], op["zero_point"]
    lo, hi = op["act_min"], op["act_max"]
    M = f32_tensor(header, data, f"ops.{i}.scale")  # M[i] = s_i / s_out, as stored (float32)

    print(f"op {i} '{op['name']}' (add) reads op {inputs[0]} '{op['inputs'][0]}' and op {inputs[1]} '{op['inputs'][1]}'")
    for k in range(2):
        print(f"  input {k}: scale s_{k} = {s_in[k]:.6g}, zero point z_{k} = {z_in[k]}")
    relu = " (a fused ReLU: act_min = z_out)" if lo == z_out else ""
    print(f"  output:  scale s_out = {s_out:.6g}, zero point z_out = {z_out}, clamp [{lo}, {hi}]{relu}")
    big = 0 if M[0] >= M[1] else 1
    m_big, n = multiplier_and_shift(M[big])
    m = [0, 0]
    m[big] = m_big
    m[1 - big] = int(math.floor(abs(M[1 - big]) * 2.0**n + 0.5))  # round_half_away(M·2^n), exact in double
    for k in range(2):
        how = f"the larger: M_{k} = m_{k} x 2^-{n} exactly" if k == big else f"M_{k} x 2^{n} rounded"
        print(f"  M_{k} = s_{k} / s_out = {M[k]:.6g} -> m_{k} = {m[k]} ({how})")
    print(f"  shared shift n = {n}")

    # Two example codes: a few steps above each input's zero point, inside the int8 range.
    a = max(-128, min(127, z_in[0] + 40))
    b = max(-128, min(127, z_in[1] + 25))
    ra, rb = s_in[0] * (a - z_in[0]), s_in[1] * (b - z_in[1])
    print(f"one addition: codes a = {a} (input 0) and b = {b} (input 1)")
    print(f"  in real numbers: s_0 x (a - z_0) + s_1 x (b - z_1) = {ra:.6g} + {rb:.6g} = {ra + rb:.6g}")
    acc = m[0] * (a - z_in[0]) + m[1] * (b - z_in[1])
    print(f"  integer sum: m_0 x ({a - z_in[0]}) + m_1 x ({b - z_in[1]}) = {acc}")
    step = round_half_away(acc, n)
    q = max(lo, min(hi, z_out + step))
    print(f"  one rounding: round({acc} / 2^{n}) = {step}; q = clamp(z_out + {step}, {lo}, {hi}) = {q}")
    back = s_out * (q - z_out)
    print(f"  the output code means s_out x (q - z_out) = {back:.6g} (real sum {ra + rb:.6g}; "
          f"half a step is {s_out / 2:.6g})")


if __name__ == "__main__":
    main()
