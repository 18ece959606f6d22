"""Speed and memory benchmark of the Run loop. Prints one JSON object; not part of the test suite.

Measures, in one process so the ratios hold on a noisy machine:

* the model's GFLOP per iteration (one training step plus one prediction), counted with
  ``torch.utils.flop_counter``;
* the fp32 matmul rate of this device (GFLOP/s, a large square matmul) and from it the floor:
  the seconds one iteration would take if every FLOP ran at that rate;
* the median seconds per iteration of (a) the core loop (``run(1)``: observe, train, predict)
  and (b) the app path (the Run handler of the web app, default update cadence, with its images,
  graphs and attention capture), and efficiency = floor / measured for both;
* resident memory (RSS) at iterations 200 and 2,000 of the app path.

    python benchmarks/bench_world_model.py            # full: 2,000 app-path iterations
    python benchmarks/bench_world_model.py --quick    # a minute or so
    python benchmarks/bench_world_model.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CWM_SAVED_ROOT", tempfile.mkdtemp(prefix="bench_saved_"))  # never touch the user's saved/
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel  # noqa: E402
from models import build_canvas, canvas_to_tensor  # noqa: E402
from toroidal_action_selectors import make_selector  # noqa: E402
from toroidal_dot_robot import ToroidalDotRobot  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul rate (GFLOP/s) of an n x n by n x n product, best of ``repeats``."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats + 2):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def iteration_gflop(wm: AutoencoderConcatPredictorWorldModel) -> float:
    """FLOPs of one training step (forward + backward) and one prediction, in GFLOP."""
    robot = ToroidalDotRobot(seed=0)
    f = [robot.get_observation() for _ in range(3)]
    canvas = build_canvas([f[0], 1, f[1], 1, f[2]])
    imgs = canvas_to_tensor(canvas, wm.device)
    with FlopCounterMode(display=False) as counter:
        pred = wm.model.forward_with_patch_mask(imgs, wm.patch_mask)
        loss, _ = wm.model.loss(imgs, pred, wm.patch_mask)
        loss.backward()
        with torch.no_grad():
            wm.model.forward_with_patch_mask(imgs, wm.patch_mask)
    wm.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def time_core_loop(wm, iterations: int, warmup: int = 10) -> list[float]:
    """Seconds per ``run(1)`` call after a warm-up."""
    wm.run(warmup)
    times = []
    for _ in range(iterations):
        _sync(wm.device)
        t = time.perf_counter()
        wm.run(1)
        _sync(wm.device)
        times.append(time.perf_counter() - t)
    return times


def _encode_like_gradio(outputs) -> int:
    """Do the per-update work Gradio does after the handler: PNG-encode every image, JSON-encode
    every plot's DataFrame. Returns the bytes produced (so nothing is optimised away)."""
    import io

    import pandas as pd
    from PIL import Image

    n = 0
    for value in outputs:
        value = getattr(value, "value", value) if not isinstance(value, (np.ndarray, pd.DataFrame, dict)) else value
        if isinstance(value, dict):
            value = value.get("value")
        if isinstance(value, np.ndarray) and value.ndim == 3:
            buf = io.BytesIO()
            Image.fromarray(value).save(buf, format="PNG")
            n += buf.tell()
        elif isinstance(value, pd.DataFrame):
            n += len(value.to_json(orient="split"))
    return n


def time_app_path(iterations: int, rss_at: tuple[int, ...], run_size: int = 100) -> dict:
    """Drive the web app's Run handler as the page does: Runs of ``run_size`` iterations, each update
    encoded as Gradio would, each Run ending with its checkpoint save and attention capture.

    Returns median seconds per iteration over the Runs, updates per second and RSS (bytes) at the
    iteration counts in ``rss_at``.
    """
    from record_session import record_session

    import concat_world_model_explorer_gradio as app

    session_dir = record_session("alternate", 200, 0, root=Path(os.environ["CWM_SAVED_ROOT"]) / "sessions" / "toroidal_dot")
    user = app.UserState()
    app.load_session(session_dir.name, user)
    proc = psutil.Process()
    per_iteration, updates, rss, done = [], 0, {}, 0
    t_all = time.perf_counter()
    while done < iterations:
        n = min(run_size, iterations - done)
        t = time.perf_counter()
        for outputs in app.run_world_model(n, user):
            _encode_like_gradio(outputs[1:])
            updates += 1
        per_iteration.append((time.perf_counter() - t) / n)
        done += n
        for k in rss_at:
            if done >= k and k not in rss:
                gc.collect()
                rss[k] = proc.memory_info().rss
    return {"median_s": statistics.median(per_iteration), "updates_per_s": round(updates / (time.perf_counter() - t_all), 2), "rss": rss}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (RSS at 50 and 200 instead of 200 and 2,000)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--core-iterations", type=int, default=None, help="timed core-loop iterations")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=0), make_selector("alternate"), device=device)
    gflop = iteration_gflop(wm)
    rate = matmul_gflops(device)
    floor = gflop / rate
    core = time_core_loop(wm, args.core_iterations or (30 if args.quick else 100))
    rate_after = matmul_gflops(device)  # the machine may have been busier by now: keep the better rate
    rate = max(rate, rate_after)
    floor = gflop / rate
    del wm
    gc.collect()

    rss_at = (50, 200) if args.quick else (200, 2000)
    app = time_app_path(rss_at[-1], rss_at)
    core_s = statistics.median(core)
    out = {
        "benchmark": "world_model_speed",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "threads": args.threads,
        "torch": torch.__version__,
        "gflop_per_iteration": round(gflop, 3),
        "matmul_gflops": round(rate, 1),
        "floor_s": round(floor, 5),
        "core_loop_median_s": round(core_s, 5),
        "core_loop_efficiency": round(floor / core_s, 3),
        "app_path_median_s": round(app["median_s"], 5),
        "app_path_efficiency": round(floor / app["median_s"], 3),
        "app_updates_per_s": app.get("updates_per_s"),
        "rss_mb": {str(k): round(v / 2**20, 1) for k, v in app["rss"].items()},
        "rss_growth_mb": round((app["rss"][rss_at[-1]] - app["rss"][rss_at[0]]) / 2**20, 1),
        "targets": {"core_loop_efficiency": 0.85, "app_path_efficiency": 0.75, "rss_growth_mb": 50},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
