#!/usr/bin/env python3
"""The summary of one scripts/bench.sh run, as Markdown: the machine, a table of the headline
ratios (median over the runs, min-max across them), a table per part, the plots, and what was
skipped or failed and why. Printed on stdout; with --doc, also written into that file between
the `<!-- bench.sh:begin -->` and `<!-- bench.sh:end -->` markers (the rest of the file stays).

usage: bench-summary.py OUT_DIR [--img DIR] [--doc docs/benchmarks.md]
Reads only what the per-area scripts left in OUT_DIR (see scripts/bench.sh); standard library only.
"""
import argparse
import glob
import json
import os
import re
import statistics
import sys

BEGIN, END = "<!-- bench.sh:begin -->", "<!-- bench.sh:end -->"
PARTS = ["engine", "serve", "raft", "rollout", "scaleout", "tls", "generate"]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def runs(out, part, name):
    """The JSON file `name` of each run of a part, in run order (r1, r2, ...)."""
    dirs = sorted(glob.glob(os.path.join(out, part, "r*")), key=lambda d: int(re.sub(r"\D", "", os.path.basename(d)) or 0))
    return [doc for doc in (load(os.path.join(d, name)) for d in dirs if os.path.isdir(d)) if doc is not None]


def num(v, digits=None):
    if v is None or v != v:
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2
    text = f"{v:,.{digits}f}".replace(",", " ")
    return text


def med(values):
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else None


def ratio_cell(ratios, unit="run"):
    """'1.23x', '1.10-1.30 (3 runs)': the median of the per-run ratios, and their range."""
    ratios = [r for r in ratios if r is not None and r == r]
    if not ratios:
        return "-", "-"
    m = statistics.median(ratios)
    spread = f"{min(ratios):.2f}-{max(ratios):.2f} ({plural(len(ratios), unit)})" if len(ratios) > 1 else f"1 {unit}"
    return f"{m:.2f}x", spread


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def div(a, b):
    return a / b if a is not None and b else None


class Summary:
    def __init__(self, out, img):
        self.out, self.img = out, img
        self.headline = []  # (comparison, figure, troupe, peer, ratio, spread)
        self.sections = []
        self.status = {p: load(os.path.join(out, "status", f"{p}.json")) for p in PARTS}

    def head(self, comparison, figure, troupe, peer, ratios, unit="run"):
        r, spread = ratio_cell(ratios, unit)
        self.headline.append((comparison, figure, troupe, peer, r, spread))

    # -- engine ---------------------------------------------------------------------------
    def engine(self):
        doc = load(os.path.join(self.out, "engine", "run", "engine.json"))
        if not doc:
            return
        sides = doc["sides"]  # engine -> one list of points per round
        T, O, N = "troupe_fp32", "ort_fp32", "numpy"
        extra = [s for s in sides if s not in (T, O, N)]
        names = {"troupe_int8": "troupe int8", "ort_int8_package": "ORT int8 (package graph)",
                 "ort_int8_dynamic": "ORT int8 (dynamic)"}

        def values(side, key):
            """Sentences/s of one engine at one point, round by round."""
            return [next((p["sentences_per_s"] for p in points if (p["tokens"], p["batch"]) == key), None)
                    for points in sides.get(side, [])]

        def ratios(a, b, key):
            return [div(x, y) for x, y in zip(values(a, key), values(b, key))]

        rounds = doc.get("rounds", 1)
        keys = sorted({(p["tokens"], p["batch"]) for points in sides.get(T, []) for p in points})
        lines = [f"### Engine against numpy and ONNX Runtime fp32 (`scripts/bench-engine.sh`, {plural(rounds, 'round')})", "",
                 f"Sentences/s end to end, {doc['threads']} threads, at least {doc['min_time_s']} s per point; the "
                 "engines' order rotates between rounds. Medians over the rounds; each ratio is taken within a round.", ""]
        header = "| tokens | batch | troupe | numpy | ONNX Runtime | troupe / numpy | troupe / ORT | spread of troupe / ORT |"
        align = "|---:|---:|---:|---:|---:|---:|---:|---|"
        for s in extra:
            header += f" {names.get(s, s)} | {names.get(s, s)} / troupe fp32 |"
            align += "---:|---:|"
        lines += [header, align]
        int8 = "troupe_int8" if "troupe_int8" in sides else None
        ort8 = next((s for s in ("ort_int8_package", "ort_int8_dynamic") if s in sides), None)
        for key in keys:
            t, n, o = values(T, key), values(N, key), values(O, key)
            r_to, spread = ratio_cell(ratios(T, O, key), "round")
            row = (f"| {key[0]} | {key[1]} | {num(med(t))} | {num(med(n))} | {num(med(o))} | "
                   f"{ratio_cell(ratios(T, N, key))[0]} | {r_to} | {spread} |")
            for s in extra:
                row += f" {num(med(values(s, key)))} | {ratio_cell(ratios(s, T, key))[0]} |"
            lines.append(row)
            if key in ((16, 1), (128, 1), (128, 32)):
                self.head("engine vs ONNX Runtime fp32", f"{key[0]} tokens x batch {key[1]}: sentences/s",
                          num(med(t)), num(med(o)), ratios(T, O, key), "round")
            if int8 and key == (128, 32):
                self.head("engine int8 vs troupe fp32", "128 tokens x batch 32: sentences/s",
                          num(med(values(int8, key))), num(med(t)), ratios(int8, T, key), "round")
                if ort8:
                    self.head(f"engine int8 vs {names[ort8]}", "128 tokens x batch 32: sentences/s",
                              num(med(values(int8, key))), num(med(values(ort8, key))), ratios(int8, ort8, key), "round")
        if doc.get("gemm"):
            lines += ["", f"GEMM probe, round 1: `{doc['gemm']}`"]
        if not int8:
            lines += ["", "No int8 engine ran: scripts/bench-engine.sh has no int8 mode in this build."]
        self.sections.append("\n".join(lines))

    # -- serve ------------------------------------------------------------------------------
    def serve(self):
        dirs = sorted(glob.glob(os.path.join(self.out, "serve", "r*")))
        dirs = [d for d in dirs if os.path.isdir(d) and load(os.path.join(d, "troupe.json"))]
        if not dirs:
            return
        troupe = [load(os.path.join(d, "troupe.json")) for d in dirs]
        ray = []
        for d in dirs:
            points, raw = {}, {}
            path = os.path.join(d, "ray", "results.jsonl")
            if os.path.exists(path):
                for line in open(path):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    if rec.get("tokens") != 16:
                        continue
                    if rec["label"] == "raw-ort":
                        raw[rec["batch"]] = rec["sentences_per_sec"]
                    else:
                        points[rec["concurrency"]] = rec
            ray.append((points, raw))
        concs = sorted({p["concurrency"] for t in troupe for p in t["points"]})

        def tp(doc, c):
            return next((p for p in doc["points"] if p["concurrency"] == c), None)

        lines = [f"### Serving against Ray Serve (`scripts/bench-serve.sh`, {plural(len(dirs), 'run')})", "",
                 f"One node, 16-token sentences, closed loop, {troupe[0]['seconds']:.0f} s per point; Ray Serve "
                 "(`@serve.batch` max 32 / 5 ms, ONNX Runtime fp32) right after, in the same run. Medians over the runs.", "",
                 "| clients | troupe req/s | p50 / p99 ms | mean batch | Ray Serve req/s | p50 / p99 ms | Ray mean batch | troupe / Ray | spread |",
                 "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in concs:
            t = [tp(doc, c) for doc in troupe]
            r = [pts.get(c) for pts, _ in ray]
            rr = [div(a and a["throughput"], b and b["rps"]) for a, b in zip(t, r)]
            cell_r, spread = ratio_cell(rr)
            tv = [p for p in t if p]
            rv = [p for p in r if p]
            ray_cells = (f"{num(med([p['rps'] for p in rv]))} | {num(med([p['p50_ms'] for p in rv]))} / "
                         f"{num(med([p['p99_ms'] for p in rv]))} | {num(med([p.get('mean_batch_requests') for p in rv]))}"
                         if rv else "- | - | -")
            lines.append(f"| {c} | {num(med([p['throughput'] for p in tv]))} | {num(med([p['p50_ms'] for p in tv]))} / "
                         f"{num(med([p['p99_ms'] for p in tv]))} | {num(med([p['mean_batch'] for p in tv]))} | "
                         f"{ray_cells} | {cell_r if rv else '-'} | {spread if rv else '-'} |")
            if rv and c in (1, 16, 64):
                self.head("serving vs Ray Serve", f"{c} client{'s' if c > 1 else ''}: req/s",
                          num(med([p['throughput'] for p in tv])), num(med([p['rps'] for p in rv])), rr)
        gains = [doc.get("batching_gain") for doc in troupe]
        effs = [doc.get("serving_efficiency") for doc in troupe]
        ray_gain = [div(pts[16]["rps"], pts[1]["rps"]) if 16 in pts and 1 in pts else None for pts, _ in ray]
        ray_eff = [div(max((p["rps"] for p in pts.values()), default=None), raw.get(32)) if pts else None
                   for pts, raw in ray]
        lines += ["", "| figure | troupe (median; per run) | Ray Serve (median; per run) |", "|---|---|---|",
                  f"| batching gain, 16 clients / 1 | {num(med(gains))}; {', '.join(num(g) for g in gains)} | "
                  f"{num(med(ray_gain))}; {', '.join(num(g) for g in ray_gain)} |",
                  f"| serving efficiency: best req/s / raw engine at that batch | {num(med(effs))}; "
                  f"{', '.join(num(e) for e in effs)} | {num(med(ray_eff))}; {', '.join(num(e) for e in ray_eff)} (raw ORT batch 32) |"]
        hist = load(os.path.join(dirs[-1], "batch-size.json"))
        if hist and hist.get("batches"):
            def span(b):
                if b["up_to"] is None:
                    return f"over {b['above']}"
                return str(b["up_to"]) if b["up_to"] == b["above"] + 1 else f"{b['above'] + 1}-{b['up_to']}"
            buckets = ", ".join(f"{span(b)}: {b['batches']}" for b in hist["buckets"] if b["batches"])
            lines += ["", f"Node batch sizes over run {len(dirs)} (all client counts; /metrics buckets, batches): "
                          f"{buckets}; mean {hist['texts'] / hist['batches']:.1f} texts per batch."]
        self.sections.append("\n".join(lines))

    # -- raft -------------------------------------------------------------------------------
    def raft(self):
        docs = runs(self.out, "raft", "defaults.json")
        if not docs:
            return

        def store(doc, kind):
            return next((s for s in doc["stores"] if s["store"] == kind), None)

        def put(doc, kind, c):
            s = store(doc, kind)
            return next((p for p in s["put"] if p["clients"] == c), None) if s else None

        clients = sorted({p["clients"] for d in docs for s in d["stores"] for p in s["put"]})
        have_etcd = any(store(d, "etcd") for d in docs)
        lines = [f"### Metadata store against etcd (`scripts/bench-raft.sh`, {plural(len(docs), 'run')})", "",
                 f"3 members each on 127.0.0.1, 256-byte puts, {docs[0]['seconds']:.0f} s per point, one Rust load "
                 "generator for both; each store at its defaults; a fresh pair of clusters per run. Medians over the runs.", "",
                 "| test | troupe | etcd | troupe / etcd | spread |", "|---|---:|---:|---:|---|"]

        def row(label, get, headline=None):
            t = [get(d, "troupe") for d in docs]
            e = [get(d, "etcd") for d in docs]
            r, spread = ratio_cell([div(a, b) for a, b in zip(t, e)])
            lines.append(f"| {label} | {num(med(t))} | {num(med(e))} | {r} | {spread} |")
            if headline and have_etcd:
                self.head("Raft vs etcd", headline, num(med(t)), num(med(e)), [div(a, b) for a, b in zip(t, e)])

        for c in clients:
            row(f"put, {c} client{'s' if c > 1 else ''}: ops/s",
                lambda d, k, c=c: (put(d, k, c) or {}).get("ops_per_s"),
                f"puts, {c} client{'s' if c > 1 else ''}: ops/s" if c in (1, 64) else None)
            row(f"put, {c} client{'s' if c > 1 else ''}: p50 ms",
                lambda d, k, c=c: ((put(d, k, c) or {}).get("latency") or {}).get("p50_ms"),
                "put, 1 client: p50 ms (lower is better)" if c == 1 else None)
            row(f"put, {c} client{'s' if c > 1 else ''}: p99 ms",
                lambda d, k, c=c: ((put(d, k, c) or {}).get("latency") or {}).get("p99_ms"))
        row("CAS, 16 clients on 8 keys: successes/s", lambda d, k: ((store(d, k) or {}).get("cas") or {}).get("cas_ok_per_s"),
            "CAS, 16 clients / 8 keys: successes/s")
        lost = [((store(d, k) or {}).get("cas") or {}).get("lost_update_check_ok") for d in docs for k in ("troupe", "etcd")]
        fail = {k: (store(docs[0], k) or {}).get("failover") for k in ("troupe", "etcd")}
        if any(fail.values()):
            kills = {k: [r["unavailable_s"] for r in (f or {}).get("rounds", []) if r["unavailable_s"] is not None]
                     for k, f in fail.items()}
            t, e = (fail[k] and fail[k]["median_s"] for k in ("troupe", "etcd"))
            lines.append(f"| failover (kill -9 of the leader, run 1): first put ok, median s | {num(t)} | {num(e)} | "
                         f"{ratio_cell([div(t, e)])[0]} | per kill: troupe {', '.join(num(v) for v in kills['troupe'])}; "
                         f"etcd {', '.join(num(v) for v in kills['etcd'])} |")
            if have_etcd:
                self.headline.append(("Raft vs etcd", f"failover after kill -9: median s over {len(kills['troupe'])} kills "
                                      "(lower is better)", num(t), num(e), ratio_cell([div(t, e)])[0],
                                      f"1 run; kills: troupe {num(min(kills['troupe'], default=None))}-"
                                      f"{num(max(kills['troupe'], default=None))} s, etcd "
                                      f"{num(min(kills['etcd'], default=None))}-{num(max(kills['etcd'], default=None))} s"))
        if any(v is False for v in lost):
            lines += ["", "**The CAS lost-update check failed in at least one run.**"]
        elif lost:
            lines += ["", "The CAS lost-update check held in every run, on both stores."]
        self.sections.append("\n".join(lines))

    # -- rollout and scale-out --------------------------------------------------------------
    def rollout(self):
        doc = load(os.path.join(self.out, "rollout", "run", "rollout.json"))
        if not doc or not doc["seconds"]:
            return
        s = doc["seconds"]
        self.headline.append(("rollout (no peer)", f"{doc['model_mb']:.0f} MB model, activate until active on 3 nodes: s",
                              num(med(s)), "goal ≤ 5", "-", f"{num(min(s))}-{num(max(s))} s ({len(s)} rollouts)"))
        self.sections.append("\n".join([
            f"### Rollout (`scripts/bench-cluster.sh`, {plural(len(s), 'fresh 3-node cluster')})", "",
            f"all-MiniLM-L6-v2 ({doc['model_mb']:.0f} MB) pushed to node 1, then `models activate --wait` until it "
            f"is active on all 3: {', '.join(num(v) for v in s)} s (median {num(med(s))} s; goal ≤ 5 s)."]))

    def scaleout(self):
        one = load(os.path.join(self.out, "scaleout", "run", "one-node.json"))
        three = load(os.path.join(self.out, "scaleout", "run", "three-nodes.json"))
        if not one or not three:
            return
        rounds = list(zip(one.get("rounds") or [one], three.get("rounds") or [three]))
        lines = [f"### Scale-out 1 → 3 nodes through one node (`scripts/bench-cluster.sh`, {plural(len(rounds), 'round')} in one run)", "",
                 "All three nodes share the same 2 cores, so 1.0x is the ceiling here. Round i of one node is "
                 "paired with round i of three nodes.", "",
                 "| clients | 1 node req/s | p50 / p99 ms | 3 nodes req/s | p50 / p99 ms | 3 nodes / 1 node | spread |",
                 "|---:|---:|---:|---:|---:|---:|---|"]
        for a, b in zip(one["points"], three["points"]):
            c = a["concurrency"]
            per = [div(next(q["throughput"] for q in y["points"] if q["concurrency"] == c),
                       next(q["throughput"] for q in x["points"] if q["concurrency"] == c)) for x, y in rounds]
            r, spread = ratio_cell(per, "round")
            lines.append(f"| {c} | {num(a['throughput'])} | {num(a['p50_ms'])} / {num(a['p99_ms'])} | "
                         f"{num(b['throughput'])} | {num(b['p50_ms'])} / {num(b['p99_ms'])} | {r} | {spread} |")
            if c == 64 or c == max(p["concurrency"] for p in one["points"]):
                self.head("scale-out 1 → 3 nodes (same 2 cores)", f"{c} clients through node 1: req/s",
                          num(b["throughput"]), f"{num(a['throughput'])} (1 node)", per, "round")
        self.sections.append("\n".join(lines))

    # -- tls --------------------------------------------------------------------------------
    def tls(self):
        d = os.path.join(self.out, "tls", "run")
        pairs = sorted({int(m[1]) for f in glob.glob(os.path.join(d, "raft-tls0-*.json"))
                        if (m := re.search(r"-(\d+)\.json$", f))})
        if not pairs:
            return

        def put(mode, pair, c, key):
            doc = load(os.path.join(d, f"raft-tls{mode}-{pair}.json"))
            p = next((p for p in doc["stores"][0]["put"] if p["clients"] == c), None) if doc else None
            return p and (p["ops_per_s"] if key == "ops" else p["latency"][key])

        def embed(mode, pair, key):
            doc = load(os.path.join(d, f"serve-tls{mode}-{pair}.json"))
            return doc and doc["points"][0][key]

        lines = [f"### What TLS costs (`scripts/bench-tls.sh`, {plural(len(pairs), 'alternating pair')})", "",
                 "The same workloads in plaintext and with mTLS, alternating; each ratio is TLS / plaintext within a pair.", "",
                 "| test | plaintext | mTLS | mTLS / plaintext | spread |", "|---|---:|---:|---:|---|"]
        for label, get, headline in [
            ("put, 64 clients: ops/s", lambda m, p: put(m, p, 64, "ops"), "puts, 64 clients: ops/s, mTLS / plaintext"),
            ("put, 64 clients: p50 ms", lambda m, p: put(m, p, 64, "p50_ms"), None),
            ("put, 1 client: ops/s", lambda m, p: put(m, p, 1, "ops"), None),
            ("put, 1 client: p50 ms", lambda m, p: put(m, p, 1, "p50_ms"), "put, 1 client: p50 ms, mTLS / plaintext"),
            ("Embed, 16 clients: req/s", lambda m, p: embed(m, p, "throughput"), "Embed, 16 clients: req/s, mTLS / plaintext"),
            ("Embed, 16 clients: p50 ms", lambda m, p: embed(m, p, "p50_ms"), None),
        ]:
            a = [get(0, p) for p in pairs]
            b = [get(1, p) for p in pairs]
            r, spread = ratio_cell([div(y, x) for x, y in zip(a, b)], "pair")
            lines.append(f"| {label} | {num(med(a))} | {num(med(b))} | {r} | {spread} |")
            if headline:
                self.head("TLS overhead", headline, num(med(b)), f"{num(med(a))} (plaintext)",
                          [div(y, x) for x, y in zip(a, b)], "pair")
        self.sections.append("\n".join(lines))

    # -- generate ---------------------------------------------------------------------------
    def generate(self):
        d = os.path.join(self.out, "generate", "run")
        eng = load(os.path.join(d, "engines.json"))
        lines = []
        if eng:
            lines += [f"### Generation against llama.cpp (`scripts/bench-generate.sh`, {plural(eng['rounds'], 'engine round')})", "",
                      "SmolLM2-135M-Instruct, the same Q4_1 GGUF, 2 threads each; rounds alternate the two engines.", "",
                      "| test | troupe tokens/s | llama.cpp tokens/s | troupe / llama.cpp | spread |", "|---|---:|---:|---:|---|"]
            for test, who in eng["tests"].items():
                t, l = who.get("troupe", []), who.get("llama", [])
                if not t or not l:
                    continue
                per = [div(a, b) for a, b in zip(t, l)]
                r, spread = ratio_cell(per, "round")
                lines.append(f"| {test} | {num(med(t))} | {num(med(l))} | {r} | {spread} |")
                if test.startswith("decode, 1 stream (128") or test.startswith("decode, 16 streams") or test == "prefill 128":
                    self.head("generation vs llama.cpp", f"{test}: tokens/s", num(med(t)), num(med(l)), per, "round")
        serve = {s: load(os.path.join(d, f"serve-{s}.json")) for s in ("llama", "troupe-http", "troupe-grpc")}
        if all(serve.values()):
            lines += ["", "Serving, closed-loop streams of 64 tokens (one run): llama-server against one troupe node's "
                          "OpenAI port and its gRPC Generate, through the same load generator.", "",
                      "| streams | llama-server tokens/s | troupe HTTP tokens/s | troupe / llama | troupe gRPC tokens/s | "
                      "TTFT p50 llama / troupe ms | ITL p99 llama / troupe ms |",
                      "|---:|---:|---:|---:|---:|---:|---:|"]
            for l, h, g in zip(serve["llama"]["serve"], serve["troupe-http"]["serve"], serve["troupe-grpc"]["serve"]):
                lines.append(f"| {l['streams']} | {num(l['tokens_per_s'])} | {num(h['tokens_per_s'])} | "
                             f"{ratio_cell([div(h['tokens_per_s'], l['tokens_per_s'])])[0]} | {num(g['tokens_per_s'])} | "
                             f"{num(l['ttft_p50_ms'])} / {num(h['ttft_p50_ms'])} | {num(l['itl_p99_ms'])} / {num(h['itl_p99_ms'])} |")
        if lines:
            self.sections.append("\n".join(lines))

    # -- the whole --------------------------------------------------------------------------
    def render(self, plots):
        m = load(os.path.join(self.out, "machine.json")) or {}
        st = m.get("settings", {})
        for part in PARTS:
            getattr(self, part)()
        out = [BEGIN,
               "## Latest run of `scripts/bench.sh`",
               "",
               "_Generated by `scripts/bench.sh` (this section is rewritten by each run; the hand-written history "
               "follows it)._",
               "",
               f"- **When:** {m.get('started_utc', '?')} – {m.get('finished_utc', '?')} UTC, commit `{m.get('commit', '?')}`"
               f"{' (with uncommitted changes)' if m.get('dirty') else ''}.",
               f"- **Machine:** {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
               f"{', '.join(m.get('flags', [])) or 'no AVX-512 or VNNI flags'}, {m.get('ram_gib', '?')} GiB RAM, "
               f"Linux {m.get('kernel', '?')}. Shared and noisy: compare ratios, not absolute figures.",
               f"- **Settings:** parts `{st.get('parts', '?')}`; ROUNDS={st.get('rounds', '?')} (engine rounds, "
               f"serving and Raft runs, rollouts), {st.get('slow_rounds', '?')} for the slow parts (scale-out rounds, "
               f"TLS pairs, generation engine rounds); {st.get('seconds_per_point', '?')} s per load point "
               f"({st.get('gen_seconds', '?')} s for generation serving), engine points ≥ {st.get('engine_min_time', '?')} s, "
               f"{st.get('failover_rounds', '?')} leader kills{'; QUICK mode (a smoke test)' if st.get('quick') == '1' else ''}.",
               "",
               "Each ratio is taken within one run (troupe and its peer measured minutes apart on the same machine); "
               "the table shows the median over the runs and the min-max across them.",
               "",
               "| comparison | figure | troupe | peer | troupe / peer | run-to-run spread |",
               "|---|---|---:|---:|---:|---|"]
        for row in self.headline:
            out.append("| " + " | ".join(row) + " |")
        notes = []
        for part in PARTS:
            s = self.status.get(part)
            if s is None:
                continue
            if s["state"] in ("skipped", "failed", "partial"):
                notes.append(f"- **{part}: {s['state']}** ({s['seconds']} s): {s['note']}")
        if notes:
            out += ["", "Not measured in this run, and why:", ""] + notes
        samples = []
        try:
            samples = [tuple(map(float, line.split())) for line in open(os.path.join(self.out, "load.txt")) if line.strip()]
        except OSError:
            pass
        ran = []
        for p in PARTS:
            s = self.status.get(p)
            if not s:
                continue
            cell = f"{p} {s['seconds'] // 60} min {s['seconds'] % 60} s"
            during = [v for t, v in samples if s.get("ended_epoch", 0) - s["seconds"] <= t <= s.get("ended_epoch", 0)]
            if during:
                cell += f" (load {statistics.mean(during):.1f}, max {max(during):.1f})"
            ran.append(cell)
        out += ["", f"Time per part: {', '.join(ran)}. Load: the machine's 1-minute load average during the part "
                    "(sampled every 5 s); about 2 is this benchmark alone on 2 cores, more means other work was "
                    "running and the absolute figures suffer."]
        for section in self.sections:
            out += ["", section]
        if plots:
            out += ["", "### Plots", ""]
            for name, title in plots:
                out.append(f"![{title}]({name})")
                out.append("")
        out.append(END)
        return "\n".join(out)


PLOT_TITLES = [
    ("engine.png", "Engine speed against batch size: troupe, ONNX Runtime, numpy"),
    ("serve-latency.png", "Serving: p50 and p99 latency against throughput, troupe and Ray Serve"),
    ("batch-size.png", "Batch sizes of the serving node (from /metrics)"),
    ("raft-latency.png", "Puts: p50 and p99 latency against throughput, troupe and etcd"),
    ("failover.png", "Acknowledged probe puts around each leader kill, troupe and etcd"),
    ("generate.png", "Generation: tokens/s against streams, troupe and llama.cpp"),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--img", help="folder of the plots (only those scripts/plots.py made in this run are linked)")
    ap.add_argument("--doc", help="Markdown file whose generated section to rewrite")
    a = ap.parse_args()
    made = (load(os.path.join(a.out, "plots.json")) or {}).get("plots", [])
    plots = []
    base = os.path.dirname(os.path.abspath(a.doc)) if a.doc else a.out
    for name, title in PLOT_TITLES:
        if a.img and name in made:
            plots.append((os.path.relpath(os.path.join(a.img, name), base), title))
    text = Summary(a.out, a.img).render(plots)
    print(text)
    if a.doc:
        doc = open(a.doc).read()
        if BEGIN not in doc or END not in doc:
            sys.exit(f"{a.doc} has no {BEGIN} ... {END} markers")
        before, rest = doc.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        open(a.doc, "w").write(before + text + after)


if __name__ == "__main__":
    main()
