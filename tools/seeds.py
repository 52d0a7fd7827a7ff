#!/usr/bin/env python3
"""Float training with the PyTorch peer's recipe over many seeds, ours and the peer's: test accuracy per seed.

Issue 3 compares our float training with the peer's (Adam, lr 1e-3, batch 64, 2 epochs). One seed of
each is not a comparison: over seeds, the test accuracy after 2 epochs moves by about 0.5 points
(standard deviation) in both frameworks. This runs both for the given seeds, one at a time on one
thread, and prints each run as a JSON line, then the means, standard deviations and their difference.

    /usr/bin/python3 tools/seeds.py --model lenet5 --seeds 0-7            # ours and the peer's
    /usr/bin/python3 tools/seeds.py --model mlp --seeds 0-7 --side ours   # ours only
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seed_list(text):
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def ours(args, seed):
    with tempfile.TemporaryDirectory() as work:
        log = os.path.join(work, "log.jsonl")
        subprocess.run([os.path.join(args.bin, "train"), "--model", args.model, "--epochs", "2", "--schedule",
                        "constant", "--lr", "1e-3", "--batch-size", "64", "--optimizer", "adam", "--seed", str(seed),
                        "--threads", "1", "--data", args.data, "--out", os.path.join(work, "m.safetensors"),
                        "--log", log], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(log) as fh:
            return json.loads(fh.readlines()[-1])["test_accuracy"]


def peer_runner(args):
    sys.path.insert(0, os.path.dirname(args.peer))
    import peer  # noqa: E402  (the peer's own model classes, data loading, train_epoch and evaluate)
    import torch  # noqa: E402
    peer.set_threads(1)
    x_train, y_train = peer.load_split(args.data, "train")
    x_test, y_test = peer.load_split(args.data, "t10k")

    def run(seed):  # what peer.py's run_model does for the fp32 model
        torch.manual_seed(seed)
        model = peer.MODELS[args.model]()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(2):
            peer.train_epoch(model, opt, x_train, y_train, 64, gen)
        return peer.evaluate(model, x_test, y_test)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["mlp", "lenet5", "convbn"], required=True)
    ap.add_argument("--seeds", type=seed_list, default=seed_list("0-7"), help="a range, e.g. 0-7")
    ap.add_argument("--side", choices=["both", "ours", "peer"], default="both")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--peer", default=os.path.join(ROOT, "tools", "peer.py"), help="the PyTorch peer")
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    results = {"ours": [], "peer": []}
    sides = ["ours", "peer"] if args.side == "both" else [args.side]
    run_peer = peer_runner(args) if "peer" in sides else None
    for seed in args.seeds:
        for side in sides:
            acc = ours(args, seed) if side == "ours" else run_peer(seed)
            results[side].append(100 * acc)
            print(json.dumps({"model": args.model, "side": side, "seed": seed, "test_accuracy": acc}), flush=True)
    for side in sides:
        v = results[side]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{side}: {len(v)} seeds, mean {statistics.mean(v):.2f}%, standard deviation {sd:.2f}")
    if len(sides) == 2 and len(args.seeds) > 1:
        a, b = results["ours"], results["peer"]
        se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        print(f"ours - peer: {statistics.mean(a) - statistics.mean(b):+.2f} points (standard error {se:.2f})")


if __name__ == "__main__":
    main()
