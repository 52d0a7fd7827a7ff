#!/usr/bin/env python3
"""images_header.py DATA_DIR COUNT [--first F] [--raw]: COUNT test images of an MNIST-style folder, from image F
(default 0), as a C header (images.h), or with --raw as raw bytes on stdout (COUNT 0: all the rest)."""
import argparse
import gzip
import os
import struct
import sys


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("data")
    parser.add_argument("count", type=int)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()
    for name in ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"):
        for path, opener in ((os.path.join(args.data, name), open), (os.path.join(args.data, name + ".gz"), gzip.open)):
            if os.path.exists(path):
                with opener(path, "rb") as f:
                    raw = f.read()
                break
        else:
            continue
        break
    else:
        sys.exit(f"images_header.py: {args.data}: no t10k-images-idx3-ubyte(.gz) in this folder")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 2051:
        sys.exit(f"images_header.py: {path}: not an IDX image file (magic {magic}, expected 2051)")
    first = min(args.first, n)
    count = n - first if args.count == 0 else min(args.count, n - first)
    size = rows * cols
    pixels = raw[16 + first * size: 16 + (first + count) * size]
    if args.raw:
        sys.stdout.buffer.write(pixels)
        return
    print(f"/* images.h: test images {first} to {first + count - 1} of {path}, {rows}x{cols} uint8 pixels each. */")
    print(f"#define FIRST_IMAGE {first}\n#define NUM_IMAGES {count}\n#define IMAGE_BYTES {size}")
    print("static const uint8_t images[NUM_IMAGES][IMAGE_BYTES] = {")
    for i in range(count):
        print("  {" + ",".join(str(p) for p in pixels[i * size: (i + 1) * size]) + "},")
    print("};")


if __name__ == "__main__":
    main()
