# PyTorch side of the float parity check (tests/test_torch_parity.cpp): N Adam steps of one model on fixed batches.
#
#   /usr/bin/python3 tests/torch_parity.py MODEL OUT_DIR [--steps N] [--batch-size B] [--seed S] [--data DIR]
#
# The model is the PyTorch peer's (tools/peer.py: same layers, PyTorch's default init), written as
# one nn.Sequential named `layers`, so its tensors carry lowbit's checkpoint names (layers.0.weight, ...). The batches
# are the first N*B images of a seeded permutation of the Fashion-MNIST training set (--data) or, without it,
# synthetic MNIST-like images (dark background, bright strokes, so max-pool windows tie as on real data), normalised
# as the peer does: (pixel / 255 - 0.2860) / 0.3530 in float32. The recipe is the peer's: train mode, Adam with
# PyTorch's defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8), nn.CrossEntropyLoss (mean over the batch).
#
# Every step is checked from the same state, so that rounding cannot compound: the float64 run (the exact
# arithmetic both float32 runs approximate) records the state at the start of each step, and each float32 run
# (PyTorch's here, ours in the C++ test) starts every step from that state rounded to float32. Over a 20-step
# trajectory of a network with BatchNorm, a last-bit difference in one product grows by orders of magnitude
# (docs/design.md, "Float parity with PyTorch"), so a trajectory's end says more about the BLAS core than the code.
#
# Writes four files in the safetensors layout (docs/model-file-format.md) into OUT_DIR:
#   init.safetensors     the initial parameters and buffers as a lowbit checkpoint (format tag and version)
#   batches.safetensors  images F32 (N, B, 1, 28, 28), pixels U8 (N, B, 28, 28), labels I32 (N, B)
#   exact.safetensors    float64 (F64): state.<k>.<name> every parameter and buffer at the start of step k
#                        (k = 0..N; N is the state after the last step); exp_avg.<k>.<name> and
#                        exp_avg_sq.<k>.<name>, Adam's moments at the start of step k (k >= 1); loss (N), the
#                        loss of each step before its update; logits (B, 10) and grad.<name>, of the first step
#   torch.safetensors    PyTorch float32 (F32), each step from the exact state at its start: loss (N);
#                        after.<k>.<name>, every parameter and buffer after step k; logits and grad.<name> of
#                        the first step
import argparse
import copy
import gzip
import json
import os
import struct

import numpy as np
import torch
import torch.nn as nn

MEAN, STD = 0.2860, 0.3530  # the peer's Fashion-MNIST normalisation


class Net(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


def build(name):
    # The built-in models of docs/design.md, layer for layer as lowbit builds them.
    if name == "mlp":
        layers = [nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)]
    elif name == "lenet5":
        layers = [nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                  nn.Linear(84, 10)]
    elif name == "convbn":
        layers = [nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Flatten(), nn.Linear(3136, 128), nn.ReLU(), nn.Linear(128, 10)]
    else:
        raise SystemExit(f"unknown model '{name}' (choose mlp, lenet5 or convbn)")
    return Net(layers)


def state(model):
    # Parameters and buffers by lowbit's names; BatchNorm's num_batches_tracked has no lowbit twin.
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def save(path, tensors, metadata=None):
    # The safetensors layout: 8-byte little-endian header length, JSON header, raw little-endian data.
    dtypes = {np.float32: "F32", np.float64: "F64", np.uint8: "U8", np.int32: "I32"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        blob = array.tobytes()
        header[name] = {"dtype": dtypes[array.dtype.type], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def load_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def batches(steps, batch_size, seed, data_dir):
    count = steps * batch_size
    gen = np.random.default_rng(seed)
    if data_dir:
        images = load_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))
        labels = load_idx(os.path.join(data_dir, "train-labels-idx1-ubyte.gz"))
        pick = gen.permutation(len(labels))[:count]
        pixels, labels = images[pick], labels[pick].astype(np.int32)
    else:
        pixels = np.zeros((count, 28, 28), np.uint8)
        for img in pixels:  # a few bright bars on a black background
            for _ in range(3):
                r, c = gen.integers(2, 22, size=2)
                h, w = gen.integers(2, 7, size=2)
                img[r:r + h, c:c + w] = gen.integers(60, 256)
        labels = gen.integers(0, 10, size=count).astype(np.int32)
    x = torch.from_numpy(pixels.astype(np.float32)).div_(255.0).sub_(MEAN).div_(STD)
    return (x.reshape(steps, batch_size, 1, 28, 28), pixels.reshape(steps, batch_size, 28, 28),
            torch.from_numpy(labels.astype(np.int64)).reshape(steps, batch_size))


def adam_for(model, start=None):
    # The peer's optimizer; `start` (exact.safetensors' names at one step) sets its moments and step count.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if start is not None and start["step"] > 0:
        for name, p in model.named_parameters():
            opt.state[p] = {"step": torch.tensor(float(start["step"])),
                            "exp_avg": start["exp_avg"][name].to(p.dtype).clone(),
                            "exp_avg_sq": start["exp_avg_sq"][name].to(p.dtype).clone()}
    return opt


def one_step(model, opt, x, y):
    # One step of the peer's recipe: train mode, cross-entropy (mean over the batch), Adam.
    # Returns the loss, the logits and the gradients (taken before the update).
    model.train()
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = nn.CrossEntropyLoss()(logits, y)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    return loss.detach(), logits.detach().clone(), grads


def exact_trajectory(model, x, y):
    # The float64 run: the state at the start of every step (parameters, buffers and Adam's moments; the state
    # after the last step is number N), each step's loss, and the first step's logits and gradients.
    model = copy.deepcopy(model).double()
    opt = adam_for(model)
    out, losses = {}, []
    for step in range(x.shape[0]):
        out.update({f"state.{step}.{k}": v for k, v in state(model).items()})
        if step > 0:
            for name, p in model.named_parameters():
                out[f"exp_avg.{step}.{name}"] = opt.state[p]["exp_avg"].clone()
                out[f"exp_avg_sq.{step}.{name}"] = opt.state[p]["exp_avg_sq"].clone()
        loss, logits, grads = one_step(model, opt, x[step].double(), y[step])
        if step == 0:
            out["logits"] = logits
            out.update({f"grad.{k}": g for k, g in grads.items()})
        losses.append(loss)
    out.update({f"state.{x.shape[0]}.{k}": v for k, v in state(model).items()})
    out["loss"] = torch.stack(losses)
    return out


def float32_steps(model, x, y, exact):
    # PyTorch's float32 run of every step from the exact state at its start (rounded to float32), as ours runs
    # it: the loss and the state after the step. One step cannot compound rounding, so these stay comparable.
    out, losses = {}, []
    for step in range(x.shape[0]):
        m = copy.deepcopy(model)
        m.load_state_dict({k: exact[f"state.{step}.{k}"].float() for k in state(m)}, strict=False)
        start = {"step": step,
                 "exp_avg": {k: exact.get(f"exp_avg.{step}.{k}") for k, _ in m.named_parameters()},
                 "exp_avg_sq": {k: exact.get(f"exp_avg_sq.{step}.{k}") for k, _ in m.named_parameters()}}
        loss, logits, grads = one_step(m, adam_for(m, start), x[step], y[step])
        if step == 0:
            out["logits"] = logits
            out.update({f"grad.{k}": g for k, g in grads.items()})
        losses.append(loss)
        out.update({f"after.{step}.{k}": v for k, v in state(m).items()})
    out["loss"] = torch.stack(losses)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)

    model = build(a.model)
    x, pixels, y = batches(a.steps, a.batch_size, a.seed, a.data)
    save(os.path.join(a.out_dir, "init.safetensors"), {k: v.numpy() for k, v in state(model).items()},
         {"format": "lowbit-checkpoint", "format_version": "1", "model": a.model, "norm_mean": str(MEAN),
          "norm_std": str(STD)})
    save(os.path.join(a.out_dir, "batches.safetensors"),
         {"images": x.numpy(), "pixels": pixels, "labels": y.numpy().astype(np.int32)})

    exact = exact_trajectory(model, x, y)
    save(os.path.join(a.out_dir, "exact.safetensors"), {k: v.numpy() for k, v in exact.items()})
    torch32 = float32_steps(model, x, y, exact)
    save(os.path.join(a.out_dir, "torch.safetensors"), {k: v.numpy() for k, v in torch32.items()})

if __name__ == "__main__":
    main()
