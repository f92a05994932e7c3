"""Marquee against ONNX Runtime on the same networks, weights, inputs, batch and
threads, interleaved over rounds in one run. See benches/peer/README.md.

Each round runs `marquee bench --json` (its own warm-up, then `runs` timed passes)
and then the ONNX Runtime pipeline for the same number of timed passes; a stage's
figure is the median over rounds of each round's p50.
"""

import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import graphs

ort.set_default_logger_severity(3)

STAGES = ["decode", "preprocess", "image_tower", "tokenize", "text_tower", "text_tower_128", "fusion",
          "total_sequential", "total"]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def export(args, out):
    """Weights from `marquee models export`, then ONNX graphs, cached by the weights' hash."""
    spec = json.loads((args.model / "model.json").read_text())
    if spec.get("tta_flip"):
        sys.exit("compare: the peer graphs cover fusion members without flip TTA")
    weights = out / "weights"
    subprocess.run([args.marquee, "models", "export", "--model", str(args.model), "--out", str(weights)],
                   check=True, stdout=subprocess.DEVNULL)
    digest = hashlib.sha256()
    for f in sorted(weights.glob("*.safetensors")):
        digest.update(f.read_bytes())
    tag = digest.hexdigest()[:16]
    onnx_dir = out / f"onnx-{tag}"
    size = spec["image_input"]
    fc = spec["fusion"]
    members = spec["members"]
    if not (onnx_dir / "pipeline.onnx").is_file():
        log(f"compare: building ONNX graphs in {onnx_dir}")
        onnx_dir.mkdir(parents=True, exist_ok=True)
        img, cells = graphs.efficientnet(load_file(weights / "image_tower.safetensors"),
                                         size["height"], size["width"])
        onnx.save(img, onnx_dir / "image_tower.onnx")
        onnx.save(graphs.minilm(load_file(weights / "text_tower.safetensors"), spec["text_layers"]),
                  onnx_dir / "text_tower.onnx")
        fusions = [graphs.fusion(load_file(weights / f"fusion_{i}.safetensors"), cells, fc["layers"],
                                 fc["heads"], fc["d_model"]) for i in range(members)]
        for i, f in enumerate(fusions):
            onnx.save(f, onnx_dir / f"fusion_{i}.onnx")
        # For ORT alone at its best: the members as one graph, and the whole path as one.
        onnx.save(graphs.members(fusions), onnx_dir / "fusion_members.onnx")
        onnx.save(graphs.pipeline(onnx.load(onnx_dir / "image_tower.onnx"), onnx.load(onnx_dir / "text_tower.onnx"),
                                  fusions), onnx_dir / "pipeline.onnx")
    return onnx_dir, spec


def gflops(spec, text_len):
    """Multiply-adds x2 of each network, from the shapes (src/nn/)."""
    h, w = spec["image_input"]["height"], spec["image_input"]["width"]
    total = 0

    def conv(h, w, cin, cout, k, s, groups):
        oh, ow = -(-h // s), -(-w // s)
        return 2 * oh * ow * cout * (cin // groups) * k * k, oh, ow

    f, h, w = conv(h, w, 3, 32, 3, 2, 1)
    total += f
    for repeats, k, stride, expand, cin, cout in graphs.STAGES:
        for r in range(repeats):
            c, s = (cin, stride) if r == 0 else (cout, 1)
            mid = c * expand
            if expand != 1:
                f, h, w = conv(h, w, c, mid, 1, 1, 1)
                total += f
            f, h, w = conv(h, w, mid, mid, k, s, mid)
            total += f
            f, h, w = conv(h, w, mid, cout, 1, 1, 1)
            total += f
    f, h, w = conv(h, w, 320, 1280, 1, 1, 1)
    image = (total + f) / 1e9
    cells = h * w

    def encoder(n, d, ff, layers):
        return layers * (2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d)

    text = lambda n: encoder(n, 384, 1536, spec["text_layers"]) / 1e9
    fc = spec["fusion"]
    n = 1 + cells + text_len
    fusion = spec["members"] * (2 * cells * 1280 * fc["d_model"] + 2 * text_len * 384 * fc["d_model"]
                                + encoder(n, fc["d_model"], fc["d_ff"], fc["layers"])) / 1e9
    return {"image_tower": image, "text_tower": text(text_len), "text_tower_128": text(128), "fusion": fusion}


def preprocess(img, width, height):
    """PIL bicubic to the input size, then Marquee's normalisation, planar."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32)
    return ((a - 127.0) / 128.0).transpose(2, 0, 1)[None].copy()


def tokenizer(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(128)
    return tok


class Peer:
    def __init__(self, onnx_dir, model_dir, threads, members):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Each session has its own pool; threads left spinning after one session's run
        # would take the cores from the next one's (measured: 3x slower towers).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t = time.perf_counter()
        self.image = ort.InferenceSession(str(onnx_dir / "image_tower.onnx"), so, providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(onnx_dir / "text_tower.onnx"), so, providers=["CPUExecutionProvider"])
        self.members = [ort.InferenceSession(str(onnx_dir / f"fusion_{i}.onnx"), so,
                                             providers=["CPUExecutionProvider"]) for i in range(members)]
        # For the overlapped pipeline: the text session runs here while the image
        # session runs on the caller's thread (ORT releases the GIL inside run).
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.tok = tokenizer(model_dir)
        self.load_ms = (time.perf_counter() - t) * 1e3

    def fusion(self, tokens, hidden, overlapped=False):
        """The members' sigmoid scores averaged, as Marquee averages them; overlapped,
        the other members run on the pool's thread, as Marquee runs them side by side."""
        feed = {"image": tokens, "text": hidden}
        rest = [self.pool.submit(m.run, None, feed) for m in self.members[1:]] if overlapped else []
        runs = [self.members[0].run(None, feed)[0]]
        runs += [f.result()[0] for f in rest] if overlapped else [m.run(None, feed)[0] for m in self.members[1:]]
        return sum(runs) / len(runs)

    def classify(self, poster, overview, width, height):
        """One poster through every stage; returns the scores and each stage's ms."""
        times = {}
        t0 = t = time.perf_counter()

        def lap(name):
            nonlocal t
            now = time.perf_counter()
            times[name] = (now - t) * 1e3
            t = now

        img = Image.open(io.BytesIO(poster)).convert("RGB")
        img.load()
        lap("decode")
        x = preprocess(img, width, height)
        lap("preprocess")
        tokens = self.image.run(None, {"image": x})[0]
        lap("image_tower")
        ids = np.array([self.tok.encode(overview).ids], dtype=np.int64)
        lap("tokenize")
        hidden = self.text.run(None, {"ids": ids})[0]
        lap("text_tower")
        scores = self.fusion(tokens, hidden)
        lap("fusion")
        times["total"] = (time.perf_counter() - t0) * 1e3
        return scores[0], times, ids.shape[1]

    def classify_overlapped(self, poster, overview, width, height):
        """The same pipeline with the two towers at the same time, as Marquee serves
        a poster on a CPU; returns the scores and the total ms."""
        t0 = time.perf_counter()
        img = Image.open(io.BytesIO(poster)).convert("RGB")
        img.load()
        x = preprocess(img, width, height)
        ids = np.array([self.tok.encode(overview).ids], dtype=np.int64)
        text = self.pool.submit(self.text.run, None, {"ids": ids})
        tokens = self.image.run(None, {"image": x})[0]
        hidden = text.result()[0]
        scores = self.fusion(tokens, hidden, overlapped=True)
        return scores[0], (time.perf_counter() - t0) * 1e3

    def text128(self, overview):
        ids = self.tok.encode(" ".join([overview] * 128)).ids
        t = time.perf_counter()
        self.text.run(None, {"ids": np.array([ids], dtype=np.int64)})
        return (time.perf_counter() - t) * 1e3

    def peak_gflops(self, threads, n=1024):
        a = onnx.helper
        g = a.make_graph([a.make_node("MatMul", ["a", "b"], ["c"])], "peak",
                         [a.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [n, n]),
                          a.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [n, n])],
                         [a.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [n, n])])
        m = a.make_model(g, opset_imports=[a.make_opsetid("", graphs.OPSET)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        best = float("inf")
        for _ in range(40):
            t = time.perf_counter()
            s.run(None, {"a": x, "b": x})
            best = min(best, time.perf_counter() - t)
        return 2 * n ** 3 / best / 1e9


def parity(args, peer, spec, out, overview):
    """The graphs compute what Marquee computes: the same scores within 1e-4 on a
    poster already at the input size (so neither side resizes)."""
    w, h = spec["image_input"]["width"], spec["image_input"]["height"]
    small = out / "poster-at-input-size.png"
    Image.open(args.poster).convert("RGB").resize((w, h), Image.BICUBIC).save(small)
    r = subprocess.run([args.marquee, "classify", str(small), "--overview", overview, "--model",
                        str(args.model), "--json"], check=True, capture_output=True, text=True)
    theirs = {g["label"]: g["score"] for g in json.loads(r.stdout)["genres"]}
    mine, _, _ = peer.classify(small.read_bytes(), overview, w, h)
    both, _ = peer.classify_overlapped(small.read_bytes(), overview, w, h)
    if not np.array_equal(mine, both):
        sys.exit("compare: ORT's overlapped pipeline scores differ from its sequential one")
    want = np.array([theirs[l] for l in spec["labels"]], dtype=np.float64)
    rel = float(np.linalg.norm(mine - want) / np.linalg.norm(want))
    if not rel <= 1e-4:
        sys.exit(f"compare: the ONNX graphs differ from Marquee: scores rel L2 {rel:.2e} > 1e-4")
    return rel


# Each network alone, in a process of its own holding one session with ORT's
# defaults for latency (benches/peer/README.md): stage -> graph.
ALONE = {"image_tower": "image_tower.onnx", "text_tower": "text_tower.onnx",
         "text_tower_128": "text_tower.onnx", "fusion": "fusion_members.onnx"}
# Marquee's own figure for a network alone (each tower run after run by itself,
# `marquee bench`), held against ORT's alone schedule so that both sides are timed the
# same way; the stage's within-poster figure is held against ORT's loop.
MARQUEE_ALONE = {"image_tower": "image_tower_alone", "text_tower": "text_tower_alone"}
# The whole path as one graph, in one session, as sequential and parallel executors.
PIPELINES = {"pipeline": [], "pipeline_parallel": ["--parallel"]}


def alone_feeds(peer, poster, overview, width, height, out):
    """The inputs each network reads in the served path, saved for the alone runs."""
    img = Image.open(io.BytesIO(poster)).convert("RGB")
    x = preprocess(img, width, height)
    ids = np.array([peer.tok.encode(overview).ids], dtype=np.int64)
    ids128 = np.array([peer.tok.encode(" ".join([overview] * 128)).ids], dtype=np.int64)
    tokens = peer.image.run(None, {"image": x})[0]
    hidden = peer.text.run(None, {"ids": ids})[0]
    feeds = {"image_tower": {"image": x}, "text_tower": {"ids": ids}, "text_tower_128": {"ids": ids128},
             "fusion": {"image": tokens, "text": hidden}}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stage, feed in feeds.items():
        paths[stage] = out / f"{stage}.npz"
        np.savez(paths[stage], **feed)
    return paths


def run_alone(args, graph, extra):
    """One `compare.py alone` process; returns its report."""
    r = subprocess.run([sys.executable, __file__, "alone", str(graph), "--threads", str(args.threads),
                        "--runs", str(args.runs)] + extra, check=True, capture_output=True, text=True)
    return json.loads(r.stdout)


def alone_main(argv):
    """`compare.py alone GRAPH`: one ONNX graph in one session with ORT's defaults for
    latency (sequential executor, every graph optimisation, spinning threads), nothing
    else in the process; prints the p50 ms of `runs` passes after 2 warm-up passes.
    With --poster, the graph is the whole path and a pass is decode through scores."""
    ap = argparse.ArgumentParser(prog="compare.py alone")
    ap.add_argument("graph")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--feeds", type=Path)
    ap.add_argument("--parallel", action="store_true", help="ORT_PARALLEL executor (the graph's branches at once)")
    ap.add_argument("--poster", type=Path)
    ap.add_argument("--overview")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"))
    a = ap.parse_args(argv)
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    if a.parallel:
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.inter_op_num_threads = a.threads
    s = ort.InferenceSession(a.graph, so, providers=["CPUExecutionProvider"])
    if a.poster:
        poster, tok = a.poster.read_bytes(), tokenizer(a.model)

        def once():
            img = Image.open(io.BytesIO(poster)).convert("RGB")
            img.load()
            x = preprocess(img, *a.size)
            ids = np.array([tok.encode(a.overview).ids], dtype=np.int64)
            return s.run(None, {"image": x, "ids": ids})[0]
    else:
        feeds = dict(np.load(a.feeds))

        def once():
            return s.run(None, feeds)[0]
    times = []
    for k in range(a.runs + 2):
        t = time.perf_counter()
        out = once()
        if k >= 2:
            times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"p50_ms": statistics.median(times), "scores": out[0].tolist() if a.poster else None}))


FLORENCE = [("vision", "vision_s"), ("text_encoder", "text_encoder_s"),
            ("decoder_step0", "decoder_step0"), ("decoder_step", "decoder_step_steps1to31")]


def florence(args, env):
    """Florence-2-base (random weights, fp32): the kit's PyTorch script and
    `marquee bench florence base`, alternating, in this one run."""
    script = args.florence_kit / "scripts" / "bench_base.py"
    mine = {k: [] for k, _ in FLORENCE}
    theirs = {k: [] for k, _ in FLORENCE}
    out = args.out / "florence"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(args.florence_rounds):
        log(f"compare: Florence-2 round {i + 1}/{args.florence_rounds}: PyTorch")
        subprocess.run([args.torch_python, str(script), str(out), f"sdpa:{args.threads}"], check=True,
                       stdout=subprocess.DEVNULL, env=env)
        ref = json.loads((out / "bench_base_cpu.json").read_text())
        torch_env = ref["env"]
        run = ref["runs"][0]
        for k, key in FLORENCE:
            theirs[k].append(run[key]["wall_median"])
        log(f"compare: Florence-2 round {i + 1}/{args.florence_rounds}: marquee")
        r = subprocess.run([args.marquee, "--backend", args.backend, "--json", "bench", "florence", "base",
                            "--runs", "3", "--reference", str(out / "bench_base_cpu.json")],
                           check=True, capture_output=True, text=True, env=env)
        b = json.loads(r.stdout)
        for k, _ in FLORENCE:
            mine[k].append(b["stages_s"][k]["p50"])
    rows = []
    for k, _ in FLORENCE:
        m, p = statistics.median(mine[k]), statistics.median(theirs[k])
        rows.append({"stage": k, "marquee_s": round(m, 4), "peer_s": round(p, 4), "ratio": round(m / p, 3)})
    return {"rows": rows, "peer": f"PyTorch {torch_env['torch']} (transformers {torch_env['transformers']}, "
                                  f"sdpa, {torch_env['cpu_capability']})", "rounds": args.florence_rounds}


def main():
    if sys.argv[1:2] == ["alone"]:
        return alone_main(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--marquee", required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--poster", type=Path, required=True)
    ap.add_argument("--overview", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", default="flex")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--florence", action="store_true", help="also Florence-2-base against PyTorch")
    ap.add_argument("--florence-rounds", type=int, default=2)
    ap.add_argument("--florence-kit", type=Path)
    ap.add_argument("--torch-python")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_dir, spec = export(args, args.out)
    peer = Peer(onnx_dir, args.model, args.threads, spec["members"])
    rel = parity(args, peer, spec, args.out, args.overview)
    log(f"compare: ONNX graphs match Marquee's scores (rel L2 {rel:.1e})")
    poster = args.poster.read_bytes()
    w, h = spec["image_input"]["width"], spec["image_input"]["height"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    feeds = alone_feeds(peer, poster, args.overview, w, h, args.out / "alone")
    whole = ["--poster", str(args.poster), "--overview", args.overview, "--model", str(args.model),
             "--size", str(w), str(h)]
    want, _, _ = peer.classify(poster, args.overview, w, h)
    for name, flags in PIPELINES.items():
        got = np.array(run_alone(args, onnx_dir / "pipeline.onnx", whole + flags)["scores"])
        if not np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want):
            sys.exit(f"compare: the merged ONNX graph ({name}) differs from the three graphs")
    mine = {s: [] for s in STAGES}
    mine_alone = {s: [] for s in MARQUEE_ALONE}
    theirs = {s: [] for s in STAGES}
    alone = {s: [] for s in list(ALONE) + list(PIPELINES)}
    extra = []
    for i in range(args.rounds):
        log(f"compare: round {i + 1}/{args.rounds}: marquee")
        r = subprocess.run([args.marquee, "--backend", args.backend, "--json", "bench", "--model", str(args.model),
                            "--poster", str(args.poster), "--overview", args.overview, "--runs", str(args.runs)],
                           check=True, capture_output=True, text=True, env=env)
        b = json.loads(r.stdout)
        extra.append(b)
        for s in STAGES:
            mine[s].append(b["total_ms"]["p50"] if s == "total" else b["stages"][s]["p50"])
        for s, name in MARQUEE_ALONE.items():
            mine_alone[s].append(b["stages"][name]["p50"])
        log(f"compare: round {i + 1}/{args.rounds}: onnxruntime")
        per = {s: [] for s in STAGES}
        overlapped = []
        for k in range(args.runs + 2):
            _, times, n_ids = peer.classify(poster, args.overview, w, h)
            _, both = peer.classify_overlapped(poster, args.overview, w, h)
            t128 = peer.text128(args.overview)
            if k >= 2:
                for s, v in times.items():
                    per[s if s != "total" else "total_sequential"].append(v)
                per["text_tower_128"].append(t128)
                overlapped.append(both)
        # ORT's total is the better of its two schedules, so Marquee's overlapped
        # towers are held against the same idea on the peer's side.
        per["total"] = [min(statistics.median(per["total_sequential"]), statistics.median(overlapped))]
        for s in STAGES:
            theirs[s].append(statistics.median(per[s]))
        log(f"compare: round {i + 1}/{args.rounds}: onnxruntime, each network alone")
        for s, graph in ALONE.items():
            alone[s].append(run_alone(args, onnx_dir / graph, ["--feeds", str(feeds[s])])["p50_ms"])
        for s, flags in PIPELINES.items():
            alone[s].append(run_alone(args, onnx_dir / "pipeline.onnx", whole + flags)["p50_ms"])
    if n_ids != b["text_tokens"]:
        sys.exit(f"compare: tokenizers differ: ORT side {n_ids} tokens, Marquee {b['text_tokens']}")
    mine_peak = statistics.median(x["peak_gflops"] for x in extra)
    peer_peak = peer.peak_gflops(args.threads)
    flops = gflops(spec, n_ids)
    alone = {s: statistics.median(v) for s, v in alone.items()}
    # ORT's schedules for each row: the loop's (three sessions, spinning off; for
    # `total` the better of sequential and overlapped), and alone (one network or the
    # merged path in one session with default spinning). The ratio is against the better.
    schedules = {s: {"loop": statistics.median(theirs[s])} for s in STAGES}
    for s in ALONE:
        schedules[s]["alone"] = alone[s]
    schedules["total_sequential"]["pipeline"] = alone["pipeline"]
    schedules["total"].update({s: alone[s] for s in PIPELINES})
    rows = []
    for s in STAGES:
        poster_ms = statistics.median(mine[s])
        # Marquee's figure timed as ORT's schedule is: alone against alone.
        paired = {k: statistics.median(mine_alone[s]) if k == "alone" and s in MARQUEE_ALONE else poster_ms
                  for k in schedules[s]}
        best = min(schedules[s], key=schedules[s].get)
        p = schedules[s][best]
        m = paired[best]
        row = {"stage": s, "marquee_ms": round(m, 3), "peer_ms": round(p, 3), "peer_schedule": best,
               "ratio": round(m / p, 3), "marquee_poster_ms": round(poster_ms, 3),
               "peer_loop_ms": round(schedules[s]["loop"], 3),
               "ratio_loop": round(poster_ms / schedules[s]["loop"], 3),
               "ratio_unpaired": round(poster_ms / p, 3),
               "peer_schedules_ms": {k: round(v, 3) for k, v in schedules[s].items()}}
        if s in flops:
            gf = flops[s]
            row["gflop"] = round(gf, 4)
            row["marquee_pct_peak"] = round(100 * gf / (m / 1e3) / mine_peak, 1)
            row["peer_pct_peak"] = round(100 * gf / (p / 1e3) / peer_peak, 1)
            # The floor is the machine's: the better of the two runtimes' peaks.
            row["marquee_x_floor"] = round((m / 1e3) / (gf / max(mine_peak, peer_peak)), 2)
        rows.append(row)
    report = {
        "rows": rows,
        "total_ratio": rows[-1]["ratio"],
        "threads": args.threads,
        "batch": 1,
        "rounds": args.rounds,
        "runs": args.runs,
        "backend": args.backend,
        "text_tokens": n_ids,
        "peak_gflops": {"marquee": round(mine_peak, 1), "peer": round(peer_peak, 1)},
        "load_ms": {"marquee": round(statistics.median(x["load_ms"] for x in extra), 1),
                    "peer": round(peer.load_ms, 1)},
        "peak_rss_mb": {"marquee": max(x["peak_rss_mb"] for x in extra)},
        "batch8_posters_per_s": {"marquee": statistics.median(x["batch8_posters_per_s"] for x in extra)},
        "parity_rel_l2": rel,
        "peer": f"onnxruntime {ort.__version__}",
    }
    if args.florence:
        report["florence"] = florence(args, env)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'stage':<17}{'in poster':>10}{'ORT loop':>10}{'marquee ms':>11}{'ORT best':>10}{'(schedule)':>19}"
              f"{'ratio':>7}{'GFLOP':>8}{'% peak':>8}{'ORT %':>7}{'x floor':>9}")
        for r in rows:
            print(f"{r['stage']:<17}{r['marquee_poster_ms']:>10.2f}{r['peer_loop_ms']:>10.2f}{r['marquee_ms']:>11.2f}"
                  f"{r['peer_ms']:>10.2f}{r['peer_schedule']:>19}{r['ratio']:>7.2f}"
                  f"{r.get('gflop', float('nan')):>8.3f}{r.get('marquee_pct_peak', float('nan')):>8.1f}"
                  f"{r.get('peer_pct_peak', float('nan')):>7.1f}{r.get('marquee_x_floor', float('nan')):>9.2f}")
        print(f"peak (1024^3 matmul): marquee {mine_peak:.1f} GFLOP/s, ORT {peer_peak:.1f} GFLOP/s; "
              f"{args.threads} threads, batch 1, {args.rounds} rounds x {args.runs} runs")
        if args.florence:
            f = report["florence"]
            print(f"\nFlorence-2-base against {f['peer']}, median of {f['rounds']} alternating rounds:")
            print(f"{'stage':<16}{'marquee s':>12}{'PyTorch s':>12}{'ratio':>8}")
            for r in f["rows"]:
                print(f"{r['stage']:<16}{r['marquee_s']:>12.4f}{r['peer_s']:>12.4f}{r['ratio']:>8.2f}")


if __name__ == "__main__":
    main()
