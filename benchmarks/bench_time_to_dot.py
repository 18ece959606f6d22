"""Time to dot: how many seconds (and iterations) a fresh default model needs to find the dot.

Time to dot = seconds from the start of a fresh model's run to the first moment its last 50
predictions reach >= 90% within 3 px (dot error <= 3.0 px; a prediction without a dot is a miss).
None = not reached within ``--max-seconds`` / ``--max-iterations``.

Each cell is one pattern x one start seed x one world, run in its own process (``--jobs`` at once,
``--threads`` torch threads each), and records iterations to dot, seconds to dot, seconds per
iteration and the curve (rolling within-3-px share of the last 50 predictions against seconds and
iterations). Worlds: ``live`` (the app's robot: move 27 px, radius 5), ``move45_r8`` and
``move11_r3`` (other ToroidalDotRobot worlds); the patterns come from toroidal_action_selectors.

Modes (a function per mode, one shared cell loop):

- ``bare``: the loop itself, ``run_one_iteration`` on a fresh model.
- ``--app``: the launched app, a gradio_client consumer streaming ``/run_world_model`` as the page
  does (the cell's world recorded as a session first: the same frames and actions), time counted
  at the client.

    python benchmarks/bench_time_to_dot.py                                   # 4 patterns x 3 seeds, 3 worlds
    python benchmarks/bench_time_to_dot.py --patterns double_move --seeds 1234 --worlds live --set learning_rate=1e-3
    python benchmarks/bench_time_to_dot.py --max-iterations 1000 --max-seconds 1e9   # iterations to dot, any speed

Prints one JSON object (machine, lscpu flags, torch's CPU capability, threads, config, every cell,
summary: median and worst seconds to dot, worst per pattern), appends it to
``benchmarks/out/time_to_dot.jsonl`` and draws ``benchmarks/out/time_to_dot.png``.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the app launcher the API tests use

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import OUT_DIR, machine_info, report, same_sums  # noqa: E402
from bench_learning import MATRIX_PATTERNS, _config, window_summary  # noqa: E402

WINDOW = 50  # predictions in the rolling window
WITHIN_PX = 3.0  # a prediction counts when its dot is at most this far from the truth
SHARE = 0.9  # the window's share that counts as "dot found"
# the progress line of every app update: "... iteration I | **dot found:** H of the last N within 3 px"
PROGRESS_DOT = re.compile(r"iteration (?P<iteration>\d+) \| \*\*dot found:\*\* (?P<hits>\d+) of the last (?P<scored>\d+) within")
WORLDS = {  # name -> ToroidalDotRobot keyword arguments (img_size stays the config's)
    "live": {"move_pixels": 27, "dot_radius": 5},
    "move45_r8": {"move_pixels": 45, "dot_radius": 8},
    "move11_r3": {"move_pixels": 11, "dot_radius": 3},
}
DEFAULT_WORLD_PATTERNS = {"live": list(MATRIX_PATTERNS), "move45_r8": ["random"], "move11_r3": ["random"]}


# -----------------------------------------------------------------------------
# modes: each builds what steps one iteration and returns (step() -> metrics dict, close())


def bare_mode(job: dict, cfg):
    """The loop alone: ``run_one_iteration`` of a fresh model on a fresh robot."""
    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
    from toroidal_action_selectors import make_selector
    from toroidal_dot_robot import ToroidalDotRobot

    world = WORLDS[job["world"]]
    robot = ToroidalDotRobot(img_size=cfg.frame_size[0], seed=job["seed"], **world)
    wm = AutoencoderConcatPredictorWorldModel(robot, action_selector=make_selector(job["pattern"], job["seed"]),
                                              device=job["device"], config=cfg)
    return wm.run_one_iteration, lambda: None


def app_cell(job: dict) -> dict:
    """The same cell through the launched app, timed at a client that streams ``/run_world_model`` as
    the page does (every update's pictures downloaded): the cell's world is recorded as a session
    first (the same frames and actions as the live robot of that seed), the client loads it and
    presses Run (500 iterations, again until the dot or the time limit), and the dot counts when an
    update that has reached the client first shows 90% over a full window: in its progress line (every
    update, once a second) or its Dot-found graph (every third), whichever comes first.
    """
    import tempfile

    from gradio_client import Client

    from conftest import launch_app, stop_process
    from page_outputs import RUN_OUTPUT_KEYS, SERIES_DOT
    from record_session import record_session

    if job["set"]:
        raise SystemExit("--app runs the app's own settings: --set applies to the bare loop only")
    work = Path(tempfile.mkdtemp(prefix="ttd_app_"))
    world = WORLDS[job["world"]]
    frames = int(job["max_iterations"]) + 10 if job["max_iterations"] < 100_000 else 2_000
    name = record_session(job["pattern"], frames, job["seed"], name="ttd",
                          root=work / "saved" / "sessions" / "toroidal_dot", **world).name
    server = launch_app(work / "saved", work, e2e=False, env_extra={"CWM_TORCH_THREADS": str(job["threads"])})
    client = Client(server.url, verbose=False, download_files=str(work / "downloads"))
    dot_at, progress_at = RUN_OUTPUT_KEYS.index("plot_dot"), RUN_OUTPUT_KEYS.index("progress")
    curve, to_dot, updates, n = [], None, 0, 0
    try:
        client.predict(name, api_name="/load_session")
        t0 = time.perf_counter()
        while to_dot is None and time.perf_counter() - t0 < job["max_seconds"] and n < job["max_iterations"]:
            run = client.submit(min(500, job["max_iterations"] - n), api_name="/run_world_model")
            for out in run:
                elapsed = time.perf_counter() - t0
                updates += 1
                seen = PROGRESS_DOT.search(out[progress_at] or "")  # every update: the latest full window's count
                if seen and int(seen["scored"]) == WINDOW and int(seen["hits"]) >= SHARE * WINDOW:
                    n = max(n, int(seen["iteration"]))
                    to_dot = {"iteration": n, "seconds": round(elapsed, 2), "seen_in": "progress"}
                    run.cancel()
                    break
                plot = out[dot_at]
                plot = plot.get("value", plot) if isinstance(plot, dict) else None
                if not plot or not plot.get("data"):
                    continue
                rows = [dict(zip(plot["columns"], r)) for r in plot["data"]]
                shares = [(r["iteration"], r["value"] / 100.0) for r in rows  # the dot line, not its colour anchor
                          if r.get("series") == SERIES_DOT and r.get("iteration") is not None and r.get("value") is not None]
                if not shares:
                    continue
                n = max(n, int(shares[-1][0]))
                curve.append({"iteration": n, "seconds": round(elapsed, 2), "within_3px_50": round(shares[-1][1], 3)})
                full = [it for k, (it, share) in enumerate(shares) if k + 1 >= WINDOW and share >= SHARE]
                if to_dot is None and full:
                    to_dot = {"iteration": int(full[0]), "seconds": round(elapsed, 2), "seen_in": "graph"}
                    run.cancel()
                    break
            else:
                run.result()
        total = time.perf_counter() - t0
    finally:
        client.close()
        stop_process(server.proc)
    return {
        "mode": "app", "world": job["world"], "pattern": job["pattern"], "seed": job["seed"], "threads": job["threads"],
        "set": job["set"], "iterations_to_dot": None if to_dot is None else to_dot["iteration"],
        "seconds_to_dot": None if to_dot is None else to_dot["seconds"], "iterations": n, "seconds": round(total, 2),
        "dot_seen_in": None if to_dot is None else to_dot["seen_in"],
        "updates": updates, "updates_per_second": round(updates / max(total, 1e-9), 2),
        "seconds_per_iteration": round(total / max(1, n), 4), "last_100": {}, "curve": curve,
    }


MODES = {"bare": bare_mode}  # modes whose iterations run in this process; "app" runs app_cell


# -----------------------------------------------------------------------------
# the shared cell loop


def run_cell(job: dict) -> dict:
    """One cell in a fresh process: time from the start of a fresh model's run to the dot."""
    if job["mode"] == "app":
        return app_cell(job)
    from autoencoder_concat_predictor_world_model import compute_path

    torch.set_num_threads(job["threads"])
    cfg, _ = _config(job["set"])
    t_build = time.perf_counter()
    step, close = MODES[job["mode"]](job, cfg)
    build_s = time.perf_counter() - t_build
    window: deque = deque(maxlen=WINDOW)  # 1.0 within 3 px, else 0.0
    records, curve = [], []
    to_dot = None  # {"iteration", "seconds"}
    t0 = time.perf_counter()
    try:
        while True:
            m = step()
            elapsed = time.perf_counter() - t0
            records.append({k: m[k] for k in ("prediction_error", "dot_error", "copy_error")} | {"t": elapsed})
            if m["dot_error"] is not None:
                window.append(1.0 if m["dot_error"] <= WITHIN_PX else 0.0)
            share = sum(window) / len(window) if len(window) == WINDOW else 0.0
            n = len(records)
            if n % job["every"] == 0:
                curve.append({"iteration": n, "seconds": round(elapsed, 2), "within_3px_50": round(share, 3)})
            if n % 100 == 0:
                print(f"  {job['world']}/{job['pattern']}/{job['seed']}: {n} it, {elapsed:.0f} s, within 3 px (last {WINDOW}) "
                      f"{share:.2f}", file=sys.stderr, flush=True)
            if to_dot is None and share >= SHARE:
                to_dot = {"iteration": n, "seconds": round(elapsed, 2)}
                curve.append({"iteration": n, "seconds": round(elapsed, 2), "within_3px_50": round(share, 3)})
            if to_dot is not None and n >= job["min_iterations"]:
                break
            if elapsed >= job["max_seconds"] or n >= job["max_iterations"]:
                break
    finally:
        close()
    total = time.perf_counter() - t0
    n = len(records)
    last_100 = window_summary(records[-100:])
    last_100["target_met"] = bool(last_100.get("n") and last_100["within_3px"] >= 0.9 and last_100["mse_ratio"] <= 0.5)
    times = np.diff([0.0] + [r["t"] for r in records])
    return {
        "mode": job["mode"], "world": job["world"], "pattern": job["pattern"], "seed": job["seed"],
        "threads": job["threads"], "set": job["set"], "compute_path": compute_path(job["device"], cfg),
        "iterations_to_dot": None if to_dot is None else to_dot["iteration"],
        "seconds_to_dot": None if to_dot is None else to_dot["seconds"],
        "iterations": n, "seconds": round(total, 2), "build_seconds": round(build_s, 3),
        "seconds_per_iteration": round(total / max(1, n), 4),
        "seconds_per_iteration_min": round(float(times.min()), 4) if n else None,
        "seconds_per_iteration_median": round(float(np.median(times)), 4) if n else None,
        "last_100": last_100, "curve": curve,
    }


def cpu_info() -> dict:
    """lscpu's model and flags, torch's chosen CPU capability (the ISA its kernels dispatch to) and BLAS."""
    out = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "mkldnn": torch.backends.mkldnn.is_available(), "mkl": torch.backends.mkl.is_available()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        out["model_name"] = fields.get("Model name", "").strip()
        out["lscpu_flags"] = fields.get("Flags", "").split()
    except (OSError, subprocess.SubprocessError):
        out["lscpu_flags"] = None
    cfg = torch.__config__.show()
    out["torch_cpu_capability_line"] = next((l.strip() for l in cfg.splitlines() if "CPU capability" in l), None)
    out["blas"] = next((f for f in cfg.replace(",", " ").split() if f.startswith("BLAS_INFO=")), None)
    out["mkldnn_version"] = torch.backends.mkldnn.version() if hasattr(torch.backends.mkldnn, "version") else None
    return out


def summary(cells: list[dict], max_seconds: float) -> dict:
    """Median and worst seconds (and iterations) to dot; a miss counts as worse than any hit."""
    def worst(cs):
        miss = [c for c in cs if c["seconds_to_dot"] is None]
        c = miss[0] if miss else max(cs, key=lambda c: c["seconds_to_dot"])
        return {k: c[k] for k in ("world", "pattern", "seed", "iterations_to_dot", "seconds_to_dot", "seconds_per_iteration")}
    secs = [c["seconds_to_dot"] if c["seconds_to_dot"] is not None else float("inf") for c in cells]
    iters = [c["iterations_to_dot"] if c["iterations_to_dot"] is not None else float("inf") for c in cells]
    med = float(np.median(secs))
    med_it = float(np.median(iters))
    groups = {}
    for c in cells:
        groups.setdefault(f"{c['world']}/{c['pattern']}", []).append(c)
    return {
        "cells": len(cells), "reached": sum(c["seconds_to_dot"] is not None for c in cells),
        "median_seconds_to_dot": None if med == float("inf") else med,
        "median_iterations_to_dot": None if med_it == float("inf") else med_it,
        "worst_cell": worst(cells),
        "worst_per_pattern": {k: worst(v) for k, v in groups.items()},
        "median_seconds_per_iteration": float(np.median([c["seconds_per_iteration"] for c in cells])),
    }


def plot(cells: list[dict], path: Path, title: str) -> None:
    """Within-3-px share of the last 50 predictions against seconds, one line per cell."""
    from matplotlib.figure import Figure  # no pyplot: nothing kept in a global registry

    groups = list(dict.fromkeys(f"{c['world']}/{c['pattern']}" for c in cells))
    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).ravel()
    for ax, g in zip(axes, groups):
        for c in (c for c in cells if f"{c['world']}/{c['pattern']}" == g):
            pts = c["curve"]
            label = f"seed {c['seed']}: " + ("miss" if c["seconds_to_dot"] is None else f"{c['seconds_to_dot']:.0f} s / {c['iterations_to_dot']} it")
            line, = ax.plot([p["seconds"] for p in pts], [p["within_3px_50"] for p in pts], lw=1, label=label)
            if c["seconds_to_dot"] is not None:
                ax.plot([c["seconds_to_dot"]], [SHARE], "o", color=line.get_color(), ms=4)
        ax.axhline(SHARE, color="k", lw=0.8, ls=":")
        ax.set_title(g, fontsize=10)
        ax.set_xlabel("seconds")
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    axes[0].set_ylabel(f"within {WITHIN_PX:g} px, last {WINDOW}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def run_cells(args, jobs: list[dict]) -> list[dict]:
    """Every cell in its own spawned process, ``--jobs`` at once; a finished cell is printed to stderr."""
    import json
    import multiprocessing as mp

    cells = []
    with mp.get_context("spawn").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        for c in pool.imap_unordered(run_cell, jobs):
            cells.append(c)
            print(f"cell {c['mode']}/{c['world']}/{c['pattern']}/{c['seed']} {' '.join(c['set'])}: "
                  f"dot at {c['iterations_to_dot']} it / {c['seconds_to_dot']} s, {c['seconds_per_iteration']} s/it, "
                  f"last 100 {json.dumps({k: c['last_100'].get(k) for k in ('within_3px', 'mse_ratio')})}",
                  file=sys.stderr, flush=True)
    order = {(j["world"], j["pattern"], j["seed"]): i for i, j in enumerate(jobs)}
    return sorted(cells, key=lambda c: order[(c["world"], c["pattern"], c["seed"])])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", nargs="+", default=None, help="live world's patterns (default: all four); "
                        "the other worlds run 'random' unless --patterns is given")
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 22, 33], help="start seeds (never tuned on)")
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), choices=list(WORLDS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per cell")
    parser.add_argument("--jobs", type=int, default=0, help="cells at once (0: cores // threads)")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="give up on a cell after this")
    parser.add_argument("--max-iterations", type=int, default=100_000, help="give up on a cell after this")
    parser.add_argument("--min-iterations", type=int, default=0, help="keep running after the dot until this many "
                        "iterations (for a final-quality check on the last 100)")
    parser.add_argument("--every", type=int, default=10, help="iterations per curve point")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides (experiments)")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--app", action="store_true", help="time the launched app through a streaming client instead of the bare loop")
    parser.add_argument("--log", default="time_to_dot", help="name of the JSONL log and PNG in benchmarks/out")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    mode = "app" if args.app else "bare"
    args.jobs = args.jobs or max(1, (os.cpu_count() or 1) // args.threads)
    cfg, overrides = _config(args.set)
    jobs = []
    for world in args.worlds:
        patterns = args.patterns or DEFAULT_WORLD_PATTERNS[world]
        for pattern in patterns:
            for seed in args.seeds:
                jobs.append({"mode": mode, "world": world, "pattern": pattern, "seed": seed, "threads": args.threads,
                             "set": args.set, "device": args.device, "max_seconds": args.max_seconds,
                             "max_iterations": args.max_iterations, "min_iterations": args.min_iterations,
                             "every": args.every})
    t0 = time.time()
    cells = run_cells(args, jobs)
    png = OUT_DIR / f"{args.log}.png"
    if not args.no_plot:
        plot(cells, png, f"time to dot ({mode}): {len(cells)} cells, {args.threads} thread(s), {args.jobs} at once, "
             f"overrides {overrides or 'none'}")
    out = {
        "benchmark": "time_to_dot", "mode": mode, **machine_info(), "cpu": cpu_info(),
        "threads": args.threads, "torch_threads_main": torch.get_num_threads(), "jobs": args.jobs,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "definition": {"window": WINDOW, "within_px": WITHIN_PX, "share": SHARE, "max_seconds": args.max_seconds,
                       "max_iterations": args.max_iterations},
        "worlds": {w: WORLDS[w] for w in args.worlds},
        "config_overrides": overrides, "config": dataclasses.asdict(cfg),
        "summary": summary(cells, args.max_seconds),
        "cells": cells, "png": None if args.no_plot else str(png),
    }
    report(out, f"{args.log}.jsonl")


if __name__ == "__main__":
    main()
