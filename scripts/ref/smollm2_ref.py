#!/usr/bin/env python3
"""Reference for SmolLM2-135M-Instruct, the model of record being the fp32 weights obtained by
dequantising each tensor of the Q4_1 GGUF exactly as gguf-py does (gguf.quants.dequantize).

Independent of troupe: it reads the GGUF with gguf-py, builds the tokenizer with HF
`tokenizers` from the GGUF's vocab and merges, and runs a plain numpy forward:

  token_embd (tied output) -> 30 x [RMSNorm -> q, k, v -> RoPE (llama.cpp's "normal" mode:
  adjacent pairs (2i, 2i+1), theta = pos * base^(-2i/64)) -> grouped-query attention (9 query
  heads over 3 KV heads, causal, scale 1/8) -> output projection -> residual -> RMSNorm ->
  SwiGLU (down(silu(gate(x)) * up(x))) -> residual] -> RMSNorm -> logits = x @ token_embd^T

in float64 on the fp32 weights, so the reference's own rounding is far below any tolerance.

Commands (scripts/ref/setup.sh makes the environment):
  smollm2_ref.py --gguf FILE digests --out FILE.json
      sha256 of each dequantised tensor (float32, little-endian, row-major as gguf-py shapes
      it): what troupe's own dequantisation must reproduce bit for bit.
  smollm2_ref.py --gguf FILE generate --prompts FILE.jsonl --out FILE.json
      [--max-tokens 32] [--top-k 10]
      Greedy continuations. Each input line is {"prompt": "...", "chat": false}; with chat the
      prompt is the user message of the model's ChatML template (its default system message
      and the assistant turn's opening, as the template renders with add_generation_prompt).
      Per prompt: prompt_ids, token_ids, and per step the top-k ids and logits and the gap
      between the top two.
  smollm2_ref.py --gguf FILE tokenize --texts FILE.jsonl --out FILE.json
      Token ids of each {"text": "..."} from the independently built tokenizer.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize

CHAT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def dequantised(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor as float32, shaped as gguf-py shapes it (outermost dimension first)."""
    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = np.ascontiguousarray(w, dtype=np.float32).reshape(shape)
    return out


def tokenizer(reader: GGUFReader):
    """gpt2-style byte-level BPE with the `smollm` pre-tokenizer (every digit on its own, then
    the GPT-2 split), built from the GGUF's vocab and merges with HF tokenizers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Some byte values have no token (control bytes, bytes UTF-8 never uses): they become the
    # unknown token, as llama.cpp's tokenizer.ggml.unknown_token_id says.
    unk = tokens[int(field(reader, "tokenizer.ggml.unknown_token_id"))]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) match as whole units wherever they appear in the text.
    control = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    tok.add_special_tokens(control)
    return tok


def chat_prompt(user: str) -> str:
    return (
        f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


class Model:
    def __init__(self, reader: GGUFReader):
        self.layers = int(field(reader, "llama.block_count"))
        self.d = int(field(reader, "llama.embedding_length"))
        self.heads = int(field(reader, "llama.attention.head_count"))
        self.kv_heads = int(field(reader, "llama.attention.head_count_kv"))
        self.head_dim = self.d // self.heads
        self.eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
        self.base = float(field(reader, "llama.rope.freq_base"))
        w = dequantised(reader)
        self.w = {k: v.astype(np.float64) for k, v in w.items()}
        assert "output.weight" not in self.w, "expected tied embeddings"

    def rms(self, x, weight):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight

    def rope(self, x, positions):
        # x: (tokens, heads, head_dim); pairs (2i, 2i+1).
        half = self.head_dim // 2
        inv = self.base ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        angle = positions[:, None].astype(np.float64) * inv[None, :]
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def forward(self, ids, cache):
        """Logits of every position of `ids`, appended after the cached positions."""
        start = cache["len"]
        positions = np.arange(start, start + len(ids))
        x = self.w["token_embd.weight"][ids]
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"blk.{i}."
            h = self.rms(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(len(ids), self.heads, self.head_dim)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(len(ids), self.kv_heads, self.head_dim)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(len(ids), self.kv_heads, self.head_dim)
            q, k = self.rope(q, positions), self.rope(k, positions)
            ks = cache.setdefault(("k", i), np.zeros((0, self.kv_heads, self.head_dim)))
            vs = cache.setdefault(("v", i), np.zeros((0, self.kv_heads, self.head_dim)))
            ks = cache[("k", i)] = np.concatenate([ks, k])
            vs = cache[("v", i)] = np.concatenate([vs, v])
            total = len(ks)
            mask = np.arange(total)[None, :] > positions[:, None]
            out = np.empty((len(ids), self.heads, self.head_dim))
            for hq in range(self.heads):
                kv = hq // group
                scores = q[:, hq, :] @ ks[:, kv, :].T / np.sqrt(self.head_dim)
                scores[mask] = -np.inf
                scores -= scores.max(axis=-1, keepdims=True)
                weights = np.exp(scores)
                weights /= weights.sum(axis=-1, keepdims=True)
                out[:, hq, :] = weights @ vs[:, kv, :]
            x = x + out.reshape(len(ids), self.d) @ self.w[p + "attn_output.weight"].T
            h = self.rms(x, self.w[p + "ffn_norm.weight"])
            gate = h @ self.w[p + "ffn_gate.weight"].T
            up = h @ self.w[p + "ffn_up.weight"].T
            x = x + (gate / (1.0 + np.exp(-gate)) * up) @ self.w[p + "ffn_down.weight"].T
        cache["len"] = start + len(ids)
        x = self.rms(x, self.w["output_norm.weight"])
        return x @ self.w["token_embd.weight"].T


def write_lines(items, path):
    """A JSON array with one item per line: compact, and diffs show which item changed."""
    with open(path, "w", encoding="utf-8") as out:
        out.write("[\n")
        out.write(",\n".join(json.dumps(item, ensure_ascii=False) for item in items))
        out.write("\n]\n")


def cmd_digests(reader, args):
    out = {}
    for name, w in dequantised(reader).items():
        data = w.astype("<f4").tobytes()
        out[name] = {"shape": list(w.shape), "sha256": hashlib.sha256(data).hexdigest()}
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("{\n")
        f.write(",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(out.items())))
        f.write("\n}\n")


def cmd_generate(reader, args):
    tok = tokenizer(reader)
    model = Model(reader)
    eos = int(field(reader, "tokenizer.ggml.eos_token_id"))
    results = []
    for line in open(args.prompts, encoding="utf-8"):
        if not line.strip():
            continue
        item = json.loads(line)
        text = chat_prompt(item["prompt"]) if item.get("chat") else item["prompt"]
        prompt_ids = tok.encode(text, add_special_tokens=False).ids
        cache = {"len": 0}
        logits = model.forward(np.array(prompt_ids), cache)[-1]
        steps, generated = [], []
        for _ in range(args.max_tokens):
            top = np.argsort(-logits, kind="stable")[: args.top_k]
            steps.append(
                {
                    "top_ids": [int(t) for t in top],
                    "top_logits": [float(logits[t]) for t in top],
                    "gap": float(logits[top[0]] - logits[top[1]]),
                }
            )
            nxt = int(top[0])
            generated.append(nxt)
            if nxt == eos:
                break
            logits = model.forward(np.array([nxt]), cache)[-1]
        results.append(
            {
                "prompt": item["prompt"],
                "chat": bool(item.get("chat")),
                "max_tokens": args.max_tokens,
                "prompt_ids": prompt_ids,
                "token_ids": generated,
                "text": tok.decode(generated, skip_special_tokens=False),
                "steps": steps,
            }
        )
        print(f"{item['prompt'][:40]!r}: {results[-1]['text']!r}", file=sys.stderr)
    write_lines(results, args.out)


def cmd_tokenize(reader, args):
    tok = tokenizer(reader)
    out = []
    for line in open(args.texts, encoding="utf-8"):
        if not line.strip():
            continue
        text = json.loads(line)["text"]
        ids = tok.encode(text, add_special_tokens=False).ids
        out.append({"text": text, "ids": ids})
    write_lines(out, args.out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("digests")
    d.add_argument("--out", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--prompts", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--top-k", type=int, default=10)
    t = sub.add_parser("tokenize")
    t.add_argument("--texts", required=True)
    t.add_argument("--out", required=True)
    args = parser.parse_args()
    reader = GGUFReader(args.gguf)
    {"digests": cmd_digests, "generate": cmd_generate, "tokenize": cmd_tokenize}[args.command](reader, args)


if __name__ == "__main__":
    main()
