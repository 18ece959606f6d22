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
from config import AutoencoderConcatPredictorWorldModelConfig, ToroidalDotConfig  # noqa: E402
from toroidal_action_selectors import make_selector  # noqa: E402
from toroidal_dot_robot import ToroidalDotRobot  # noqa: E402

PATTERNS = ("always_move", "alternate", "double_move")


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
        "within_3px": float(np.mean(errs <= 3.0)),
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
        selector = make_selector(pattern)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), help="action patterns to run")
    parser.add_argument("--sources", nargs="+", default=["replay", "live"], choices=["replay", "live"], help="replayed session and/or live robot")
    parser.add_argument("--seconds", type=float, default=180.0, help="wall-clock budget per run")
    parser.add_argument("--max-iterations", type=int, default=100_000, help="iteration budget per run")
    parser.add_argument("--every", type=int, default=100, help="iterations per curve point")
    parser.add_argument("--seed", type=int, default=1234, help="environment seed (start position); the model seed is in config")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override config fields (experiments)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = AutoencoderConcatPredictorWorldModelConfig()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        current = getattr(cfg, key)
        if isinstance(current, str):
            overrides[key] = value
        elif current is None:  # optional fields: take the JSON value as it is
            overrides[key] = json.loads(value)
        else:
            overrides[key] = type(current)(json.loads(value))
    cfg = dataclasses.replace(cfg, **overrides)

    runs = [run_one(p, s, args.seconds, args.max_iterations, args.every, args.seed + i, cfg, args.device)
            for i, p in enumerate(args.patterns) for s in args.sources]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {
        "benchmark": "learning",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "config_overrides": overrides,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "all_targets_met": all(r["last_100"]["target_met"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
