"""Learning benchmark: does a fresh world model learn to predict the dot, and how fast?

For each action pattern it runs the app's default Run loop (``run_one_iteration``, one optimizer
step per iteration) on a fresh, fixed-seed model, both replaying a recorded 200-step session and
on the live robot, and every ``--every`` iterations records the mean prediction MSE, the
copy-last-frame MSE over the same transitions, the dot error (toroidal distance in px between
the dot centres of prediction and truth; no predicted dot counts as a miss), the share of
predictions with a dot, within 3 px, the median error and the wall-clock seconds. Prints one
JSON object. Not part of the test suite.

    python benchmarks/bench_learning.py                      # all patterns, replay + live, 180 s each
    python benchmarks/bench_learning.py --patterns always_move --sources live --seconds 60
    python benchmarks/bench_learning.py --matrix --seeds 11 22 33 --threads-list 1 2   # the grid of docs/LEARNING.md

``--matrix`` runs every cell of patterns x seeds x sources x thread counts as a Ray task in a
fresh worker process; each cell asks Ray for as many CPUs as it uses threads, so cells never fight
for cores (two 1-thread cells share the 2-core machine, one core each; ``--jobs`` caps the cells
at once). ``ray.init()`` starts a local cluster sized to this machine (``--cpus`` sizes it);
``--address`` joins an existing cluster instead, whose nodes get this folder's code (the Python
packages must be installed there). Each finished cell is appended to
``benchmarks/out/learning_matrix.jsonl`` as it arrives; at the end one JSON object with every
cell's last-100 summary and the worst cell per pattern is printed and the learning curves are
drawn to ``benchmarks/out/learning_matrix.png`` (matplotlib, never inside the server).

    python benchmarks/bench_learning.py --matrix --address 10.0.0.5:6379 --seeds 11 22 33 44 55
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel, ReplayRobot  # noqa: E402
from bench_common import same_sums  # noqa: E402
from config import AutoencoderConcatPredictorWorldModelConfig, ToroidalDotConfig, with_overrides  # noqa: E402
from frame_metrics import WITHIN_PX  # noqa: E402
from toroidal_action_selectors import make_selector  # noqa: E402
from toroidal_dot_robot import ToroidalDotRobot  # noqa: E402

PATTERNS = ("always_move", "alternate", "double_move")
MATRIX_PATTERNS = ("always_move", "alternate", "double_move", "random")
OUT_DIR = Path(os.environ.get("CWM_BENCH_OUT") or Path(__file__).resolve().parent / "out")  # logs and pictures
REPO = Path(__file__).resolve().parents[1]
LOCAL_OBJECT_STORE_BYTES = 200 * 2**20  # a local cluster's shared object store: cells hand back small dicts only
CODE_EXCLUDES = [".git", ".venv", "saved", "benchmarks/out"]  # not shipped to a joined cluster's nodes


def window_summary(records: list[dict]) -> dict:
    """Summary of a window of per-iteration metrics (only iterations that scored a prediction)."""
    scored = [r for r in records if r["prediction_error"] is not None and r["dot_error"] is not None]
    if not scored:
        return {"n": 0}
    errs = np.array([r["dot_error"] for r in scored], dtype=np.float64)
    mse = float(np.mean([r["prediction_error"] for r in scored]))
    copy = float(np.mean([r["copy_error"] for r in scored]))
    return {
        "n": len(scored),
        "prediction_mse": mse,
        "copy_last_frame_mse": copy,
        "mse_ratio": mse / copy if copy > 0 else None,
        "dot_present": float(np.mean(np.isfinite(errs))),
        "median_dot_error_px": float(np.median(errs)) if np.isfinite(np.median(errs)) else None,  # None: most missed
        "within_3px": float(np.mean(errs <= WITHIN_PX)),
    }


def run_one(pattern: str, source: str, seconds: float, max_iterations: int, every: int, seed: int,
            cfg: AutoencoderConcatPredictorWorldModelConfig, device: str | None) -> dict:
    """Train a fresh model on one pattern/source until the time or iteration budget runs out."""
    env = ToroidalDotConfig()
    if source == "replay":
        from record_session import record_session
        from session_explorer_lib import load_session

        root = Path(tempfile.mkdtemp(prefix="bench_sessions_"))
        path = record_session(pattern, 200, seed, root=root)
        robot = ReplayRobot(load_session(path.name, root=root))
        selector = None
    else:
        robot = ToroidalDotRobot(img_size=env.img_size, dot_radius=env.dot_radius, move_pixels=env.move_pixels, seed=seed)
        selector = make_selector(pattern, seed)
    wm = AutoencoderConcatPredictorWorldModel(robot, action_selector=selector, device=device, config=cfg)
    records, curve = [], []
    t0 = time.perf_counter()
    reached = {"dot_present": None, "median_under_10px": None, "within_3px_90": None}
    while len(records) < max_iterations and time.perf_counter() - t0 < seconds:
        records.append(wm.run_one_iteration())
        if len(records) % every == 0:
            point = {"iteration": len(records), "seconds": round(time.perf_counter() - t0, 1), **window_summary(records[-every:])}
            curve.append(point)
            print(f"{pattern}/{source} {json.dumps(point)}", file=sys.stderr, flush=True)
            if point.get("n"):
                if reached["dot_present"] is None and point["dot_present"] >= 0.9:
                    reached["dot_present"] = point["seconds"]
                if reached["median_under_10px"] is None and (point["median_dot_error_px"] or 1e9) < 10:
                    reached["median_under_10px"] = point["seconds"]
                if reached["within_3px_90"] is None and point["within_3px"] >= 0.9 and point["mse_ratio"] <= 0.5:
                    reached["within_3px_90"] = point["seconds"]
    final = window_summary(records[-100:])
    final["target_met"] = bool(final.get("n") and final["within_3px"] >= 0.9 and final["mse_ratio"] <= 0.5)
    return {"pattern": pattern, "source": source, "seed": seed, "iterations": len(records),
            "seconds": round(time.perf_counter() - t0, 1), "seconds_to": reached, "last_100": final, "curve": curve}


def _config(overrides_text: list[str]) -> tuple[AutoencoderConcatPredictorWorldModelConfig, dict]:
    """The environment's world-model settings with ``FIELD=VALUE`` overrides, and the overrides applied."""
    try:
        cfg = with_overrides(AutoencoderConcatPredictorWorldModelConfig.from_env(), overrides_text)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    return cfg, {item.split("=", 1)[0]: getattr(cfg, item.split("=", 1)[0]) for item in overrides_text}


def _cell(job: dict) -> dict:
    """One matrix cell in a fresh worker process (a Ray task): its own thread count, nothing shared with the others."""
    torch.set_num_threads(job["threads"])
    cfg, _ = _config(job["set"])
    result = run_one(job["pattern"], job["source"], job["seconds"], job["max_iterations"], job["every"], job["seed"], cfg, job["device"])
    result["threads"] = job["threads"]
    return result


def worst_cell(cells: list[dict]) -> dict:
    """The cell with the lowest within-3-px share of its last 100 predictions (ties: higher MSE ratio)."""
    def key(c):
        last = c["last_100"]
        return (last.get("within_3px", 0.0), -(last.get("mse_ratio") or float("inf")))
    c = min(cells, key=key)
    return {k: c[k] for k in ("pattern", "source", "seed", "threads", "iterations", "seconds")} | {"last_100": c["last_100"]}


def plot_matrix(cells: list[dict], path: Path) -> None:
    """Learning curves of every cell: within-3-px share and MSE ratio against iterations and seconds."""
    from matplotlib.figure import Figure  # no pyplot: nothing is kept in a global figure registry
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(14, 9))
    axes = fig.subplots(2, 2, sharey="row")
    colours = dict(zip(MATRIX_PATTERNS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for c in cells:
        pts = [p for p in c["curve"] if p.get("n")]
        if not pts:
            continue
        style = {"color": colours.get(c["pattern"], "grey"), "alpha": 0.6, "lw": 1,
                 "ls": "-" if c["source"] == "live" else "--", "marker": "o" if c["threads"] == 1 else None, "ms": 2}
        for col, xkey in enumerate(("iteration", "seconds")):
            xs = [p[xkey] for p in pts]
            axes[0, col].plot(xs, [p["within_3px"] for p in pts], **style)
            axes[1, col].plot(xs, [p["mse_ratio"] for p in pts], **style)
    for col, xlabel in enumerate(("iterations", "seconds")):
        axes[0, col].axhline(0.9, color="k", lw=0.8, ls=":")
        axes[1, col].axhline(0.5, color="k", lw=0.8, ls=":")
        axes[1, col].set_xlabel(xlabel)
    axes[0, 0].set_ylabel("share of predictions within 3 px (window)")
    axes[1, 0].set_ylabel("prediction MSE / copy-last-frame MSE")
    axes[1, 0].set_yscale("log")
    handles = [Line2D([], [], color=v, label=k) for k, v in colours.items()]
    handles += [Line2D([], [], color="k", ls="-", label="live"), Line2D([], [], color="k", ls="--", label="replay"),
                Line2D([], [], color="k", marker="o", ms=3, label="1 thread"), Line2D([], [], color="k", label="2 threads")]
    axes[0, 1].legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(f"Learning matrix: {len(cells)} cells, fresh model, default config; dotted lines are the targets")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def matrix_report(cells: list[dict], cfg, overrides: dict, seconds: float, parallel: dict, device: str,
                  log_name: str = "learning_matrix") -> dict:
    """The matrix JSON: every cell's last-100 summary, the worst cell overall and per pattern."""
    patterns = list(dict.fromkeys(c["pattern"] for c in cells))
    return {
        "benchmark": "learning_matrix",
        "device": device,
        "torch": torch.__version__,
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "seconds_per_cell": seconds,
        "parallel_cells": parallel,
        "config_overrides": overrides,
        "config": dataclasses.asdict(cfg),
        "targets": {"within_3px": 0.9, "mse_ratio": 0.5},
        "cells_at_target": sum(c["last_100"]["target_met"] for c in cells),
        "cells": len(cells),
        "worst_cell": worst_cell(cells),
        "worst_cell_per_pattern": {p: worst_cell([c for c in cells if c["pattern"] == p]) for p in patterns},
        "all": [{k: c[k] for k in ("pattern", "source", "seed", "threads", "iterations", "seconds")} | {"last_100": c["last_100"]} for c in cells],
        "png": str(OUT_DIR / f"{log_name}.png"),
    }


def start_ray(address: str | None, cpus: int | None) -> int:
    """Join the cluster at ``address``, or start a local one with ``cpus`` CPUs (default: this machine's);
    returns the cluster's CPUs."""
    import ray  # the sweep's one extra dependency (requirements-sweep.txt)

    if address:  # the nodes get this folder's code; the cells import the project's modules from it
        ray.init(address=address, runtime_env={"working_dir": str(REPO), "excludes": CODE_EXCLUDES})
    else:  # local workers import the project's modules from this checkout, wherever the driver was started
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    return int(ray.cluster_resources().get("CPU", 1))


def run_cells(jobs: list[dict], limit: int, log: Path) -> list[dict]:
    """Run the cells as Ray tasks, at most ``limit`` at once, each asking for its thread count in CPUs;
    each result is appended to ``log`` and reported as it arrives (in finishing order)."""
    import ray

    cell = ray.remote(max_calls=1)(_cell)  # a fresh worker process per cell, as a cell always had
    queue, pending, cells = list(jobs), [], []
    while queue or pending:
        while queue and len(pending) < limit:
            job = queue.pop(0)
            pending.append(cell.options(num_cpus=job["threads"]).remote(job))
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        cells.append(result)
        with open(log, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"cell {result['pattern']}/{result['source']}/seed {result['seed']}/{result['threads']}t: "
              f"{json.dumps(result['last_100'])}", file=sys.stderr, flush=True)
    return cells


def run_matrix(args) -> dict:
    import ray

    cfg, overrides = _config(args.set)
    patterns = args.patterns if args.patterns != list(PATTERNS) else list(MATRIX_PATTERNS)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    jobs = [{"pattern": p, "seed": seed, "source": src, "threads": threads, "seconds": args.seconds,
             "max_iterations": args.max_iterations, "every": args.every, "device": args.device, "set": args.set}
            for threads in args.threads_list for p in patterns for seed in args.seeds for src in args.sources]
    cpus = start_ray(args.address, args.cpus)
    try:
        cells = run_cells(jobs, args.jobs or len(jobs), OUT_DIR / f"{args.log}.jsonl")
    finally:
        ray.shutdown()
    plot_matrix(cells, OUT_DIR / f"{args.log}.png")
    parallel = {str(t): min(args.jobs or len(jobs), max(1, cpus // t)) for t in args.threads_list}  # cells at once
    report = matrix_report(cells, cfg, overrides, args.seconds, parallel, _device_name(args.device), args.log)
    return report | {"ray_cluster": {"address": args.address or "local", "cpus": cpus}}


def summarise_log(path: Path) -> dict:
    """Re-read the cells a matrix run (or several) appended to a JSONL log: report and picture again."""
    cells = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not cells:
        raise SystemExit(f"{path} holds no matrix cells")
    plot_matrix(cells, OUT_DIR / f"{Path(path).stem}.png")
    threads = sorted({c["threads"] for c in cells})
    seconds = max(c["seconds"] for c in cells)
    parallel = {str(t): max(1, (os.cpu_count() or 1) // t) for t in threads}
    return matrix_report(cells, AutoencoderConcatPredictorWorldModelConfig.from_env(), {}, seconds, parallel, _device_name(None),
                         Path(path).stem)


def _device_name(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), help="action patterns to run (matrix: all four)")
    parser.add_argument("--sources", nargs="+", default=["replay", "live"], choices=["replay", "live"], help="replayed session and/or live robot")
    parser.add_argument("--seconds", type=float, default=180.0, help="wall-clock budget per run")
    parser.add_argument("--max-iterations", type=int, default=100_000, help="iteration budget per run")
    parser.add_argument("--every", type=int, default=100, help="iterations per curve point")
    parser.add_argument("--seed", type=int, default=1234, help="environment seed (start position); the model seed is in config")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields (experiments)")
    parser.add_argument("--matrix", action="store_true", help="run the grid patterns x seeds x sources x threads")
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 22, 33], help="matrix: start seeds (never tuned on)")
    parser.add_argument("--threads-list", nargs="+", type=int, default=[1, 2], help="matrix: CPU thread counts")
    parser.add_argument("--jobs", type=int, default=0, help="matrix: at most this many cells at once (0: as many as "
                        "the cluster's CPUs hold, each cell taking its thread count)")
    parser.add_argument("--address", default=None, help="matrix: join the Ray cluster at this address (host:6379 or "
                        "ray://host:10001) instead of starting a local one")
    parser.add_argument("--cpus", type=int, default=None, help="matrix: CPUs of the local Ray cluster (default: this machine's)")
    parser.add_argument("--log", default="learning_matrix", help="matrix: name of its JSONL log and PNG in benchmarks/out "
                        "(or $CWM_BENCH_OUT)")
    parser.add_argument("--summarise", type=Path, metavar="JSONL", help="report the cells of a matrix log again (runs nothing)")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    if args.summarise:
        print(json.dumps(summarise_log(args.summarise), indent=1))
        return
    if args.matrix:
        print(json.dumps(run_matrix(args), indent=1))
        return
    torch.set_num_threads(args.threads)
    cfg, overrides = _config(args.set)

    runs = [run_one(p, s, args.seconds, args.max_iterations, args.every, args.seed + i, cfg, args.device)
            for i, p in enumerate(args.patterns) for s in args.sources]
    out = {
        "benchmark": "learning",
        "device": _device_name(args.device),
        "threads": args.threads,
        "torch": torch.__version__,
        "mkl_cbwr": os.environ.get("MKL_CBWR", ""),
        "config_overrides": overrides,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "all_targets_met": all(r["last_100"]["target_met"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
