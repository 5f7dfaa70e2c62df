#!/usr/bin/env python3
"""PNG plots of one scripts/bench.sh run, from the JSON the per-area scripts left in OUT_DIR.

usage: plots.py OUT_DIR IMG_DIR
Makes, when the data is there: engine.png (speed against batch size), serve-latency.png and
raft-latency.png (p50/p99 latency against throughput over the client counts), batch-size.png
(the serving node's batch sizes from /metrics), failover.png (acknowledged probe puts around
each leader kill) and generate.png (tokens/s against streams). Lists what it made in
OUT_DIR/plots.json. Needs matplotlib (scripts/bench.sh makes a venv for it under $TROUPE_HOME).
"""
import glob
import json
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"troupe": "tab:blue", "troupe_fp32": "tab:blue", "troupe_int8": "tab:cyan", "ort": "tab:orange",
          "ort_fp32": "tab:orange", "ort_int8_package": "tab:olive", "ort_int8_dynamic": "tab:pink",
          "numpy": "tab:green", "ray": "tab:red",
          "etcd": "tab:purple", "llama": "tab:brown", "llama-server": "tab:brown", "troupe-http": "tab:blue",
          "troupe-grpc": "tab:cyan"}
NAMES = {"troupe": "troupe", "troupe_fp32": "troupe fp32", "troupe_int8": "troupe int8",
         "ort_int8_package": "ONNX Runtime int8 (package graph)", "ort_int8_dynamic": "ONNX Runtime int8 (dynamic)",
         "ort": "ONNX Runtime fp32", "ort_fp32": "ONNX Runtime fp32", "numpy": "numpy reference", "ray": "Ray Serve",
         "etcd": "etcd 3.4", "llama": "llama.cpp", "troupe-http": "troupe (OpenAI HTTP)",
         "troupe-grpc": "troupe (gRPC)", "llama-server": "llama-server"}


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_dirs(out, part):
    dirs = [d for d in glob.glob(os.path.join(out, part, "r*")) if os.path.isdir(d)]
    return sorted(dirs, key=lambda d: int(re.sub(r"\D", "", os.path.basename(d)) or 0))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def save(fig, img, name, made):
    fig.tight_layout()
    fig.savefig(os.path.join(img, name), dpi=110)
    plt.close(fig)
    made.append(name)


def engine(out, img, made):
    doc = load(os.path.join(out, "engine", "run", "engine.json"))
    if not doc:
        return
    sides = doc["sides"]  # engine -> one list of points per round
    tokens = sorted({p["tokens"] for rounds in sides.values() for points in rounds for p in points})
    fig, axes = plt.subplots(1, len(tokens), figsize=(5.5 * len(tokens), 4.2), squeeze=False)
    for ax, t in zip(axes[0], tokens):
        for side, rounds in sides.items():
            batches = sorted({p["batch"] for points in rounds for p in points if p["tokens"] == t})
            if not batches:
                continue
            per = [[p["sentences_per_s"] for points in rounds for p in points if p["tokens"] == t and p["batch"] == b]
                   for b in batches]
            mid = [statistics.median(v) for v in per]
            err = [[m - min(v) for m, v in zip(mid, per)], [max(v) - m for m, v in zip(mid, per)]]
            ax.errorbar(batches, mid, yerr=err, marker="o", capsize=3, label=NAMES.get(side, side),
                        color=COLORS.get(side), linestyle="--" if "int8" in side else "-")
        ax.set_xscale("log", base=2)
        ticks = sorted({p["batch"] for rounds in sides.values() for points in rounds for p in points if p["tokens"] == t})
        ax.set_xticks(ticks, [str(b) for b in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size (sentences)")
        ax.set_ylabel("sentences/s")
        ax.set_title(f"{t} tokens per sentence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Engine, all-MiniLM-L6-v2, {doc['threads']} threads (median of {doc.get('rounds', 1)} rounds, "
                 "bars: min-max)")
    save(fig, img, "engine.png", made)


def latency_curves(ax_title, series, img, name, made, unit):
    """series: {label: [(clients, throughput, p50, p99)]}."""
    if not any(series.values()):
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        if not points:
            continue
        points.sort()
        color = COLORS.get(label)
        x = [p[1] for p in points]
        ax.plot(x, [p[2] for p in points], marker="o", color=color, label=f"{NAMES.get(label, label)} p50")
        ax.plot(x, [p[3] for p in points], marker="^", linestyle="--", color=color, label=f"{NAMES.get(label, label)} p99")
        for c, tp, p50, _ in points:
            ax.annotate(f"{c}", (tp, p50), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
    ax.set_yscale("log")
    ax.set_xlabel(f"throughput ({unit}/s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(ax_title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, img, name, made)


def serve(out, img, made):
    dirs = run_dirs(out, "serve")
    troupe = [d for d in (load(os.path.join(r, "troupe.json")) for r in dirs) if d]
    if not troupe:
        return
    series = {"troupe": [], "ray": []}
    for c in sorted({p["concurrency"] for d in troupe for p in d["points"]}):
        pts = [p for d in troupe for p in d["points"] if p["concurrency"] == c]
        series["troupe"].append((c, med([p["throughput"] for p in pts]), med([p["p50_ms"] for p in pts]),
                                 med([p["p99_ms"] for p in pts])))
    ray = {}
    for r in dirs:
        path = os.path.join(r, "ray", "results.jsonl")
        if os.path.exists(path):
            for line in open(path):
                rec = json.loads(line) if line.strip() else {}
                if rec.get("label") == "ray-serve" and rec.get("tokens") == 16:
                    ray.setdefault(rec["concurrency"], []).append(rec)
    for c, recs in sorted(ray.items()):
        series["ray"].append((c, med([p["rps"] for p in recs]), med([p["p50_ms"] for p in recs]),
                              med([p["p99_ms"] for p in recs])))
    latency_curves(f"Embed serving, 16-token sentences (medians of {len(troupe)} runs; labels: clients)",
                   series, img, "serve-latency.png", made, "requests")
    hist = load(os.path.join(dirs[-1], "batch-size.json")) if dirs else None
    if hist and hist.get("batches"):
        last = max(i for i, b in enumerate(hist["buckets"]) if b["batches"])
        buckets = hist["buckets"][:last + 1]
        labels = [f"{b['above'] + 1}" if b["up_to"] == b["above"] + 1 else
                  (f"{b['above'] + 1}-{b['up_to']}" if b["up_to"] else f">{b['above']}") for b in buckets]
        labels[0] = "1" if buckets[0]["up_to"] == 1 else labels[0]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.bar(labels, [b["batches"] for b in buckets], color=COLORS["troupe"])
        ax.set_xlabel("texts per forward pass (histogram bucket)")
        ax.set_ylabel("batches")
        ax.set_title(f"Serving node's batch sizes over run {len(dirs)} (all client counts; "
                     f"mean {hist['texts'] / hist['batches']:.1f})")
        ax.grid(alpha=0.3, axis="y")
        save(fig, img, "batch-size.png", made)


def raft(out, img, made):
    docs = [d for d in (load(os.path.join(r, "defaults.json")) for r in run_dirs(out, "raft")) if d]
    if not docs:
        return
    series = {}
    for kind in ("troupe", "etcd"):
        puts = [p for d in docs for s in d["stores"] if s["store"] == kind for p in s["put"]]
        for c in sorted({p["clients"] for p in puts}):
            pts = [p for p in puts if p["clients"] == c]
            series.setdefault(kind, []).append((c, med([p["ops_per_s"] for p in pts]),
                                                med([p["latency"]["p50_ms"] for p in pts]),
                                                med([p["latency"]["p99_ms"] for p in pts])))
    latency_curves(f"256-byte puts, 3 members (medians of {len(docs)} runs; labels: clients)", series, img,
                   "raft-latency.png", made, "puts")
    stores = [(s["store"], s["failover"]) for s in docs[0]["stores"] if s.get("failover")]
    stores = [(k, f) for k, f in stores if any(r.get("timeline") for r in f["rounds"])]
    if not stores:
        return
    fig, axes = plt.subplots(1, len(stores), figsize=(6 * len(stores), 4.2), squeeze=False, sharey=True)
    width = 0.1
    for ax, (kind, fail) in zip(axes[0], stores):
        for r in fail["rounds"]:
            timeline = r.get("timeline") or []
            if not timeline:
                continue
            end = max(p["done_s"] for p in timeline)
            bins = [0] * (int(end / width) + 1)
            for p in timeline:
                if p["ok"]:
                    bins[min(int(p["done_s"] / width), len(bins) - 1)] += 1
            xs = [i * width for i in range(len(bins))]
            line, = ax.plot(xs, [b / width for b in bins], drawstyle="steps-post", linewidth=1,
                            label=f"kill {r['round']} (member {r['faulty_member']}): "
                                  f"{r['unavailable_s']:.2f} s" if r.get("unavailable_s") is not None else f"kill {r['round']}")
            if r.get("healed_s") is not None:
                ax.axvline(r["healed_s"], color=line.get_color(), linestyle=":", linewidth=0.8)
        ax.axvline(0, color="black", linewidth=1)
        gaps = []
        for r in fail["rounds"]:
            sent = [p["sent_s"] for p in r.get("timeline") or []]
            gaps += [b - a for a, b in zip(sent, sent[1:]) if b > a]
        if gaps:
            rate = 1 / statistics.median(gaps)
            ax.axhline(rate, color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"probe rate {rate:.0f}/s", (0.02, rate), xycoords=("axes fraction", "data"),
                        xytext=(0, 3), textcoords="offset points", fontsize=7, color="grey")
        ax.set_xlabel("seconds since kill -9 of the leader (dotted: member restarted)")
        ax.set_ylabel("acknowledged probe puts/s (100 ms bins)")
        ax.set_title(f"{NAMES.get(kind, kind)}: failover, median {fail['median_s']:.2f} s"
                     if fail.get("median_s") is not None else NAMES.get(kind, kind))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Probe puts (one every 20 ms, round robin to the survivors) after each leader kill; `troupe bench raft`\n"
                 "sends no probe while the restart command runs, so the dip just before each dotted line is the bench's")
    save(fig, img, "failover.png", made)


def generate(out, img, made):
    d = os.path.join(out, "generate", "run")
    eng = load(os.path.join(d, "engines.json"))
    serve = {s: load(os.path.join(d, f"serve-{s}.json")) for s in ("llama", "troupe-http", "troupe-grpc")}
    serve["llama-server"] = serve.pop("llama")
    panels = []
    if eng:
        panels.append("engine")
    if all(serve.values()):
        panels.append("serve")
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "engine":
            for who in ("troupe", "llama"):
                pts = []
                for test, sides in eng["tests"].items():
                    m = re.match(r"decode, (\d+) streams? \(64 tokens, batched\)", test)
                    if m and sides.get(who):
                        v = sides[who]
                        pts.append((int(m[1]), statistics.median(v), min(v), max(v)))
                pts.sort()
                if pts:
                    ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                                marker="o", capsize=3, color=COLORS[who], label=NAMES[who])
            ax.set_title(f"Engines: decode, streams stepped together ({eng['rounds']} round"
                         f"{'s' if eng['rounds'] != 1 else ''})")
        else:
            for who, doc in serve.items():
                pts = sorted((p["streams"], p["tokens_per_s"]) for p in doc["serve"])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS.get(who),
                        label=NAMES.get(who, who), linestyle="--" if who == "troupe-grpc" else "-")
            ax.set_title("Serving: closed-loop streams of 64 tokens (one run)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("aggregate tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M Q4_1, 2 threads: troupe against llama.cpp")
    save(fig, img, "generate.png", made)


def main():
    out, img = sys.argv[1], sys.argv[2]
    os.makedirs(img, exist_ok=True)
    made = []
    for plot in (engine, serve, raft, generate):
        try:
            plot(out, img, made)
        except Exception as e:  # one plot's bad data must not cost the others
            print(f"plots.py: {plot.__name__}: {type(e).__name__}: {e}", file=sys.stderr)
    json.dump({"plots": made}, open(os.path.join(out, "plots.json"), "w"))
    print(f"plots.py: made {', '.join(made) or 'nothing'} in {img}", file=sys.stderr)


if __name__ == "__main__":
    main()
