# Reads a lowbit model file (safetensors layout) with numpy only: python3 docs/read_checkpoint.py FILE
import json, struct, sys
import numpy as np

DTYPES = {"F32": "<f4", "F64": "<f8", "I8": "i1", "U8": "u1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
with open(sys.argv[1], "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))  # 8-byte little-endian header length
    header = json.loads(f.read(header_len))          # JSON: name -> dtype, shape, data_offsets
    data = f.read()                                  # offsets are relative to this data area
for key, value in header.pop("__metadata__", {}).items():
    print(f"metadata {key} = {value}")
for name, entry in header.items():
    begin, end = entry["data_offsets"]
    array = np.frombuffer(data[begin:end], dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
    print(f"{name} {entry['dtype']} {list(array.shape)} {array.ravel()[:6].tolist()}")
