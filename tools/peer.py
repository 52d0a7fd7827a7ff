#!/usr/bin/env python3
"""PyTorch peer benchmark: fp32 training, PTQ int8, QAT int8, QAT W4A8 (simulated),
inference throughput/latency (fp32 vs int8 per quantized engine) and model sizes,
on Fashion-MNIST, for the three canonical chains (mlp, lenet5, convbn; the default) and the two
graph models (resnet8, dsconv: residual adds, depthwise convolutions), each defined as lowbit's
models/*.json defines it.

Run (serialised against other timing jobs on the machine):
    flock /tmp/bench.lock /usr/bin/python3 tools/peer.py            # defaults
    flock /tmp/bench.lock /usr/bin/python3 tools/peer.py --models lenet5 --epochs 1 --out /tmp/r.json
    # float accuracy with lowbit train's default recipe (Adam 1e-3, cosine per epoch, batch 64, 10 epochs):
    /usr/bin/python3 tools/peer.py --models dsconv --epochs 10 --schedule cosine --fp32-only --threads 1 \\
        --epoch-tries 1 --max-wait-total 0 --out /tmp/dsconv-acc.json

Everything runs in one process. lowbit's tools/bench.py runs it and compares; docs/benchmarks.md says
what each figure means. (lowbit keeps this copy so the repository is complete on its own.)
"""
import argparse
import copy
import datetime
import gzip
import io
import json
import os
import platform
import statistics
import sys
import time
import traceback


def _early_env():
    # OMP_WAIT_POLICY must be in the environment before libgomp is loaded (i.e. before import torch)
    for i, a in enumerate(sys.argv):
        if a == "--omp-wait-policy" and i + 1 < len(sys.argv):
            os.environ["OMP_WAIT_POLICY"] = sys.argv[i + 1]
        elif a.startswith("--omp-wait-policy="):
            os.environ["OMP_WAIT_POLICY"] = a.split("=", 1)[1]


_early_env()

import ctypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn
import torch.ao.quantization as tq
from torch.ao.quantization import (QConfig, HistogramObserver, default_per_channel_weight_observer,
                                   FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver,
                                   MovingAveragePerChannelMinMaxObserver)

MEAN, STD = 0.2860, 0.3530
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------
# threads. Debian's torch does GEMM through OpenBLAS (pthreads build), whose thread pool is NOT
# governed by torch.set_num_threads; by default it uses every core. We set it to the same count,
# so "threads N" really means N cores for every op (disable with --no-sync-openblas).
# --------------------------------------------------------------------------------------------
def _find_openblas():
    for name in ("libopenblas.so.0", "libopenblas.so", "libblas.so.3"):
        try:
            lib = ctypes.CDLL(name)
            lib.openblas_set_num_threads.argtypes = [ctypes.c_int]
            lib.openblas_get_num_threads.restype = ctypes.c_int
            lib.openblas_get_config.restype = ctypes.c_char_p
            return lib
        except (OSError, AttributeError):
            continue
    return None


OPENBLAS = _find_openblas()
SYNC_OPENBLAS = True


def set_threads(n):
    torch.set_num_threads(n)
    if OPENBLAS is not None and SYNC_OPENBLAS:
        OPENBLAS.openblas_set_num_threads(n)


def openblas_threads():
    return OPENBLAS.openblas_get_num_threads() if OPENBLAS is not None else None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def load_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    assert (magic >> 8) == 0x08, f"{path}: expected unsigned-byte IDX, magic={magic:#x}"
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    assert arr.size == int(np.prod(dims)), path
    return arr.reshape(dims)


def load_split(data_dir, prefix):
    imgs = load_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = load_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    x = torch.from_numpy(imgs.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x.contiguous(), y


# --------------------------------------------------------------------------------------------
# models (QuantStub/DeQuantStub are identities in fp32; distinct ReLU modules so they can fuse)
# --------------------------------------------------------------------------------------------
class MLP(nn.Module):
    fuse_groups = [["fc1", "relu1"], ["fc2", "relu2"]]

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.flatten = nn.Flatten()
        self.fc1, self.relu1 = nn.Linear(784, 256), nn.ReLU()
        self.fc2, self.relu2 = nn.Linear(256, 128), nn.ReLU()
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.flatten(self.quant(x))
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.dequant(self.fc3(x))


class LeNet5(nn.Module):
    fuse_groups = [["conv1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"], ["fc2", "relu4"]]

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.relu3 = nn.Linear(400, 120), nn.ReLU()
        self.fc2, self.relu4 = nn.Linear(120, 84), nn.ReLU()
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.quant(x)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.dequant(self.fc3(x))


class ConvBN(nn.Module):
    fuse_groups = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["fc1", "relu3"]]

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.relu1, self.pool1 = nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
        self.relu2, self.pool2 = nn.ReLU(), nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1, self.relu3 = nn.Linear(3136, 128), nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.quant(x)
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        return self.dequant(self.fc2(x))


def _conv_bn(cin, cout, stride=1, groups=1, bias=False):
    """3x3 (pad 1) convolution and its BatchNorm, as two modules (fuse_modules fuses them by name)."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=bias), nn.BatchNorm2d(cout)


class ResNet8(nn.Module):
    """MLPerf Tiny ResNet-8, node for node as models/resnet8.json: flat module names so that the
    fuse groups read like the description. The residual Add (+ the ReLU after it) is a
    FloatFunctional, which eager-mode quantization turns into a quantized add_relu."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.stem, self.stem_bn = _conv_bn(1, 16)
        self.stem_relu = nn.ReLU()
        self.b1_conv1, self.b1_bn1 = _conv_bn(16, 16)
        self.b1_relu1 = nn.ReLU()
        self.b1_conv2, self.b1_bn2 = _conv_bn(16, 16)
        self.b1_add = nn.quantized.FloatFunctional()
        fuse = [["stem", "stem_bn", "stem_relu"], ["b1_conv1", "b1_bn1", "b1_relu1"], ["b1_conv2", "b1_bn2"]]
        for b, cin, cout in ((2, 16, 32), (3, 32, 64)):
            conv1, bn1 = _conv_bn(cin, cout, stride=2)
            conv2, bn2 = _conv_bn(cout, cout)
            setattr(self, f"b{b}_conv1", conv1), setattr(self, f"b{b}_bn1", bn1)
            setattr(self, f"b{b}_relu1", nn.ReLU())
            setattr(self, f"b{b}_conv2", conv2), setattr(self, f"b{b}_bn2", bn2)
            setattr(self, f"b{b}_shortcut", nn.Conv2d(cin, cout, 1, stride=2))  # bias, no BN
            setattr(self, f"b{b}_add", nn.quantized.FloatFunctional())
            fuse += [[f"b{b}_conv1", f"b{b}_bn1", f"b{b}_relu1"], [f"b{b}_conv2", f"b{b}_bn2"]]
        self.fuse_groups = fuse
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem_relu(self.stem_bn(self.stem(self.quant(x))))
        y = self.b1_bn2(self.b1_conv2(self.b1_relu1(self.b1_bn1(self.b1_conv1(x)))))
        x = self.b1_add.add_relu(y, x)
        for b in (2, 3):
            m = lambda n: getattr(self, f"b{b}_{n}")  # noqa: E731
            y = m("bn2")(m("conv2")(m("relu1")(m("bn1")(m("conv1")(x)))))
            x = m("add").add_relu(y, m("shortcut")(x))
        x = self.flatten(self.pool(x))
        return self.dequant(self.fc(x))


class DSConv(nn.Module):
    """Depthwise-separable network, node for node as models/dsconv.json (every conv with a bias, as
    there). Eager mode fuses conv+BN only: it has no conv+ReLU6 fusion, so each ReLU6 stays a module
    of its own (a quantized ReLU6 after the fused conv)."""
    blocks = ((1, 64), (2, 128), (1, 128), (2, 256))  # (stride of the depthwise conv, pointwise out channels)

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.stem, self.stem_bn = _conv_bn(1, 32, bias=True)
        self.stem_relu6 = nn.ReLU6()
        fuse, cin = [["stem", "stem_bn"]], 32
        for i, (stride, cout) in enumerate(self.blocks, 1):
            dw, dw_bn = _conv_bn(cin, cin, stride=stride, groups=cin, bias=True)
            setattr(self, f"b{i}_dw", dw), setattr(self, f"b{i}_dw_bn", dw_bn)
            setattr(self, f"b{i}_dw_relu6", nn.ReLU6())
            setattr(self, f"b{i}_pw", nn.Conv2d(cin, cout, 1)), setattr(self, f"b{i}_pw_bn", nn.BatchNorm2d(cout))
            setattr(self, f"b{i}_pw_relu6", nn.ReLU6())
            fuse += [[f"b{i}_dw", f"b{i}_dw_bn"], [f"b{i}_pw", f"b{i}_pw_bn"]]
            cin = cout
        self.fuse_groups = fuse
        self.pool, self.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.stem_relu6(self.stem_bn(self.stem(self.quant(x))))
        for i in range(1, len(self.blocks) + 1):
            for part in ("dw", "pw"):
                m = lambda n: getattr(self, f"b{i}_{part}{n}")  # noqa: E731
                x = m("_relu6")(m("_bn")(m("")(x)))
        x = self.flatten(self.pool(x))
        return self.dequant(self.fc(x))


MODELS = {"mlp": MLP, "lenet5": LeNet5, "convbn": ConvBN, "resnet8": ResNet8, "dsconv": DSConv}


# --------------------------------------------------------------------------------------------
# training / evaluation
# --------------------------------------------------------------------------------------------
def train_epoch(model, opt, X, Y, bs, gen, at_half=None):
    model.train()
    n = X.shape[0]
    perm = torch.randperm(n, generator=gen)
    nb = (n + bs - 1) // bs
    lossf = nn.CrossEntropyLoss()
    tot = 0.0
    t0 = time.perf_counter()
    for i in range(nb):
        if at_half is not None and i == nb // 2:
            at_half(model)
        idx = perm[i * bs:(i + 1) * bs]
        xb, yb = X[idx], Y[idx]
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(xb), yb)
        loss.backward()
        opt.step()
        tot += loss.item()
    dt = time.perf_counter() - t0
    return dt, tot / nb


def evaluate(model, X, Y, bs=1000):
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, X.shape[0], bs):
            correct += (model(X[i:i + bs]).argmax(1) == Y[i:i + bs]).sum().item()
    return correct / X.shape[0]


def state_dict_bytes(model):
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def freeze_half(model):
    model.apply(tq.disable_observer)
    model.apply(torch.nn.intrinsic.qat.freeze_bn_stats)



# --------------------------------------------------------------------------------------------
# interference control: the machine is shared, so every timed section records the CPU time
# used by *other* processes while it ran ("foreign_cpu", fraction of all cores; 0.5 = one of
# two cores busy elsewhere), waits for a quiet machine first, and is retried when contaminated.
# --------------------------------------------------------------------------------------------
class CpuMon:
    def __init__(self, args, t_start):
        self.thresh = args.foreign_thresh
        self.wait_budget = args.max_wait_total
        self.deadline = t_start + args.time_budget
        self.waited = 0.0
        self.enabled = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")

    def read(self):
        if not self.enabled:
            return (0, 1, 0)
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            s = f.read().rsplit(")", 1)[1].split()
        return (sum(v) - v[3] - v[4], sum(v), int(s[11]) + int(s[12]))  # busy, total, own utime+stime

    @staticmethod
    def foreign(a, b):
        tot = b[1] - a[1]
        if tot <= 0:
            return 0.0
        return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / tot)

    def can_retry(self):
        return self.enabled and time.perf_counter() < self.deadline

    def wait_quiet(self):
        """Wait (bounded by a global budget) until other processes use < thresh of the CPUs."""
        if not self.can_retry():
            return
        t0 = time.perf_counter()
        while self.waited + (time.perf_counter() - t0) < self.wait_budget:
            a = self.read()
            time.sleep(0.5)
            if self.foreign(a, self.read()) < self.thresh:
                break
        self.waited += time.perf_counter() - t0

    def measure(self, fn, tries, snapshot=None, restore=None):
        """Run fn() (wait for quiet first); retry while contaminated. Returns (result, info)."""
        best = None
        for attempt in range(1, tries + 1):
            self.wait_quiet()
            if snapshot is not None and attempt == 1 and tries > 1:
                snap = snapshot()
            a = self.read()
            res = fn()
            f = self.foreign(a, self.read())
            if best is None or f < best[1]:
                best = (res, f, attempt)
            if f <= self.thresh or attempt == tries or not self.can_retry():
                break
            if restore is not None:
                restore(snap)
        res, f, att = best
        return res, {"foreign_cpu": round(f, 3), "attempts": attempt, "kept_attempt": att}


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def bench_b1(model, X, n_calls, warmup=100):
    model.eval()
    n = min(n_calls, X.shape[0])
    xs = [X[i:i + 1] for i in range(n)]
    lat = [0] * n
    pc = time.perf_counter_ns
    with torch.inference_mode():
        for i in range(warmup):
            model(xs[i % n])
        t_all = pc()
        for i, x in enumerate(xs):
            t0 = pc()
            model(x)
            lat[i] = pc() - t0
        total = (pc() - t_all) / 1e9
    lat.sort()
    return {"calls": n, "images_per_s": round(n / total, 1),
            "median_us": round(lat[n // 2] / 1e3, 2),
            "p10_us": round(lat[n // 10] / 1e3, 2), "p90_us": round(lat[(9 * n) // 10] / 1e3, 2),
            "mean_us": round(sum(lat) / n / 1e3, 2)}


def bench_batch(model, X, bs, reps):
    model.eval()
    n = X.shape[0]
    times = []
    with torch.inference_mode():
        model(X[:bs])
        model(X[:bs])
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(0, n, bs):
                model(X[i:i + bs])
            times.append(time.perf_counter() - t0)
    return {"batch": bs, "images": n, "reps": reps,
            "images_per_s": round(n / statistics.median(times), 1),
            "images_per_s_best": round(n / min(times), 1)}


def jit_freeze(model, example):
    with torch.no_grad():
        tm = torch.jit.trace(copy.deepcopy(model).eval(), example)
        return torch.jit.freeze(tm)


def bench_all(model, Xte, args, threads, mon):
    res = {}
    jm, jerr = None, None
    if args.jit_b1:
        try:
            jm = jit_freeze(model, Xte[:1])
        except Exception as e:  # record and continue without the TorchScript row
            jerr = err_str(e)
    for t in threads:
        set_threads(t)
        b1, i1 = mon.measure(lambda: bench_b1(model, Xte, args.b1_calls), args.bench_tries)
        bb, ib = mon.measure(lambda: bench_batch(model, Xte, 256, args.b256_reps), args.bench_tries)
        b1.update(i1)
        bb.update(ib)
        res[f"threads{t}"] = {"b1": b1, "b256": bb, "torch_threads": torch.get_num_threads(),
                              "openblas_threads": openblas_threads()}
        if jm is not None:
            try:
                jb, ij = mon.measure(lambda: bench_b1(jm, Xte, args.b1_calls), args.bench_tries)
                jb.update(ij)
                res[f"threads{t}"]["b1_torchscript"] = jb
            except Exception as e:
                res[f"threads{t}"]["b1_torchscript"] = {"error": err_str(e)}
        elif jerr is not None:
            res[f"threads{t}"]["b1_torchscript"] = {"error": jerr}
    set_threads(args.threads)
    return res


def timed_epoch(model, opt, X, Y, args, gen, mon, at_half=None):
    """One training epoch, re-run from a snapshot if other processes contaminated the timing."""
    def snapshot():
        return (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), gen.get_state())

    def restore(snap):
        model.load_state_dict(snap[0])
        opt.load_state_dict(snap[1])
        gen.set_state(snap[2])
        if at_half is not None:  # freeze_bn is a plain attribute, not part of the state_dict
            model.apply(torch.nn.intrinsic.qat.update_bn_stats)

    (dt, loss), info = mon.measure(lambda: train_epoch(model, opt, X, Y, args.batch, gen, at_half),
                                   args.epoch_tries, snapshot, restore)
    rec = {"seconds": round(dt, 2), "images_per_s": round(X.shape[0] / dt, 1), "train_loss": round(loss, 4)}
    rec.update(info)
    return rec


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------
def ptq_qconfig():
    # per-channel symmetric int8 weights; 8-bit affine activations without reduce_range
    # (== get_default_qconfig('onednn'); qnnpack's default is per-tensor weights)
    return QConfig(activation=HistogramObserver.with_args(reduce_range=False),
                   weight=default_per_channel_weight_observer)


def w4a8_qat_qconfig():
    act = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                                  quant_min=0, quant_max=255, reduce_range=False)
    wt = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                                 quant_min=-8, quant_max=7, dtype=torch.qint8,
                                                 qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfig(activation=act, weight=wt)


def use_fakequant_weight_qparams(model):
    """Make convert() quantize (symmetric) weights with the scale/zero_point buffers that the fused
    fake-quant computed during QAT, instead of re-deriving them from the observer's min/max."""
    for mod in model.modules():
        if isinstance(mod, tq.FakeQuantize) and mod.qscheme in (torch.per_channel_symmetric,
                                                                 torch.per_tensor_symmetric):
            mod.calculate_qparams = (lambda mm=mod: (mm.scale.detach().clone(), mm.zero_point.detach().clone()))


def run_ptq(fp32, Xtr, n_calib, qconfig):
    m = copy.deepcopy(fp32).eval()
    tq.fuse_modules(m, m.fuse_groups, inplace=True)
    m.qconfig = qconfig
    tq.prepare(m, inplace=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n_calib, 200):
            m(Xtr[i:min(i + 200, n_calib)])
    tq.convert(m, inplace=True)
    return m, time.perf_counter() - t0


def run_qat(fp32, qconfig, Xtr, Ytr, args, seed, mon):
    torch.manual_seed(seed)
    m = copy.deepcopy(fp32).train()
    tq.fuse_modules_qat(m, m.fuse_groups, inplace=True)
    m.qconfig = qconfig
    tq.prepare_qat(m, inplace=True)
    opt = torch.optim.Adam(m.parameters(), lr=args.qat_lr)
    gen = torch.Generator().manual_seed(seed + 1000)
    epochs = []
    for e in range(args.qat_epochs):
        # freeze observers + BN statistics halfway through the (last) QAT epoch
        hook = freeze_half if e == args.qat_epochs - 1 else None
        epochs.append(timed_epoch(m, opt, Xtr, Ytr, args, gen, mon, at_half=hook))
    return m, epochs


def describe_qconfig(qc):
    def d(p):
        o = p()
        inner = getattr(o, "activation_post_process", o)
        return (f"{type(o).__name__}({type(inner).__name__}, {getattr(o, 'dtype', '?')}, "
                f"{getattr(o, 'qscheme', '?')}, q[{getattr(o, 'quant_min', '?')},{getattr(o, 'quant_max', '?')}]"
                f"{', reduce_range' if getattr(inner, 'reduce_range', False) else ''})")
    return {"activation": d(qc.activation), "weight": d(qc.weight)}


def fmt_bench(f, threads):
    out = []
    for t in threads:
        r = f[f"threads{t}"]
        js = r.get("b1_torchscript", {}).get("median_us", "-")
        out.append(f"t{t}: b1 {r['b1']['median_us']}us (jit {js}us, foreign {r['b1']['foreign_cpu']}) / "
                   f"b256 {r['b256']['images_per_s']} img/s (foreign {r['b256']['foreign_cpu']})")
    return "; ".join(out)


def err_str(e):
    return f"{type(e).__name__}: {e}".strip()[:800]


# --------------------------------------------------------------------------------------------
def run_model(name, Xtr, Ytr, Xte, Yte, args, log, mon):
    R = {}
    seed = args.seed
    torch.manual_seed(seed)
    fp32 = MODELS[name]()
    R["params"] = sum(p.numel() for p in fp32.parameters())
    epochs = 0 if name in args.no_train else args.epochs

    # ---- 1. fp32 training ---------------------------------------------------------------
    opt = torch.optim.Adam(fp32.parameters(), lr=args.lr)
    # lowbit's train: lr(epoch e) = lr * (1 + cos(pi * e / epochs)) / 2, set at the start of each epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs)) if args.schedule == "cosine" else None
    gen = torch.Generator().manual_seed(seed)
    ep = []
    for e in range(epochs):
        lr = opt.param_groups[0]["lr"]
        rec = timed_epoch(fp32, opt, Xtr, Ytr, args, gen, mon)
        if sched is not None:
            sched.step()
        rec["epoch"] = e + 1
        rec["lr"] = lr
        rec["test_acc"] = evaluate(fp32, Xte, Yte)
        ep.append(rec)
        log(f"[{name}] fp32 epoch {e + 1}/{epochs}: {rec['seconds']}s ({rec['images_per_s']:.0f} img/s, "
            f"foreign cpu {rec['foreign_cpu']}, attempts {rec['attempts']}) lr {lr:.6g} loss {rec['train_loss']} "
            f"test acc {rec['test_acc']:.4f}")
    fp32.eval()
    R["fp32"] = {"epochs_trained": epochs, "schedule": args.schedule, "epochs": ep,
                 "test_acc": ep[-1]["test_acc"] if ep else evaluate(fp32, Xte, Yte),
                 "mean_epoch_s": round(statistics.mean(x["seconds"] for x in ep), 2) if ep else None,
                 "state_dict_bytes": state_dict_bytes(fp32)}
    if args.fp32_only:  # empty sections, so that --table still reads the result
        R.update(inference={}, ptq_int8={}, qat_int8={}, qat_w4a8={})
        return R

    # ---- 4a. fp32 inference ---------------------------------------------------------------
    R["inference"] = {}
    R["inference"]["fp32"] = bench_all(fp32, Xte, args, args.bench_threads, mon)
    f = R["inference"]["fp32"]
    log(f"[{name}] fp32 inference: " + fmt_bench(f, args.bench_threads))

    # ---- 2./3./4b./5. per quantized engine ---------------------------------------------
    R["ptq_int8"], R["qat_int8"] = {}, {}
    for eng in args.engines:
        try:
            torch.backends.quantized.engine = eng
        except Exception as e:  # engine not compiled in
            R["ptq_int8"][eng] = R["qat_int8"][eng] = {"error": err_str(e)}
            log(f"[{name}] engine {eng} unavailable: {e}")
            continue

        # PTQ
        entry = {}
        qm = None
        try:
            qc = ptq_qconfig()
            entry["qconfig"] = describe_qconfig(qc)
            qm, cal_s = run_ptq(fp32, Xtr, args.calib, qc)
            entry["calib_images"] = args.calib
            entry["calib_convert_s"] = round(cal_s, 2)
            entry["test_acc"] = evaluate(qm, Xte, Yte)
            entry["state_dict_bytes"] = state_dict_bytes(qm)
            log(f"[{name}] PTQ int8 [{eng}] acc {entry['test_acc']:.4f} size {entry['state_dict_bytes']}")
        except Exception as e:
            entry["error"] = err_str(e)
            entry["traceback"] = traceback.format_exc()[-2000:]
            log(f"[{name}] PTQ int8 [{eng}] FAILED: {err_str(e)}")
            qm = None
        R["ptq_int8"][eng] = entry

        # int8 inference (PTQ-converted model; the QAT-converted model has the identical graph)
        if qm is not None:
            try:
                R["inference"][f"int8_{eng}"] = bench_all(qm, Xte, args, args.bench_threads, mon)
                f = R["inference"][f"int8_{eng}"]
                log(f"[{name}] int8 [{eng}] inference: " + fmt_bench(f, args.bench_threads))
            except Exception as e:
                R["inference"][f"int8_{eng}"] = {"error": err_str(e)}
                log(f"[{name}] int8 [{eng}] inference FAILED: {err_str(e)}")
            del qm

        # QAT int8 with the engine's default QAT qconfig
        entry = {}
        if args.qat_epochs > 0:
            try:
                qc = tq.get_default_qat_qconfig(eng)
                entry["qconfig"] = describe_qconfig(qc)
                qat, qep = run_qat(fp32, qc, Xtr, Ytr, args, seed, mon)
                entry["epochs"] = qep
                entry["lr"] = args.qat_lr
                entry["fakequant_test_acc"] = evaluate(qat, Xte, Yte)
                qat.eval()
                qmq = tq.convert(qat, inplace=False)
                entry["test_acc"] = evaluate(qmq, Xte, Yte)
                entry["state_dict_bytes"] = state_dict_bytes(qmq)
                log(f"[{name}] QAT int8 [{eng}] epoch {qep[-1]['seconds']}s fake-quant acc "
                    f"{entry['fakequant_test_acc']:.4f} int8 acc {entry['test_acc']:.4f}")
                del qat, qmq
            except Exception as e:
                entry["error"] = err_str(e)
                entry["traceback"] = traceback.format_exc()[-2000:]
                log(f"[{name}] QAT int8 [{eng}] FAILED: {err_str(e)}")
        R["qat_int8"][eng] = entry

    # ---- 3b. QAT W4A8 (simulated; engine-independent fake-quant training) ---------------
    entry = {}
    if args.qat_epochs > 0:
        try:
            qc = w4a8_qat_qconfig()
            entry["qconfig"] = describe_qconfig(qc)
            qat, qep = run_qat(fp32, qc, Xtr, Ytr, args, seed, mon)
            entry["epochs"] = qep
            entry["lr"] = args.qat_lr
            entry["sim_test_acc"] = evaluate(qat, Xte, Yte)
            log(f"[{name}] QAT W4A8 sim acc {entry['sim_test_acc']:.4f} (epoch {qep[-1]['seconds']}s)")
            # Extra: the 4-bit weight codes fit in int8, so the same model converts onto the
            # int8 kernels (weights clamped to [-8,7]): real integer execution of the W4A8
            # numerics, with no int4 storage or speed benefit. Two variants:
            #  - "int8_kernel_test_acc": weight qparams = the ones the fused fake-quant used during
            #    QAT (scale = max(|min|/8, max/7)), i.e. exactly the simulated model;
            #  - "..._default_convert": plain tq.convert, which recomputes weight qparams with the
            #    Python observer formula (scale = max(|min|,max)/7.5) -> a slightly different grid.
            # The fused fake-quant gives a channel whose weights all have one sign a zero point
            # other than 0 (-8 when none is negative); a 9-weight depthwise channel can be such a
            # channel (dsconv has some). onednn needs zero points of 0, so it refuses the first
            # variant for that model: recorded as an error, the second variant still runs.
            entry["int8_kernel_test_acc"], entry["int8_kernel_test_acc_default_convert"] = {}, {}
            for eng in args.engines:
                for key, fix in (("int8_kernel_test_acc", True), ("int8_kernel_test_acc_default_convert", False)):
                    try:
                        torch.backends.quantized.engine = eng
                        src = copy.deepcopy(qat).eval()
                        if fix:
                            use_fakequant_weight_qparams(src)
                        q4 = tq.convert(src, inplace=False)
                        entry[key][eng] = evaluate(q4, Xte, Yte)
                        if fix:
                            codes = [mod.weight().int_repr() for mod in q4.modules()
                                     if hasattr(mod, "weight") and callable(mod.weight)]
                            entry.setdefault("int8_kernel_weight_code_range", {})[eng] = \
                                [min(int(c.min()) for c in codes), max(int(c.max()) for c in codes)]
                    except Exception as e:
                        entry[key][eng] = {"error": err_str(e)}
            log(f"[{name}] W4A8 on int8 kernels: {entry['int8_kernel_test_acc']} "
                f"(default convert: {entry['int8_kernel_test_acc_default_convert']})")
            del qat
        except Exception as e:
            entry["error"] = err_str(e)
            entry["traceback"] = traceback.format_exc()[-2000:]
            log(f"[{name}] QAT W4A8 FAILED: {err_str(e)}")
    R["qat_w4a8"] = entry
    return R


def markdown_tables(summary):
    """Markdown tables (peer.py --table) from a results.json summary."""
    M = summary["models"]
    meta = summary["meta"]
    engines = meta["args"]["engines"]
    threads = meta["args"]["bench_threads"]

    def g(d, *ks, fmt="{}"):
        for k in ks:
            if not isinstance(d, dict) or k not in d:
                return "err" if isinstance(d, dict) and "error" in d else "-"
            d = d[k]
        if isinstance(d, dict):  # an {"error": ...} where a figure would be
            return "err" if "error" in d else "-"
        return fmt.format(d)

    pct = "{:.2%}"
    L = ["| model | params | fp32 acc | " + " | ".join(f"PTQ int8 {e}" for e in engines) + " | "
         + " | ".join(f"QAT int8 {e}" for e in engines) + " | QAT W4A8 sim | W4A8 int8-kernel (" + "/".join(engines) + ") | same, default convert |",
         "|---" * (6 + 2 * len(engines)) + "|"]
    for n, r in M.items():
        if "error" in r:
            L.append(f"| {n} | error: {r['error'][:80]} |")
            continue
        w4k = "/".join(g(r, "qat_w4a8", "int8_kernel_test_acc", e, fmt=pct) for e in engines)
        w4d = "/".join(g(r, "qat_w4a8", "int8_kernel_test_acc_default_convert", e, fmt=pct) for e in engines)
        L.append(f"| {n} | {r['params']:,} | {g(r, 'fp32', 'test_acc', fmt=pct)} | "
                 + " | ".join(g(r, "ptq_int8", e, "test_acc", fmt=pct) for e in engines) + " | "
                 + " | ".join(g(r, "qat_int8", e, "test_acc", fmt=pct) for e in engines)
                 + f" | {g(r, 'qat_w4a8', 'sim_test_acc', fmt=pct)} | {w4k} | {w4d} |")
    L.append("")
    L.append("| model | fp32 epochs | fp32 s/epoch (img/s) | " + " | ".join(f"QAT int8 {e} s/epoch" for e in engines)
             + " | QAT W4A8 s/epoch | max foreign cpu (training) |")
    L.append("|---" * (5 + len(engines)) + "|")
    for n, r in M.items():
        if "error" in r:
            continue
        ep = r["fp32"]["epochs"]
        fsec = " / ".join(f"{e['seconds']:.1f}" for e in ep)
        fips = " / ".join(f"{e['images_per_s']:.0f}" for e in ep)
        qat_runs = [r["qat_int8"].get(e, {}) for e in engines] + [r["qat_w4a8"]]
        allep = list(ep) + [x for q in qat_runs for x in q.get("epochs", [])]
        mf = max((x.get("foreign_cpu", 0) for x in allep), default=0)
        qcells = [f"{q['epochs'][-1]['seconds']:.1f}" if q.get("epochs") else "-" for q in qat_runs]
        L.append(f"| {n} | {r['fp32']['epochs_trained']} | {fsec} ({fips}) | " + " | ".join(qcells)
                 + f" | {mf:.2f} |")
    L.append("")
    variants = ["fp32"] + [f"int8_{e}" for e in engines]
    for metric, title, key, fmt in (("b1", "batch-1 median latency, us (eager / TorchScript-frozen)", "median_us", "{:.0f}"),
                                    ("b1ips", "batch-1 throughput, images/s over all single-image calls (eager)",
                                     "images_per_s", "{:,.0f}"),
                                    ("b256", "batch-256 throughput, images/s (median of passes; best)", "images_per_s", "{:,.0f}")):
        L.append(f"{title}:")
        L.append("")
        L.append("| model | " + " | ".join(f"{v} t{t}" for v in variants for t in threads) + " |")
        L.append("|---" * (1 + len(variants) * len(threads)) + "|")
        for n, r in M.items():
            if "error" in r:
                continue
            cells = []
            for v in variants:
                for t in threads:
                    x = r["inference"].get(v, {})
                    if "error" in x:
                        cells.append("err")
                        continue
                    x = x.get(f"threads{t}", {})
                    if metric == "b1":
                        c = g(x, "b1", key, fmt=fmt) + " / " + g(x, "b1_torchscript", key, fmt=fmt)
                    elif metric == "b1ips":
                        c = g(x, "b1", key, fmt=fmt)
                    else:
                        c = g(x, "b256", key, fmt=fmt) + "; " + g(x, "b256", "images_per_s_best", fmt=fmt)
                    cells.append(c)
            L.append(f"| {n} | " + " | ".join(cells) + " |")
        L.append("")
    L.append("| model | fp32 state_dict bytes | " + " | ".join(f"int8 {e} bytes" for e in engines) + " | ratio |")
    L.append("|---" * (3 + len(engines)) + "|")
    for n, r in M.items():
        if "error" in r:
            continue
        fb = r["fp32"]["state_dict_bytes"]
        ib = [r["ptq_int8"].get(e, {}).get("state_dict_bytes") for e in engines]
        ratio = next((fb / b for b in ib if b), None)
        rtxt = f"{ratio:.2f}x" if ratio else "-"
        L.append(f"| {n} | {fb:,} | " + " | ".join(f"{b:,}" if b else "err" for b in ib) + f" | {rtxt} |")
    return "\n".join(L)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        with open(sys.argv[2]) as fh:
            print(markdown_tables(json.load(fh)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5", "convbn"], choices=list(MODELS),
                    help="default: the three chains")
    ap.add_argument("--epochs", type=int, default=2, help="fp32 training epochs (default 2)")
    ap.add_argument("--no-train", nargs="+", default=[], choices=list(MODELS), metavar="MODEL",
                    help="no fp32 training for these models: time and quantize them untrained "
                         "(bench.py --quick, for the slow ones)")
    ap.add_argument("--qat-epochs", type=int, default=1, help="QAT fine-tune epochs (0 = skip QAT)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                    help="fp32 learning rate: constant, or cosine over --epochs, stepped per epoch "
                         "(lowbit train's default recipe: --epochs 10 --schedule cosine)")
    ap.add_argument("--fp32-only", action="store_true",
                    help="only train the float model and report its test accuracy per epoch "
                         "(no quantization, no inference timing)")
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib", type=int, default=2000, help="PTQ calibration images (first N training images)")
    ap.add_argument("--engines", nargs="+", default=["qnnpack", "onednn"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for everything")
    ap.add_argument("--bench-threads", type=int, nargs="+", default=[2, 1],
                    help="thread counts for the inference benchmarks")
    ap.add_argument("--no-sync-openblas", action="store_true",
                    help="leave OpenBLAS's own thread pool at its default (all cores)")
    ap.add_argument("--omp-wait-policy", choices=["ACTIVE", "PASSIVE"], default=None,
                    help="set OMP_WAIT_POLICY (before torch is imported); default: leave unset")
    ap.add_argument("--no-jit-b1", dest="jit_b1", action="store_false",
                    help="skip the extra batch-1 run of the torch.jit.trace+freeze'd model")
    ap.add_argument("--b1-calls", type=int, default=10000, help="batch-1 calls (over the test set)")
    ap.add_argument("--b256-reps", type=int, default=5, help="passes over the test set at batch 256")
    ap.add_argument("--foreign-thresh", type=float, default=0.05,
                    help="retry a timed section if other processes used more than this fraction of all CPUs")
    ap.add_argument("--bench-tries", type=int, default=3, help="max attempts per inference benchmark")
    ap.add_argument("--epoch-tries", type=int, default=2, help="max attempts per timed training epoch")
    ap.add_argument("--max-wait-total", type=float, default=240.0,
                    help="total seconds the script may spend waiting for a quiet machine")
    ap.add_argument("--time-budget", type=float, default=1380.0,
                    help="after this many seconds no more waiting/retrying (keeps the run bounded)")
    ap.add_argument("--train-limit", type=int, default=None, help="debug: use only the first N training images")
    ap.add_argument("--test-limit", type=int, default=None, help="debug: use only the first N test images")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="peer-results.json")
    args = ap.parse_args()

    global SYNC_OPENBLAS
    SYNC_OPENBLAS = not args.no_sync_openblas
    t_start = time.perf_counter()
    default_threads = torch.get_num_threads()
    default_openblas_threads = openblas_threads()
    set_threads(args.threads)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    mon = CpuMon(args, t_start)
    load_start = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None
    Xtr, Ytr = load_split(args.data_dir, "train")
    Xte, Yte = load_split(args.data_dir, "t10k")
    if args.train_limit:
        Xtr, Ytr = Xtr[:args.train_limit].contiguous(), Ytr[:args.train_limit].contiguous()
    if args.test_limit:
        Xte, Yte = Xte[:args.test_limit].contiguous(), Yte[:args.test_limit].contiguous()
    log(f"data: train {tuple(Xtr.shape)} test {tuple(Xte.shape)}; torch {torch.__version__}; "
        f"threads default {default_threads} -> {torch.get_num_threads()}")

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    summary = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else None,
            "supported_quantized_engines": list(torch.backends.quantized.supported_engines),
            "torch_default_num_threads": default_threads,
            "num_threads_used": torch.get_num_threads(),
            "openblas": OPENBLAS.openblas_get_config().decode() if OPENBLAS is not None else None,
            "openblas_default_num_threads": default_openblas_threads,
            "openblas_threads_synced_to_torch": SYNC_OPENBLAS and OPENBLAS is not None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)"),
            "bench_threads": args.bench_threads,
            "args": vars(args),
            "normalisation": {"mean": MEAN, "std": STD},
        },
        "models": {},
    }
    for name in args.models:
        try:
            summary["models"][name] = run_model(name, Xtr, Ytr, Xte, Yte, args, log, mon)
        except Exception as e:
            summary["models"][name] = {"error": err_str(e), "traceback": traceback.format_exc()[-3000:]}
            log(f"[{name}] FAILED: {err_str(e)}")
    summary["meta"]["total_runtime_s"] = round(time.perf_counter() - t_start, 1)
    summary["meta"]["waited_for_quiet_s"] = round(mon.waited, 1)
    summary["meta"]["loadavg_start"] = load_start
    summary["meta"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else None

    text = json.dumps(summary, indent=1)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
