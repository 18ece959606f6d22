"""Speed and memory benchmark of the Run loop. Prints one JSON object; not part of the test suite.

Measures, in one process so the ratios hold on a noisy machine:

* the FLOPs of one loop iteration as it runs (one training step at the loop's batch, replayed
  canvases included, plus one prediction), counted with ``torch.utils.flop_counter``, attention
  included (the CPU's attention kernels are not in its table; they are added here);
* two floors for that iteration: the **matmul floor**, every FLOP at the rate of one large fp32
  matmul, and the **kernel floor**, the sum of the iteration's own matrix products and attention
  calls (forward and backward, every shape and count the profiler saw) each timed alone with the
  same threads and dtype. The second says how much time is in kernels and how much around them;
  head-width-16 attention over 603 tokens never runs at the large-matmul rate, so the first is
  out of reach for this model on a CPU;
* the median seconds per iteration of (a) the core loop (``run(1)``: observe, train, predict) and
  (b) the app path (the Run handler of the web app, default update cadence, with its images,
  graphs, run-history snapshots and attention capture), with efficiency = floor / measured;
* the core loop against another commit of this project (default: the one before the speed work,
  which ran at 1.02x the reference implementation), both in fresh processes, in
  alternating rounds;
* resident memory (RSS) at iterations 200 and 2,000 of the app path, and on CUDA the GPU memory
  allocated after the first and the last Run;
* the ten largest operators of one iteration (self time), the profile behind the numbers.

    python benchmarks/bench_world_model.py            # full: 2,000 app-path iterations
    python benchmarks/bench_world_model.py --quick    # a few minutes
    python benchmarks/bench_world_model.py --device cuda [--precision fp32]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
if "CWM_SAVED_ROOT" not in os.environ:  # never touch the user's saved/; remove the benchmark's own at exit
    os.environ["CWM_SAVED_ROOT"] = tempfile.mkdtemp(prefix="bench_saved_")
    atexit.register(shutil.rmtree, os.environ["CWM_SAVED_ROOT"], ignore_errors=True)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils import flop_counter  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bench_common import machine_info, report, same_sums  # noqa: E402

BASELINE_COMMIT = "fdc8bbe"  # the project before the speed work (spec-sized model, batch of 1)
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
ATTENTION_FORWARD = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
                     "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention")
ATTENTION_BACKWARD = tuple(name + "_backward" for name in ATTENTION_FORWARD)
DTYPES = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16, "double": torch.float64}

# the timing snippet run in a fresh process for each side of the comparison (old commits have the same API)
CORE_SNIPPET = r"""
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot
wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=0), make_selector("alternate"), device=sys.argv[3])
wm.run(10)
times = []
for _ in range(int(sys.argv[2])):
    if wm.device.type == "cuda": torch.cuda.synchronize()
    t = time.perf_counter(); wm.run(1)
    if wm.device.type == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times)))
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best_time(fn, device: torch.device, repeats: int = 15) -> float:
    """Median seconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def _sdpa_forward_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(q, k, v)


def _sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, q, k, v)


def iteration_gflop(wm) -> float:
    """FLOPs of one loop iteration as the loop runs it (training step at its batch + prediction), GFLOP."""
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        wm.run(1)
    return counter.get_total_flops() / 1e9


def profile_iterations(wm, n: int = 5):
    """Profiler events (with shapes and dtypes) of ``n`` loop iterations."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if wm.device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        wm.run(n)
        _sync(wm.device)
    return prof


def top_operators(prof, n_iterations: int, device: torch.device, k: int = 10) -> list[dict]:
    """The ``k`` operators with the most self time per iteration (device time on CUDA), in ms."""
    rows = []
    for e in prof.key_averages():
        t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if t > 0:
            rows.append({"op": e.key, "ms_per_iteration": round(t / 1e3 / n_iterations, 3), "calls_per_iteration": e.count / n_iterations})
    return sorted(rows, key=lambda r: -r["ms_per_iteration"])[:k]


def kernel_floor(prof, n_iterations: int, device: torch.device) -> dict:
    """Time every matrix product and attention call the iteration made, alone, with the same shapes
    and dtypes; returns seconds per iteration by kind and their sum."""
    calls: dict[tuple, int] = {}
    for e in prof.events():
        if e.name in GEMMS or e.name in ATTENTION_FORWARD or e.name in ATTENTION_BACKWARD:
            dtype = next((d for d in e.input_dtypes if d), "float")
            key = (e.name, tuple(tuple(s) for s in e.input_shapes if s), dtype)
            calls[key] = calls.get(key, 0) + 1
    seconds = {"gemm_s": 0.0, "attention_forward_s": 0.0, "attention_backward_s": 0.0}
    for (name, shapes, dtype_name), count in calls.items():
        dtype = DTYPES.get(dtype_name, torch.float32)
        per_iteration = count / n_iterations
        if name in GEMMS:
            args = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
            op = getattr(torch, name.split("::")[1])
            seconds["gemm_s"] += per_iteration * _best_time(lambda: op(*args), device)
        elif name in ATTENTION_FORWARD:
            q, k, v = (torch.randn(s, device=device, dtype=dtype) for s in shapes[:3])
            with torch.no_grad():
                seconds["attention_forward_s"] += per_iteration * _best_time(lambda: F.scaled_dot_product_attention(q, k, v), device)
        else:  # backward: inputs are (grad_out, q, k, v, out, ...)
            q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in shapes[1:4])
            out = F.scaled_dot_product_attention(q, k, v)
            grad = torch.randn_like(out)
            seconds["attention_backward_s"] += per_iteration * _best_time(
                lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True), device)
    seconds["total_s"] = sum(seconds.values())
    return {k: round(v, 5) for k, v in seconds.items()}


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


def compare_with_commit(commit: str, rounds: int, iterations: int, threads: int, device: str) -> dict | None:
    """Core-loop median s/iteration of this tree and of ``commit``, each in a fresh process, alternating."""
    with tempfile.TemporaryDirectory(prefix="bench_baseline_") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True)
        if archive.returncode:
            return {"commit": commit, "error": archive.stderr.decode(errors="replace").strip()[:200]}
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        pairs = []
        for _ in range(rounds):
            pair = []
            for root in (str(REPO), tmp):
                out = subprocess.run([sys.executable, "-c", CORE_SNIPPET, str(threads), str(iterations), device],
                                     cwd=root, env={**env, "PYTHONPATH": root}, capture_output=True, text=True)
                if out.returncode:
                    return {"commit": commit, "error": out.stderr.strip().splitlines()[-1][:200]}
                pair.append(json.loads(out.stdout.strip().splitlines()[-1]))
            pairs.append(pair)
    ratios = [theirs / ours for ours, theirs in pairs]
    return {"commit": commit, "this_tree_s": [round(p[0], 5) for p in pairs], "commit_s": [round(p[1], 5) for p in pairs],
            "speedup_per_round": [round(r, 3) for r in ratios], "speedup_median": round(statistics.median(ratios), 3)}


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


def time_app_path(iterations: int, rss_at: tuple[int, ...], model_cfg, run_size: int = 100) -> dict:
    """Drive the web app's Run handler as the page does: Runs of ``run_size`` iterations, each update
    encoded as Gradio would, each Run ending with its checkpoint save and attention capture.

    Returns median seconds per iteration over the Runs, updates per second, RSS (bytes) at the
    iteration counts in ``rss_at`` and, on CUDA, GPU memory allocated after the first and last Run.
    """
    from page_common import UserState
    from page_run import run_world_model
    from page_sessions import load_session
    from record_session import record_session

    session_dir = record_session("alternate", 200, 0, root=Path(os.environ["CWM_SAVED_ROOT"]) / "sessions" / "toroidal_dot")
    user = UserState(config=model_cfg)
    load_session(session_dir.name, user)
    proc = psutil.Process()
    per_iteration, updates, rss, gpu, done = [], 0, {}, [], 0
    t_all = time.perf_counter()
    while done < iterations:
        n = min(run_size, iterations - done)
        t = time.perf_counter()
        for outputs in run_world_model(n, user):
            _encode_like_gradio(outputs[1:])
            updates += 1
        per_iteration.append((time.perf_counter() - t) / n)
        done += n
        if torch.cuda.is_available():
            gpu.append(torch.cuda.memory_allocated())
        for k in rss_at:
            if done >= k and k not in rss:
                gc.collect()
                rss[k] = proc.memory_info().rss
    return {"median_s": statistics.median(per_iteration), "updates_per_s": round(updates / (time.perf_counter() - t_all), 2),
            "rss": rss, "gpu_allocated": gpu}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (RSS at 50 and 200 instead of 200 and 2,000)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="on CUDA (default: the config's, bf16)")
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--core-iterations", type=int, default=None, help="timed core-loop iterations")
    parser.add_argument("--against", default=BASELINE_COMMIT, help="commit to compare the core loop with ('' to skip)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of that comparison (default 3, quick 1)")
    parser.add_argument("--skip-app", action="store_true", help="core loop only (no gradio needed)")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    if args.precision:
        os.environ["CWM_CUDA_PRECISION"] = args.precision  # read by config.from_env() here and in the app's main()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    import config
    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
    from toroidal_action_selectors import make_selector
    from toroidal_dot_robot import ToroidalDotRobot

    _, model_cfg = config.from_env()
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=0), make_selector("alternate"), device=device,
                                              config=model_cfg)
    core = time_core_loop(wm, args.core_iterations or (30 if args.quick else 100))  # warms up graphs and caches too
    gflop = iteration_gflop(wm)
    prof_n = 5
    prof = profile_iterations(wm, prof_n)
    kernels = kernel_floor(prof, prof_n, device)
    tops = top_operators(prof, prof_n, device)
    rate = matmul_gflops(device)
    core_s = statistics.median(core)
    graphs = wm.graph_status()
    del wm, prof
    gc.collect()

    rounds = args.rounds or (1 if args.quick else 3)
    against = compare_with_commit(args.against, rounds, 20 if args.quick else 40, args.threads, str(device)) if args.against else None

    out = {
        "benchmark": "world_model_speed",
        **machine_info(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "precision": ("bf16" if os.environ.get("CWM_CUDA_PRECISION", "bf16") == "bf16" else "fp32") if device.type == "cuda" else "fp32",
        "cuda_graphs": graphs,
        "gflop_per_iteration": round(gflop, 3),
        "matmul_gflops": round(rate, 1),
        "matmul_floor_s": round(gflop / rate, 5),
        "kernel_floor": kernels,
        "core_loop_median_s": round(core_s, 5),
        "core_loop_min_s": round(min(core), 5),
        "core_loop_matmul_efficiency": round(gflop / rate / core_s, 3),
        "core_loop_kernel_efficiency": round(kernels["total_s"] / core_s, 3),
        "around_kernels_s": round(core_s - kernels["total_s"], 5),
        "against": against,
    }
    if not args.skip_app:
        rss_at = (50, 200) if args.quick else (200, 2000)
        app = time_app_path(rss_at[-1], rss_at, model_cfg)
        out.update({
            "app_path_median_s": round(app["median_s"], 5),
            "app_path_kernel_efficiency": round(kernels["total_s"] / app["median_s"], 3),
            "app_updates_per_s": app["updates_per_s"],
            "rss_mb": {str(k): round(v / 2**20, 1) for k, v in app["rss"].items()},
            "rss_growth_mb": round((app["rss"][rss_at[-1]] - app["rss"][rss_at[0]]) / 2**20, 1),
        })
        if app["gpu_allocated"]:
            out["gpu_allocated_mb_first_last_run"] = [round(app["gpu_allocated"][0] / 2**20, 1), round(app["gpu_allocated"][-1] / 2**20, 1)]
    out["top_operators"] = tops
    out["targets"] = ({"core_loop_median_s": 0.005, "app_path_median_s": 0.015} if device.type == "cuda" else
                      {"speedup_vs_reference": 1.3, "core_loop_matmul_efficiency": 0.6}) | {"rss_growth_mb": 50}
    report(out, "speed.jsonl")


if __name__ == "__main__":
    main()
