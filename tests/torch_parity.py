# PyTorch side of the float parity check (tests/test_torch_parity.cpp): N Adam steps of one model on fixed batches.
#
#   /usr/bin/python3 tests/torch_parity.py MODEL OUT_DIR [--steps N] [--batch-size B] [--seed S] [--data DIR]
#
# The model is the PyTorch peer's (../shared/bench/peer/peer.py: same layers, PyTorch's default init), written as
# one nn.Sequential named `layers`, so its tensors carry lowbit's checkpoint names (layers.0.weight, ...). The batches
# are the first N*B images of a seeded permutation of the Fashion-MNIST training set (--data) or, without it,
# synthetic MNIST-like images (dark background, bright strokes, so max-pool windows tie as on real data), normalised
# as the peer does: (pixel / 255 - 0.2860) / 0.3530 in float32. The recipe is the peer's: train mode, Adam with
# PyTorch's defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8), nn.CrossEntropyLoss (mean over the batch).
#
# Writes four files in the safetensors layout (docs/model-file-format.md) into OUT_DIR:
#   init.safetensors     the initial parameters and buffers as a lowbit checkpoint (format tag and version)
#   batches.safetensors  images F32 (N, B, 1, 28, 28), pixels U8 (N, B, 28, 28), labels I32 (N, B)
#   torch.safetensors    loss F32 (N): the loss of each step, before its update
#                        logits F32 (B, 10): the first step's forward output
#                        grad.<name>: the first step's gradient of each parameter
#                        step1.<name>: each parameter after the first update
#                        final.<name>: each parameter and buffer after the N steps
#   exact.safetensors    the same from the same start in float64 (F64): the exact arithmetic that both float32
#                        runs approximate, to tell a rounding difference from a real one
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
    # The layers of ../shared/DESIGN.md, in the order of lowbit's model zoo (nn/zoo.cpp).
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


def train(model, x, y):
    # The peer's recipe, one step per batch of x; returns what torch.safetensors holds, in the model's dtype.
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    losses, out = [], {}
    for step in range(x.shape[0]):
        opt.zero_grad(set_to_none=True)
        logits = model(x[step])
        loss = loss_fn(logits, y[step])
        loss.backward()
        if step == 0:
            out["logits"] = logits.detach().clone()
            out.update({f"grad.{k}": p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
        if step == 0:
            out.update({f"step1.{k}": p.detach().clone() for k, p in model.named_parameters()})
        losses.append(loss.detach())
    out["loss"] = torch.stack(losses)
    out.update({f"final.{k}": v for k, v in state(model).items()})
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

    out = train(copy.deepcopy(model), x, y)
    save(os.path.join(a.out_dir, "torch.safetensors"), {k: v.numpy() for k, v in out.items()})
    out = train(copy.deepcopy(model).double(), x.double(), y)
    save(os.path.join(a.out_dir, "exact.safetensors"), {k: v.numpy() for k, v in out.items()})

if __name__ == "__main__":
    main()
