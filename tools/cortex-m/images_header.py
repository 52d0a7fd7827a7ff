#!/usr/bin/env python3
"""images_header.py DATA_DIR COUNT [--raw]: the first COUNT test images of an MNIST-style folder as a C header
(images.h), or with --raw as raw bytes on stdout (COUNT 0: all of them)."""
import gzip
import os
import struct
import sys


def main():
    data, count, raw_out = sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["--raw"]
    for name in ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"):
        for path, opener in ((os.path.join(data, name), open), (os.path.join(data, name + ".gz"), gzip.open)):
            if os.path.exists(path):
                with opener(path, "rb") as f:
                    raw = f.read()
                break
        else:
            continue
        break
    else:
        sys.exit(f"images_header.py: {data}: no t10k-images-idx3-ubyte(.gz) in this folder")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 2051:
        sys.exit(f"images_header.py: {path}: not an IDX image file (magic {magic}, expected 2051)")
    count = n if count == 0 else min(count, n)
    size = rows * cols
    if raw_out:
        sys.stdout.buffer.write(raw[16: 16 + count * size])
        return
    print(f"/* images.h: the first {count} test images of {path}, {rows}x{cols} uint8 pixels each. */")
    print(f"#define NUM_IMAGES {count}\n#define IMAGE_BYTES {size}")
    print(f"static const uint8_t images[NUM_IMAGES][IMAGE_BYTES] = {{")
    for i in range(count):
        pixels = raw[16 + i * size: 16 + (i + 1) * size]
        print("  {" + ",".join(str(p) for p in pixels) + "},")
    print("};")


if __name__ == "__main__":
    main()
