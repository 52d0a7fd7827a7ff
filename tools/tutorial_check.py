#!/usr/bin/env python3
"""Puts the outputs of tools/tutorial.sh into docs/tutorial.md, or checks the tutorial's numbers against them.

  tutorial_check.py write  TUTORIAL OUTPUTS   replace every <!-- out:NAME --> block by OUTPUTS/NAME.txt (full run)
  tutorial_check.py check  TUTORIAL OUTPUTS   fail if a deterministic number of a block differs from this run's
  tutorial_check.py update TUTORIAL OUTPUTS   write this run's deterministic numbers into the blocks

A reduced run (tools/tutorial.sh --reduced) trains on less data for fewer epochs, so its accuracies, losses,
ranges and timings differ from the tutorial's; everything else must not. Every number of an output line is
DETERMINISTIC unless one of the rules below calls it noise:

  NOISE (depends on training, the data subset, the epochs or the machine):
    a number with a decimal point (accuracies, losses, ranges, scales, SQNR, seconds, means, ...),
    a percentage, "N LSB", "N img/s", "epoch N/M", "N training images", "N test images", QEMU's "in Ns;",
    and the rows of arm-none-eabi-size's table (code size depends on the compiler and the trained zero points).
  DETERMINISTIC WITHIN A TOLERANCE:
    an integer model's size in bytes ("integer model, N bytes", "N bytes integer model") and the ratio after it
    ("(7.05x smaller)"): within 1%, because a layer's biases are stored as int16 when every one of them fits
    and as int32 otherwise, which depends on the trained values (a few bytes to a few hundred).
  Ratios such as "3.90x" of the bit-width sweep are deterministic (they follow from the parameter count).

The worked arithmetic of step 3 ("w -> q -> s*q (error)" and the quantile lines) depends on the trained weights,
so it is checked differently: in the tutorial and in this run alike, every such line must be what its formula
gives from the scale and zero point printed above it (q = round(w / s), half away from zero, clamped; s·q; the
error s·q − w), to the printed digits.

The walk through one integer Add (block "step8", tools/explain_add.py) prints the trained model's zero points,
multipliers and codes: integers, but they depend on training. Its numbers are not compared; instead, in the
tutorial and in this run alike, the addition must follow from the parameters printed above it (each m_i is M_i·2^n
to the printed digits; the integer sum, its one rounding and the clamp recomputed exactly).

Every block must also keep its structure: the same first words of its lines (digits masked), in the same order of
first appearance. Lines are matched in order by their first word; a line with no deterministic number is skipped.
"""
import math
import os
import re
import sys

BLOCK = re.compile(r"(<!-- out:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /out:(?P=name) -->)", re.S)
# A number: not part of a name (layers.3, fp32, w4a4, Conv2d, int8), possibly signed, possibly a ratio "x".
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?P<suffix>%|x(?![\w]))?")
NOISE_CONTEXT = [
    re.compile(r"\d+ LSB"),
    re.compile(r"\d+ img/s"),
    re.compile(r"epoch \d+/\d+"),
    re.compile(r"\d+ training images"),
    re.compile(r"\d+ test images"),
    re.compile(r"in \d+s;"),  # tools/cortex-m/run.sh's QEMU time
    # arm-none-eabi-size's table (text, data, bss, dec, hex, file): code size depends on the compiler and on the
    # trained zero points the generated code holds as immediates
    re.compile(r"^\s*\d+\s+\d+\s+\d+\s+\d+\s+[0-9a-f]+\s+\S+\s*$"),
]
SIZE_CONTEXT = [
    re.compile(r"integer model, \d+ bytes"),
    re.compile(r"\d+ bytes integer model \(\d+\.\d+x smaller\)"),
]
SIZE_RTOL = 0.01
# A worked line of step 3: "w -> q -> dequantized (error)", optionally after a quantile label.
WORKED = re.compile(
    r"^\s*(?:(?P<quantile>[\d.]+)%\s+)?(?P<x>-?\d+\.\d+)\s+->\s+(?P<q>-?\d+)\s+->\s+(?P<dq>-?\d+\.\d+)\s+\((?P<err>[-+]\d+\.\d+)\)\s*$"
)


def spans(patterns, line):
    return [m.span() for p in patterns for m in p.finditer(line)]


def inside(span, regions):
    return any(a <= span[0] and span[1] <= b for a, b in regions)


def classify(line):
    """The line's numbers as (start, end, text, kind), kind 'exact' or 'size' (1%); noise left out."""
    if WORKED.match(line):
        return []
    noise, sizes = spans(NOISE_CONTEXT, line), spans(SIZE_CONTEXT, line)
    numbers = []
    for m in NUMBER.finditer(line):
        text, suffix = m.group(0), m.group("suffix")
        if inside(m.span(), sizes):
            numbers.append((m.start(), m.end(), text, "size"))
        elif inside(m.span(), noise) or suffix == "%" or ("." in text and suffix != "x"):
            continue
        else:
            numbers.append((m.start(), m.end(), text, "exact"))
    return numbers


def key(line):
    words = line.split()
    return re.sub(r"[-+]?[0-9][0-9.eE+-]*%?", "#", words[0]) if words else ""


def shape(body):
    """The first word of every line, numbers masked as #, in order of first appearance: the block's structure."""
    seen = []
    for line in body.splitlines():
        if line.split() and not line.startswith("```") and key(line) not in seen:
            seen.append(key(line))
    return seen


def deterministic_lines(body):
    """[(index, line, numbers)] for the lines with at least one deterministic number."""
    out = []
    for i, line in enumerate(body.splitlines()):
        if line.startswith("```") or line.startswith("$ "):
            continue
        numbers = classify(line)
        if numbers:
            out.append((i, line, numbers))
    return out


def agree(a, b, kind):
    if kind == "exact":
        return a == b
    x, y = float(a.rstrip("x")), float(b.rstrip("x"))
    return abs(x - y) <= SIZE_RTOL * max(abs(x), abs(y))


def round_half_away(v):
    return math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)


def check_worked(name, body):
    """The step-3 arithmetic: each worked line follows from the scale (and zero point) printed before it."""
    problems, scale, zero_point, qmin, qmax, channel0 = [], None, 0, -7, 7, False
    worked, checked = 0, 0
    for line in body.splitlines():
        if re.match(r"\s+0\s+-?\d+\.\d+\s+-?\d+\.\d+\s+(\d+\.\d+)\s+0\s*$", line):  # channel 0's row: its scale
            scale, zero_point, channel0 = float(line.split()[3]), 0, True
        if m := re.search(r"codes \[(-?\d+), (-?\d+)\]", line):
            qmin, qmax = int(m.group(1)), int(m.group(2))
        if m := re.search(r"scale (\d+\.\d+), zero point (-?\d+)", line):
            scale, zero_point = float(m.group(1)), int(m.group(2))
        w = WORKED.match(line)
        worked += w is not None
        if not w or scale is None or not channel0:
            continue
        checked += 1
        x, q, dq, err = float(w.group("x")), int(w.group("q")), float(w.group("dq")), float(w.group("err"))
        digits = len(w.group("dq").split(".")[1])
        half_ulp = 0.5 * 10.0 ** -digits
        s_half_ulp = 0.5 * 10.0 ** -6  # scales are printed with 6 decimals
        # The printed value and scale are rounded: accept a code that some value and scale within their
        # rounding give.
        x_half_ulp = 0.5 * 10.0 ** -len(w.group("x").split(".")[1])
        codes = {
            max(qmin, min(qmax, round_half_away(xv / s) + zero_point))
            for s in (scale - s_half_ulp, scale, scale + s_half_ulp)
            for xv in (x - x_half_ulp, x, x + x_half_ulp)
        }
        if q not in codes:
            problems.append(f"  {name}: {line.strip()}: round({x} / {scale}) + {zero_point} is not {q}")
        elif abs(scale * (q - zero_point) - dq) > abs(q - zero_point) * s_half_ulp + 2 * half_ulp:
            problems.append(f"  {name}: {line.strip()}: {scale}·({q} − {zero_point}) is not {dq}")
        elif abs((dq - x) - err) > 3 * half_ulp:
            problems.append(f"  {name}: {line.strip()}: the error {dq} − {x} is not {err}")
    if checked < worked:
        problems.append(f"  {name}: {worked - checked} worked lines come before the scale they use (channel 0's row or "
                        "'scale S, zero point Z'): tools/tutorial_check.py cannot check them")
    return problems


FORMULA_BLOCKS = {"step8": "check_add"}  # blocks checked by recomputing their arithmetic, not number by number


def check_add(name, body):
    """The integer Add of tools/explain_add.py: its sum, rounding and clamp follow from the printed parameters."""
    def find(pattern):
        found = re.findall(pattern, body)
        return found
    try:
        z = [int(v) for v in find(r"zero point z_\d = (-?\d+)")]
        (z_out, lo, hi), = [tuple(map(int, t)) for t in find(r"z_out = (-?\d+), clamp \[(-?\d+), (-?\d+)\]")]
        M_m = [(float(a), int(b)) for a, b in find(r"= ([\d.e+-]+) -> m_\d = (\d+)")]
        (n,) = [int(v) for v in find(r"shared shift n = (\d+)")]
        ((a, b),) = [tuple(map(int, t)) for t in find(r"codes a = (-?\d+) \(input 0\) and b = (-?\d+)")]
        (acc,) = [int(v) for v in find(r"integer sum: .* = (-?\d+)\n")]
        ((acc2, n2, step, q),) = [tuple(map(int, t)) for t in find(r"round\((-?\d+) / 2\^(\d+)\) = (-?\d+); q = .* = (-?\d+)")]
    except ValueError:
        return [f"  {name}: not the lines tools/explain_add.py prints (its parameters or the addition are missing)"]
    problems = []
    if len(z) != 2 or len(M_m) != 2:
        return [f"  {name}: expected two inputs' zero points and multipliers"]
    for k, (M, m) in enumerate(M_m):
        if abs(m / 2.0**n - M) > 5e-6 * M + 2.0**-n:
            problems.append(f"  {name}: m_{k} = {m} is not M_{k} = {M} times 2^{n}")
    want = M_m[0][1] * (a - z[0]) + M_m[1][1] * (b - z[1])
    rounded = (abs(want) + (1 << (n - 1))) >> n
    rounded = rounded if want >= 0 else -rounded
    if acc != want or acc2 != want or n2 != n:
        problems.append(f"  {name}: the integer sum m_0·({a} − {z[0]}) + m_1·({b} − {z[1]}) is {want}, not {acc}")
    if step != rounded:
        problems.append(f"  {name}: round({want} / 2^{n}) is {rounded}, not {step}")
    if q != max(lo, min(hi, z_out + rounded)):
        problems.append(f"  {name}: clamp({z_out} + {rounded}, {lo}, {hi}) is not {q}")
    return problems


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("write", "check", "update"):
        sys.exit(__doc__)
    mode, tutorial, outputs = sys.argv[1:]
    text = open(tutorial).read()
    names = sorted(f[:-4] for f in os.listdir(outputs) if f.endswith(".txt"))
    found = {m.group("name") for m in BLOCK.finditer(text)}
    missing = [n for n in names if n not in found]
    if missing:
        sys.exit(f"tutorial.sh: {tutorial} has no <!-- out:NAME --> block for: {', '.join(missing)}")

    def output(name):
        return open(os.path.join(outputs, name + ".txt")).read().rstrip("\n")

    if mode == "write":
        text = BLOCK.sub(lambda m: m.group(1) + "```text\n" + output(m.group("name")) + "\n```\n" + m.group(4), text)
        open(tutorial, "w").write(text)
        print(f"tutorial.sh: wrote {len(names)} output blocks into {tutorial}")
        return

    problems, fixed, unfixable = [], 0, []

    def compare(m):
        nonlocal fixed
        name, body = m.group("name"), m.group("body")
        run = output(name)
        problems.extend(check_worked(name, run) + check_worked(name, body))
        if name in FORMULA_BLOCKS:
            problems.extend(check_add(name, run) + check_add(name, body))
        if shape(run) != shape(body):
            unfixable.append(name)
            problems.append(f"  {name}: the tutorial's lines start with {shape(body)}\n"
                            f"  {' ' * len(name)}  this run's lines with    {shape(run)}")
            return m.group(0)
        if name in FORMULA_BLOCKS:
            return m.group(0)
        want, got = deterministic_lines(body), deterministic_lines(run)
        want_keys, got_keys = [key(l) for _, l, _ in want], [key(l) for _, l, _ in got]
        if want_keys != got_keys or any(len(a[2]) != len(b[2]) for a, b in zip(want, got)):
            unfixable.append(name)
            problems.append(f"  {name}: the lines with deterministic numbers differ in shape; the tutorial's:\n"
                            + "\n".join(f"      {l}" for _, l, _ in want) + "\n    this run's:\n"
                            + "\n".join(f"      {l}" for _, l, _ in got))
            return m.group(0)
        lines = body.splitlines()
        for (i, line, numbers), (_, run_line, run_numbers) in zip(want, got):
            bad = [(a, b) for a, b in zip(numbers, run_numbers) if not agree(a[2], b[2], a[3])]
            if not bad:
                continue
            problems.append(f"  {name}:\n    tutorial: {line.strip()}\n    this run: {run_line.strip()}\n    differ: "
                            + ", ".join(f"{a[2]} -> {b[2]}" + (" (more than 1%)" if a[3] == "size" else "")
                                        for a, b in bad))
            new = line
            for a, b in sorted(bad, key=lambda ab: -ab[0][0]):  # right to left: the positions stay valid
                new = new[: a[0]] + b[2] + new[a[1]:]
            lines[i] = new
            fixed += 1
        return m.group(1) + "\n".join(lines) + "\n" + m.group(4)

    updated = BLOCK.sub(compare, text)
    if not problems:
        print(f"tutorial.sh: all {len(names)} steps ran; every deterministic number of docs/tutorial.md is this run's")
        return
    if mode == "update" and fixed:
        open(tutorial, "w").write(updated)
        print(f"tutorial.sh: rewrote the deterministic numbers of {fixed} lines of {tutorial}:")
        print("\n".join(problems))
        if unfixable:
            sys.exit(f"tutorial.sh: blocks {', '.join(unfixable)} changed shape: regenerate them with bash tools/tutorial.sh")
        return
    sys.exit("tutorial.sh: docs/tutorial.md no longer shows what the code prints:\n" + "\n".join(problems)
             + "\nRewrite the deterministic numbers with   bash tools/tutorial.sh --reduced --update"
             + "\nor regenerate every output (a few minutes)   bash tools/tutorial.sh")


if __name__ == "__main__":
    main()
