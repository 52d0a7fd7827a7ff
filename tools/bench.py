#!/usr/bin/env python3
"""lowbit vs PyTorch, in one run on one machine: training and inference speed, as ratios.

For each model (by default the three chains mlp, lenet5, convbn; the graph models resnet8 and dsconv
on request, --models resnet8,dsconv) this measures, with lowbit's own programs:
  * float training images/s: one full epoch of `train --epochs 1 --log L` (the log's images_per_second);
  * inference: `eval --json --batch-size 1` (latency_us_median) and `--batch-size 256`
    (images_per_second) of the fp32 model and of the integer models int8 (w8a8), w4a8 and w4a4,
    made with `train --qat --bits B --dry-run` (a few batches: accuracy is irrelevant for speed);
and runs the PyTorch peer (tools/peer.py, next to this script) with the same models and threads, or
reuses its JSON (--peer-json). ONNX Runtime is the second peer: the same fp32 and integer models,
exported with `export --format onnx`, timed by tools/ort/time_ort.js (npm onnxruntime-node in
tools/ort/node_modules; --skip-ort without it). It prints a table (ours, PyTorch's best, ratio, ONNX
Runtime, ratio; ratio > 1 means lowbit is faster) and writes the same as JSON (--out). Each of
lowbit's figures records the kernels that produced it (`ours_kernels` in the JSON, a line under the
table): the OpenBLAS core for float training and fp32 inference (as train reports it), eval's
`kernel_path` (ref, avx2, avxvnni, vnni or amx) for the integer models. --kernels PATH passes
`--kernels PATH` to every eval run, to time one integer path. See docs/benchmarks.md.

The GEMM section (before the models; --gemm runs only it, --skip-gemm leaves it out) compares the exact int8 GEMM
alone: lowbit's (build/bin/bench_qgemm --json: each kernel path, checked against the reference) and ONNX Runtime's
MatMulInteger (tools/ort/time_gemm.js: checked against a reference, timed in its kernel by ORT's profiler and
through session.run) at 1024³ and the models' Linear shapes at batch 256, in alternating rounds (lowbit, ORT, lowbit,
ORT, ...; --gemm-rounds), medians over rounds; with the per-core peaks bench_qgemm measures.

The whole run holds /tmp/bench.lock (flock), like `flock /tmp/bench.lock peer.py`, so it does not
overlap other timing jobs that honour the lock. Python 3 standard library only.

    /usr/bin/python3 tools/bench.py                          # the three chains (~25-35 min with the peer)
    /usr/bin/python3 tools/bench.py --models resnet8,dsconv  # the graph models (~50-60 min at 1 thread, estimated; --quick ~12 min)
    /usr/bin/python3 tools/bench.py --models mlp --quick     # smoke test, a few minutes
    /usr/bin/python3 tools/bench.py --peer-json peer.json    # reuse a peer run
    /usr/bin/python3 tools/bench.py --kernels avx2 --skip-peer  # lowbit's integer figures on the AVX2 kernels
    /usr/bin/python3 tools/bench.py --gemm --threads 1       # the int8 GEMM against ONNX Runtime's only (~1-2 min)
"""
import argparse
import datetime
import fcntl
import glob
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("mlp", "lenet5", "convbn")  # the default set
GRAPH_MODELS = ("resnet8", "dsconv")  # on request: each adds ~25 min at 1 thread (a slow float epoch on both sides)
NO_TRAIN_QUICK = ("convbn",) + GRAPH_MODELS  # --quick skips their full float training epoch (minutes each)
BITS = (("w8a8", "int8"), ("w4a8", "w4a8"), ("w4a4", "w4a4"))  # --bits, integer mode written by train
LOCK = "/tmp/bench.lock"
T0 = time.perf_counter()

# Table columns: key, header, unit, higher_is_better.
COLUMNS = (
    ("train", "train img/s", "img/s", True),
    ("fp32_b1", "fp32 b1 µs", "us", False),
    ("fp32_b256", "fp32 b256 img/s", "img/s", True),
    ("int8_b1", "int8 b1 µs", "us", False),
    ("int8_b256", "int8 b256 img/s", "img/s", True),
    ("w4a8_b1", "w4a8 b1 µs", "us", False),
    ("w4a8_b256", "w4a8 b256 img/s", "img/s", True),
    ("w4a4_b1", "w4a4 b1 µs", "us", False),
    ("w4a4_b256", "w4a4 b256 img/s", "img/s", True),
)


def log(msg):
    print(f"[bench {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# CPU used by other processes while we time something (same definition as the peer's foreign_cpu:
# the fraction of all CPUs busy with anything but this process and its children).
# ------------------------------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_snapshot():
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except OSError:
        return None
    ru_c, ru_s = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
    own = (ru_c.ru_utime + ru_c.ru_stime + ru_s.ru_utime + ru_s.ru_stime) * CLK_TCK
    return sum(v) - v[3] - v[4], sum(v), own


def foreign_cpu(a, b):
    if a is None or b is None or b[1] - a[1] <= 0:
        return None
    return round(max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / (b[1] - a[1])), 3)


def run(cmd, capture=True, stderr=False):
    """Runs cmd, returns (stdout, foreign_cpu), and its stderr too with stderr=True. Fails loudly with the program's
    stderr."""
    log("$ " + " ".join(cmd))
    for attempt in range(6):  # a binary being relinked by a concurrent build is briefly not executable
        try:
            a = cpu_snapshot()
            p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
            b = cpu_snapshot()
            break
        except OSError as e:
            if attempt == 5:
                raise SystemExit(f"bench: cannot run {cmd[0]}: {e}")
            log(f"cannot run {cmd[0]} ({e.strerror}); retrying in 10 s")
            time.sleep(10)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"bench: command failed (exit {p.returncode}): {' '.join(cmd)}")
    out = (p.stdout if capture else "", foreign_cpu(a, b))
    return out + (p.stderr,) if stderr else out


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------------
# ours
# ------------------------------------------------------------------------------------------------
def blas_core(stderr):
    """The OpenBLAS core in train's stderr, e.g. "OpenBLAS core Cooperlake (OpenBLAS chose Prescott for this CPU)".
    eval does not report it; every lowbit program sets OpenBLAS up the same way before main, so eval's is the same."""
    m = re.search(r"OpenBLAS core [^\n]*", stderr)
    return m.group(0) if m else "OpenBLAS (core not reported)"


def ours_train(args, model, work):
    """images/s of one full float training epoch (the `--log` line of phase fp32)."""
    log_path = os.path.join(work, f"{model}.train.jsonl")
    if os.path.exists(log_path):
        os.remove(log_path)
    cmd = [os.path.join(args.bin, "train"), "--model", model, "--epochs", "1", "--threads", str(args.threads),
           "--log", log_path, "--out", os.path.join(work, f"{model}.float.safetensors")] + args.data_flag
    _, foreign, err = run(cmd, stderr=True)
    with open(log_path) as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    rates = [x["images_per_second"] for x in lines if x.get("phase", "fp32") == "fp32"]
    if not rates:
        raise SystemExit(f"bench: {log_path} has no fp32 epoch line")
    return {"images_per_second": rates[-1], "seconds": lines[-1].get("seconds"), "foreign_cpu": foreign,
            "blas": blas_core(err)}


def ours_make_models(args, model, work):
    """Dry-run QAT for every bit width; returns {mode: file} with the fp32 sibling under 'fp32', and train's OpenBLAS
    core (blas_core)."""
    files = {}
    for bits, mode in BITS:
        out = os.path.join(work, f"{model}.{bits}.safetensors")
        _, _, err = run([os.path.join(args.bin, "train"), "--model", model, "--qat", "--bits", bits, "--epochs", "1",
                         "--qat-epochs", "1", "--dry-run", "--threads", str(args.threads), "--out", out]
                        + args.data_flag, stderr=True)
        stem = out[: -len(".safetensors")]
        found = [f for f in glob.glob(stem + ".*.safetensors") if not f.endswith(".fp32.safetensors")]
        expected = f"{stem}.{mode}.safetensors"
        if expected not in found:
            if len(found) != 1:
                raise SystemExit(f"bench: cannot find the integer model train wrote for {out}: {found}")
            log(f"note: {bits} wrote {found[0]} (expected mode '{mode}')")
            expected = found[0]
        files[mode] = expected
        if "fp32" not in files and os.path.exists(stem + ".fp32.safetensors"):
            files["fp32"] = stem + ".fp32.safetensors"
    if "fp32" not in files:
        raise SystemExit(f"bench: train --qat wrote no .fp32.safetensors sibling in {work}")
    return files, blas_core(err)


def ours_eval(args, path, batch):
    """Median over --repeats eval runs of images_per_second and latency_us_median, and the integer kernel path."""
    runs = []
    kernels = ["--kernels", args.kernels] if args.kernels else []
    for _ in range(args.repeats):
        out, foreign = run([os.path.join(args.bin, "eval"), "--json", "--threads", str(args.threads),
                            "--batch-size", str(batch), "--model", path] + kernels + args.data_flag)
        text = out.strip()
        j = json.loads(text[text.index("{"):])
        runs.append({"images_per_second": j.get("images_per_second"), "latency_us_median": j.get("latency_us_median"),
                     "mode": j.get("mode"), "accuracy": j.get("accuracy"), "kernel_path": j.get("kernel_path"),
                     "foreign_cpu": foreign})
    return {"batch": batch, "mode": runs[0]["mode"], "kernel_path": runs[0]["kernel_path"],
            "images_per_second": median(r["images_per_second"] for r in runs),
            "latency_us_median": median(r["latency_us_median"] for r in runs),
            "runs": runs}


def ours_model(args, model, work):
    R = {}
    if args.quick and model in NO_TRAIN_QUICK:
        log(f"{model}: --quick skips the full float training epoch")
        R["train"] = None
    else:
        R["train"] = ours_train(args, model, work)
    files, R["blas"] = ours_make_models(args, model, work)
    R["files"] = {k: os.path.basename(v) for k, v in files.items()}
    R["inference"] = {}
    for mode in ("fp32",) + tuple(m for _, m in BITS):
        R["inference"][mode] = {"b1": ours_eval(args, files[mode], 1), "b256": ours_eval(args, files[mode], 256)}
    return R


def ours_figures(R):
    """lowbit's figure per column, and the kernels that produced it: the OpenBLAS core for float training and fp32
    inference, eval's kernel_path for the integer models."""
    f = {"train": R["train"]["images_per_second"] if R.get("train") else None}
    src = {"train": R["train"].get("blas") if R.get("train") else None}
    for mode, res in R["inference"].items():
        f[f"{mode}_b1"] = res["b1"]["latency_us_median"]
        f[f"{mode}_b256"] = res["b256"]["images_per_second"]
        for b in ("b1", "b256"):
            src[f"{mode}_{b}"] = R.get("blas") if mode == "fp32" else res[b].get("kernel_path")
    return f, src


# ------------------------------------------------------------------------------------------------
# the peer
# ------------------------------------------------------------------------------------------------
def run_peer(args, models, path):
    cmd = [args.python, args.peer, "--models", *models, "--epochs", "1", "--qat-epochs", "0",
           "--threads", str(args.threads), "--bench-threads", str(args.threads), "--out", path]
    if args.quick:
        cmd += ["--b1-calls", "2000", "--b256-reps", "2", "--bench-tries", "1", "--epoch-tries", "1",
                "--max-wait-total", "30"]
        untrained = [m for m in models if m in NO_TRAIN_QUICK]
        if untrained:
            cmd += ["--no-train", *untrained]  # as ours: no float epoch for these in --quick
    log("$ " + " ".join(cmd) + "   (stderr follows)")
    a = cpu_snapshot()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    b = cpu_snapshot()
    if p.returncode != 0 or not os.path.exists(path):
        raise SystemExit(f"bench: the peer failed (exit {p.returncode}); rerun with --skip-peer or --peer-json")
    with open(path) as fh:
        return json.load(fh), foreign_cpu(a, b)


def peer_figures(P, threads):
    """PyTorch's best figure per column (best over engines and eager/TorchScript), with where it came from.

    PyTorch has no 4-bit kernels: its W4A8 model runs on the int8 kernels (4-bit codes stored in int8)
    at int8 speed, and it has no W4A4 at all, so the w4a8/w4a4 columns compare against its int8 figure."""
    f, src = {}, {}
    if not P or "error" in P:
        return f, src
    eps = [e["images_per_s"] for e in (P.get("fp32") or {}).get("epochs", []) if "images_per_s" in e]
    f["train"] = statistics.mean(eps) if eps else None
    src["train"] = f"fp32 training, mean of {len(eps)} epoch(s)" if eps else None
    key = f"threads{threads}"
    inf = P.get("inference", {})
    for kind, names in (("fp32", ["fp32"]), ("int8", [k for k in inf if k.startswith("int8_")])):
        best_b1 = best_b256 = None
        for name in names:
            t = (inf.get(name) or {}).get(key)
            if not isinstance(t, dict):
                continue
            for variant in ("b1", "b1_torchscript"):
                v = (t.get(variant) or {}).get("median_us")
                if v is not None and (best_b1 is None or v < best_b1[0]):
                    best_b1 = (v, f"{name} {'TorchScript' if 'torchscript' in variant else 'eager'}")
            v = (t.get("b256") or {}).get("images_per_s")
            if v is not None and (best_b256 is None or v > best_b256[0]):
                best_b256 = (v, name)
        for col, best in ((f"{kind}_b1", best_b1), (f"{kind}_b256", best_b256)):
            f[col], src[col] = (best[0], best[1]) if best else (None, None)
    for mode in ("w4a8", "w4a4"):
        for b in ("b1", "b256"):
            f[f"{mode}_{b}"] = f.get(f"int8_{b}")
            src[f"{mode}_{b}"] = f"int8 kernels ({src.get(f'int8_{b}')})" if src.get(f"int8_{b}") else None
    return f, src


# ------------------------------------------------------------------------------------------------
# the ONNX Runtime peer
# ------------------------------------------------------------------------------------------------
def ort_model(args, model, files, work):
    """ONNX Runtime on our own models, exported to ONNX: {mode: {b1_median_us, b256_images_per_s, ...}}."""
    onnx = {}
    for mode, path in files.items():
        onnx[mode] = os.path.join(work, f"{model}.{mode}.onnx")
        run([os.path.join(args.bin, "export"), "--format", "onnx", "--model", path, "--out", onnx[mode]])
    cmd = [args.node, os.path.join(args.ort_dir, "time_ort.js"), "--threads", str(args.threads)]
    if args.quick:
        cmd += ["--b1-calls", "1000", "--b256-reps", "5"]
    modes = list(onnx)
    results = {}
    for _ in range(args.repeats):
        out, foreign = run(cmd + [onnx[m] for m in modes])
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        # The first line is an identity model: the cost of one call through the Node.js binding, no kernel.
        for mode, line in zip(["call_overhead"] + modes, lines):
            line["foreign_cpu"] = foreign
            results.setdefault(mode, []).append(line)
    return {mode: {"b1_median_us": median(r["b1_median_us"] for r in runs),
                   "b256_images_per_s": median(r["b256_images_per_s"] for r in runs),
                   "onnxruntime": runs[0].get("onnxruntime"), "runs": runs}
            for mode, runs in results.items()}


def ort_figures(O):
    f = {"train": None}  # inference only
    for mode, res in (O or {}).items():
        if mode == "call_overhead":
            continue
        f[f"{mode}_b1"] = res["b1_median_us"]
        f[f"{mode}_b256"] = res["b256_images_per_s"]
    return f


# ------------------------------------------------------------------------------------------------
# the int8 GEMM alone: lowbit's (bench_qgemm --json) and ONNX Runtime's MatMulInteger (time_gemm.js)
# ------------------------------------------------------------------------------------------------
PEAK_OF_PATH = {"amx": "tdpbusd", "vnni": "vpdpbusd zmm", "avxvnni": "vpdpbusd ymm (AVX-VNNI)"}  # avx2: not measured


def gemm_rounds(args):
    """Alternating runs of bench_qgemm --json and time_gemm.js on its shapes (M = N rows, K = IN, N = OUT); ORT's
    result is checked against its reference in the first round only (the data are the same every round)."""
    rounds = []
    for r in range(args.gemm_rounds):
        out, foreign = run([os.path.join(args.bin, "bench_qgemm"), "--json", "--seconds", str(args.gemm_seconds),
                            str(args.threads)])
        ours = json.loads(out)
        ours["foreign_cpu"] = foreign
        ort = None
        shapes = list(dict.fromkeys(f"{g['n']}x{g['in']}x{g['out']}" for g in ours["gemms"]))
        if shapes and not args.skip_ort:
            cmd = [args.node, os.path.join(args.ort_dir, "time_gemm.js"), "--threads", str(args.threads),
                   "--seconds", str(args.gemm_seconds)] + ([] if r == 0 else ["--no-check"]) + shapes
            out, foreign = run(cmd)
            ort = {"shapes": [json.loads(line) for line in out.splitlines() if line.strip()], "foreign_cpu": foreign}
        rounds.append({"lowbit": ours, "onnxruntime": ort})
    return rounds


def gemm_summary(rounds):
    """Per shape: lowbit's GOP/s per path and ORT's (kernel, session.run) as median and range over rounds; the peaks
    likewise."""
    spread = lambda xs: {"median": round(median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}
    first = rounds[0]["lowbit"]
    shapes = []
    for g in first["gemms"]:
        if shapes and shapes[-1]["shape"] == g["shape"]:
            continue
        shapes.append({"shape": g["shape"], "m": g["n"], "k": g["in"], "n": g["out"], "lowbit": {}})
    for s in shapes:
        for path in dict.fromkeys(g["path"] for g in first["gemms"]):
            xs = [g["gops"] for r in rounds for g in r["lowbit"]["gemms"] if g["shape"] == s["shape"] and g["path"] == path]
            s["lowbit"][path] = spread(xs)
        ort = [x for r in rounds if r["onnxruntime"] for x in r["onnxruntime"]["shapes"]
               if (x["m"], x["k"], x["n"]) == (s["m"], s["k"], s["n"])]
        if ort:
            s["onnxruntime"] = {key: spread([x[f"gops_{key}"] for x in ort]) for key in ("kernel", "run", "wall")}
            # time_gemm.js stops on any difference, so a checked shape is exact; None: not checked
            s["onnxruntime"]["exact"] = True if any(x.get("exact") for x in ort) else None
            s["onnxruntime"]["binding_ms"] = round(median(x["binding_median_s"] for x in ort) * 1e3, 3)
    peaks = {p["instruction"]: {"instructions_per_second": spread([q["instructions_per_second"] / 1e6 for r in rounds
                                                                   for q in r["lowbit"]["peaks"]
                                                                   if q["instruction"] == p["instruction"]]),
                                "macs": p["macs"],
                                "gops": spread([q["gops"] for r in rounds for q in r["lowbit"]["peaks"]
                                                if q["instruction"] == p["instruction"]])}
             for p in first["peaks"]}
    ort_version = next((x.get("onnxruntime") for r in rounds if r["onnxruntime"] for x in r["onnxruntime"]["shapes"]),
                       None)
    return {"auto_path": first["auto_path"], "threads": first["threads"], "rounds": len(rounds), "shapes": shapes,
            "peaks": peaks, "onnxruntime": ort_version}


def gemm_text(S):
    """The GEMM tables, the peaks and how they were measured, as Markdown."""
    if not S["shapes"]:
        return "bench_qgemm has no fast kernel path on this CPU (it needs AVX2): no GEMM figures."
    auto, paths = S["auto_path"], list(S["shapes"][0]["lowbit"])
    machine_peak = max(S["peaks"].items(), key=lambda kv: kv[1]["gops"]["median"]) if S["peaks"] else None
    g = lambda x: f"{x['median']:,.0f} ({x['min']:,.0f}–{x['max']:,.0f})" if S["rounds"] > 1 else f"{x['median']:,.0f}"
    pct = lambda v, peak: f"{100 * v / peak:.0f}%" if peak else "—"
    times = lambda a, b: f"{a / b:.2f}×" if a and b else "—"
    lines = [f"| shape (M×K×N) | lowbit `{auto}` GOP/s | ONNX Runtime kernel GOP/s | ratio | ONNX Runtime session.run "
             f"GOP/s | ratio | of the peak: lowbit / ORT |", "|---|---:|---:|---:|---:|---:|---:|"]
    peak = machine_peak[1]["gops"]["median"] if machine_peak else None
    for s in S["shapes"]:
        ours, o = s["lowbit"][auto], s.get("onnxruntime")
        lines.append(f"| {s['shape']}, {s['m']}×{s['k']}×{s['n']} | {g(ours)} | {g(o['kernel']) if o else '—'} | "
                     f"{times(ours['median'], o['kernel']['median']) if o else '—'} | {g(o['wall']) if o else '—'} | "
                     f"{times(ours['median'], o['wall']['median']) if o else '—'} | "
                     f"{pct(ours['median'], peak)} / {pct(o['kernel']['median'], peak) if o else '—'} |")
    lines += ["", "| shape | " + " | ".join(f"lowbit `{p}` GOP/s (of its peak)" for p in paths) + " |",
              "|---|" + "---:|" * len(paths)]
    for s in S["shapes"]:
        cells = []
        for p in paths:
            peak_p = S["peaks"].get(PEAK_OF_PATH.get(p), {}).get("gops", {}).get("median")
            cells.append(f"{g(s['lowbit'][p])}" + (f" ({pct(s['lowbit'][p]['median'], peak_p)})" if peak_p else ""))
        lines.append(f"| {s['shape']} | " + " | ".join(cells) + " |")
    lines.append("")
    spread_note = f"medians over {S['rounds']} alternating rounds (range in parentheses)" if S["rounds"] > 1 else \
        "one round"
    lines.append(f"GOP/s = 2·M·K·N / median time of calls adding up to at least the set seconds per shape and round, "
                 f"{spread_note}; {S['threads']} thread(s). lowbit: `qgemm_packed` on int8 codes with weights packed "
                 f"beforehand, each path checked bit for bit against `qgemm_s8_ref`. ONNX Runtime "
                 f"{S['onnxruntime'] or ''}: one MatMulInteger node (uint8 A with a zero point, int8 B as an "
                 f"initializer, int32 out), checked bit for bit against a plain-loop reference on full-range codes; "
                 f"\"kernel\" is the node's time in ORT's profiler, \"session.run\" the wall time of the call from "
                 f"Node.js, which adds the binding: allocating and copying out the int32 result (median "
                 f"{', '.join(str(s['onnxruntime']['binding_ms']) for s in S['shapes'] if s.get('onnxruntime'))} ms "
                 f"per call at these shapes). Ratio > 1: lowbit is faster.")
    exact = [s["onnxruntime"]["exact"] for s in S["shapes"] if s.get("onnxruntime")]
    if exact:
        lines.append("")
        lines.append("ONNX Runtime's results were bit-exact at every shape (checked in the first round)." if all(exact)
                     else "ONNX Runtime's results were NOT checked at every shape.")
    if S["peaks"]:
        lines.append("")
        lines.append("Peaks of one core, measured by `bench_qgemm` (a loop of one instruction on registers only, "
                     "enough independent accumulators to hide its latency, best of 20 runs; 2 ops per multiply-add): "
                     + "; ".join(f"`{name}` {p['instructions_per_second']['median']:,.1f} M instructions/s × "
                                 f"{p['macs']} multiply-adds × 2 = {g(p['gops'])} GOP/s"
                                 for name, p in S["peaks"].items())
                     + f". \"Of the peak\" in the first table is of `{machine_peak[0]}`'s, the machine's highest.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def ratio(ours, peer, higher_is_better):
    if not ours or not peer:
        return None
    return round(ours / peer if higher_is_better else peer / ours, 3)


def fmt(v, unit):
    if v is None:
        return "—"
    return f"{v:.1f}" if unit == "us" else f"{v:,.0f}"


def table(rows):
    lines = ["| model | figure | lowbit | PyTorch best | ratio | ONNX Runtime | ratio |",
             "|---|---|---:|---:|---:|---:|---:|"]
    times = lambda r: "—" if r is None else f"{r:.2f}×"
    for model, cols in rows.items():
        for key, header, unit, _ in COLUMNS:
            c = cols[key]
            lines.append(f"| {model} | {header} | {fmt(c['ours'], unit)} | {fmt(c['peer'], unit)} | {times(c['ratio'])} "
                         f"| {fmt(c['ort'], unit)} | {times(c['ort_ratio'])} |")
    return "\n".join(lines)


def kernels_note(rows):
    """Under the table: the kernels of lowbit's figures, one line per distinct set (usually one for all models)."""
    notes = {}
    for model, cols in rows.items():
        paths = lambda keys: ", ".join(sorted({cols[k]["ours_kernels"] for k in keys} - {None})) or "—"
        note = (f"float (train, fp32) on {paths(('train', 'fp32_b1', 'fp32_b256'))}; integer on "
                f"{paths([k for k, *_ in COLUMNS if not k.startswith(('train', 'fp32'))])}")
        notes.setdefault(note, []).append(model)
    return "\n\n".join(f"lowbit's kernels ({', '.join(ms)}): {note}." for note, ms in notes.items())


def cpu_flags():
    """The instruction sets the integer kernels of lowbit and ONNX Runtime choose from, as /proc/cpuinfo names them."""
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def machine_meta(args):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    except OSError:
        rev, dirty = None, None
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "cpu_flags": cpu_flags(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "git": rev, "git_dirty": dirty, "threads": args.threads,
            "quick": args.quick, "repeats": args.repeats, "kernels": args.kernels, "loadavg_start": os.getloadavg(),
            "gemm": None if args.skip_gemm else {"rounds": args.gemm_rounds, "seconds": args.gemm_seconds,
                                                 "only": args.gemm}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[",".join(MODELS)],
                    help=f"comma- or space-separated, from {','.join(MODELS + GRAPH_MODELS)} (default {','.join(MODELS)})")
    ap.add_argument("--threads", type=int, default=2, help="threads for ours and for the peer")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: no training of {','.join(NO_TRAIN_QUICK)}, one eval run per figure, a short peer run")
    ap.add_argument("--repeats", type=int, default=None, help="eval runs per figure, median kept (default 3; --quick 1)")
    ap.add_argument("--kernels", choices=("ref", "avx2", "avxvnni", "vnni", "amx", "auto"),
                    help="integer kernels for every eval run, passed on as eval --kernels, to time one path "
                         "(default: eval's own choice, $LOWBIT_KERNELS else the best the CPU has); the JSON "
                         "(ours_kernels) and the line under the table say which path each figure ran on either way")
    ap.add_argument("--out", default="bench.json")
    ap.add_argument("--peer-json", help="reuse this peer.py result instead of running the peer")
    ap.add_argument("--skip-peer", action="store_true", help="do not run the PyTorch peer")
    ap.add_argument("--skip-ort", action="store_true", help="do not run the ONNX Runtime peer")
    ap.add_argument("--gemm", action="store_true",
                    help="run only the int8 GEMM comparison (bench_qgemm against ONNX Runtime's MatMulInteger)")
    ap.add_argument("--skip-gemm", action="store_true", help="do not run the int8 GEMM comparison")
    ap.add_argument("--gemm-rounds", type=int, default=None,
                    help="alternating rounds of the GEMM comparison, medians kept (default 3; --quick 1)")
    ap.add_argument("--gemm-seconds", type=float, default=0.5,
                    help="seconds of timed calls per shape, path and round (after warm-up)")
    ap.add_argument("--node", default="node", help="Node.js, for the ONNX Runtime peer")
    ap.add_argument("--ort-dir", default=os.path.join(ROOT, "tools", "ort"),
                    help="folder with time_ort.js, time_gemm.js and node_modules/onnxruntime-node")
    ap.add_argument("--peer-out", help="where to keep the peer's own JSON (default: OUT with .peer.json)")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"), help="folder with train, eval and bench_qgemm")
    ap.add_argument("--peer", default=os.path.join(ROOT, "tools", "peer.py"), help="the PyTorch peer")
    ap.add_argument("--python", default="/usr/bin/python3", help="interpreter with torch, for the peer")
    ap.add_argument("--data", help="data folder for train/eval (default: theirs)")
    ap.add_argument("--work-dir", help="keep the models here (default: a temporary folder, removed)")
    ap.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK}")
    args = ap.parse_args()

    models = [m.strip() for arg in args.models for m in arg.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS + GRAPH_MODELS]
    if bad or not models:
        ap.error(f"--models: unknown {bad}; choose from {','.join(MODELS + GRAPH_MODELS)}")
    if args.threads < 1:
        ap.error("--threads must be >= 1 (the peer needs an explicit count)")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.gemm and args.skip_gemm:
        ap.error("--gemm and --skip-gemm exclude each other")
    if args.gemm_rounds is None:
        args.gemm_rounds = 1 if args.quick else 3
    if args.gemm_rounds < 1 or args.gemm_seconds <= 0:
        ap.error("--gemm-rounds must be >= 1 and --gemm-seconds > 0")
    args.data_flag = ["--data", args.data] if args.data else []
    progs = () if args.gemm else ("train", "eval") + (() if args.skip_ort else ("export",))
    for prog in progs + (() if args.skip_gemm else ("bench_qgemm",)):
        if not os.access(os.path.join(args.bin, prog), os.X_OK):
            ap.error(f"{os.path.join(args.bin, prog)} is missing: build first (cmake --build build)"
                     + ("" if prog != "bench_qgemm" else " (or --skip-gemm)"))
    if not args.skip_ort and not os.path.isdir(os.path.join(args.ort_dir, "node_modules", "onnxruntime-node")):
        ap.error(f"ONNX Runtime is not installed in {args.ort_dir}: cd tools/ort && npm ci --ignore-scripts "
                 "(or --skip-ort)")
    peer_json = None
    if args.peer_json:
        with open(args.peer_json) as fh:
            peer_json = json.load(fh)
        missing = [m for m in models if m not in peer_json.get("models", {})]
        pthreads = peer_json.get("meta", {}).get("bench_threads", [])
        if missing:
            log(f"warning: {args.peer_json} has no {missing}")
        if args.threads not in pthreads:
            log(f"warning: {args.peer_json} was benchmarked with threads {pthreads}, not {args.threads}")

    lock_fh = None
    if not args.no_lock:
        lock_fh = open(LOCK, "a")
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {LOCK} (another timing job is running)")
            fcntl.flock(lock_fh, fcntl.LOCK_EX)

    meta = machine_meta(args)
    work = args.work_dir or tempfile.mkdtemp(prefix="lowbit-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        ours, ort, gemm = {}, {}, None
        if not args.skip_gemm:
            gemm = {"rounds": gemm_rounds(args)}
        for m in models if not args.gemm else ():
            ours[m] = ours_model(args, m, work)
            if not args.skip_ort:
                files = {mode: os.path.join(work, name) for mode, name in ours[m]["files"].items()}
                ort[m] = ort_model(args, m, files, work)
        peer_foreign = None
        if args.skip_peer or args.gemm:
            peer_json = None
        elif peer_json is None:
            peer_out = args.peer_out or (os.path.splitext(args.out)[0] + ".peer.json")
            peer_json, peer_foreign = run_peer(args, models, peer_out)
            meta["peer_json"] = os.path.abspath(peer_out)
        else:
            meta["peer_json"] = os.path.abspath(args.peer_json)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        if lock_fh:
            lock_fh.close()
    meta["loadavg_end"] = os.getloadavg()
    meta["total_runtime_s"] = round(time.perf_counter() - T0, 1)
    if peer_json:
        pm = peer_json.get("meta", {})
        meta["peer"] = {"date": pm.get("date"), "torch": pm.get("torch"), "args": pm.get("args"),
                        "reused": bool(args.peer_json), "foreign_cpu": peer_foreign}

    rows, result = {}, {"meta": meta, "models": {}}
    if gemm:
        gemm["summary"] = gemm_summary(gemm["rounds"])
        result["gemm"] = gemm
    for m in models if not args.gemm else ():
        of, osrc = ours_figures(ours[m])
        pf, psrc = peer_figures((peer_json or {}).get("models", {}).get(m), args.threads)
        orf = ort_figures(ort.get(m))
        rows[m] = {key: {"ours": of.get(key), "ours_kernels": osrc.get(key), "peer": pf.get(key),
                         "peer_source": psrc.get(key),
                         "ratio": ratio(of.get(key), pf.get(key), hib), "ort": orf.get(key),
                         "ort_ratio": ratio(of.get(key), orf.get(key), hib), "unit": unit,
                         "ratio_means": "ours/peer" if hib else "peer/ours"}
                   for key, _, unit, hib in COLUMNS}
        result["models"][m] = {"figures": rows[m], "ours": ours[m], "onnxruntime": ort.get(m)}

    text = table(rows) + "\n\n" + kernels_note(rows) if rows else ""
    foreign = [r["foreign_cpu"] for m in ours for res in ours[m]["inference"].values() for b in res.values()
               for r in b["runs"]]
    foreign += [ours[m]["train"]["foreign_cpu"] for m in ours if ours[m].get("train")]
    foreign += [r["foreign_cpu"] for m in ort for res in ort[m].values() for r in res["runs"]]
    foreign += [side["foreign_cpu"] for r in (gemm or {}).get("rounds", []) for side in r.values() if side]
    foreign = [f for f in foreign if f is not None]
    meta["ours_max_foreign_cpu"] = max(foreign) if foreign else None
    if gemm:
        result["gemm_markdown"] = gemm_text(gemm["summary"])
        print(f"\nThe exact int8 GEMM: lowbit against ONNX Runtime's MatMulInteger, {args.threads} thread(s), "
              f"{meta['cpu']} ({', '.join(meta['cpu_flags']) or 'no AVX2'})\n")
        print(result["gemm_markdown"])
    if rows:
        print(f"\nlowbit vs PyTorch and ONNX Runtime, {args.threads} thread(s), {meta['cpu']} "
              f"({', '.join(meta['cpu_flags']) or 'no AVX2'}); ratio > 1: lowbit is faster "
              f"(throughput ours/peer, latency peer/ours){' [--quick]' if args.quick else ''}\n")
        print(text)
    overheads = [ort[m]["call_overhead"]["b1_median_us"] for m in ort]
    if overheads:
        print(f"\nONNX Runtime {next(iter(ort.values()))['int8'].get('onnxruntime')} (npm onnxruntime-node): its b1 "
              f"figures include {min(overheads):.1f}-{max(overheads):.1f} µs per call of the Node.js binding "
              f"(an identity model's b1 latency).")
    if meta["ours_max_foreign_cpu"] and meta["ours_max_foreign_cpu"] > 0.05:
        print(f"\nWARNING: other processes used up to {meta['ours_max_foreign_cpu']:.0%} of the CPUs during our "
              f"timings (load average {meta['loadavg_start'][0]:.1f} at the start): the figures are not meaningful; "
              f"rerun on a quiet machine.")
    result["table_markdown"] = text
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
