"""Where a run's torch threads compute: the Run loop's iteration time in three placements.

- ``main``: the loop in the thread that set the count (as the bare benchmarks run it);
- ``second_team``: the loop in a worker thread after the main thread computed with the same count
  (what the app and the trainer did until 2026-12-05: the thread that built the model and the run's
  worker each kept a team of OpenMP workers);
- ``one_team``: the main thread computes with one; the loop runs in a worker thread that took its
  count with ``run_controller.use_threads`` (what the app and the trainer do now).

Each placement runs in a fresh process (a thread's team of workers lives as long as the thread),
builds the default model on the live robot (alternate pattern, seed 22), warms up 20 iterations and
times ``--iterations``; the placements alternate for ``--rounds`` rounds. Prints one JSON object
(lscpu flags, torch's CPU capability, seconds per iteration per placement and round, medians, ratios
to ``main``) and appends it to ``benchmarks/out/threads.jsonl``. Not part of the test suite.

    python benchmarks/bench_threads.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_common import machine_info, report, same_sums  # noqa: E402
from bench_time_to_dot import cpu_info  # noqa: E402

PLACEMENTS = ("main", "second_team", "one_team")


def placement(name: str, threads: int, iterations: int) -> float:
    """Seconds per iteration of the loop placed as ``name`` (run in a process of its own)."""
    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
    from config import AutoencoderConcatPredictorWorldModelConfig
    from run_controller import use_threads
    from toroidal_action_selectors import make_selector
    from toroidal_dot_robot import ToroidalDotRobot

    cfg = AutoencoderConcatPredictorWorldModelConfig()
    torch.set_num_threads(1 if name == "one_team" else threads)
    robot = ToroidalDotRobot(img_size=cfg.frame_size[0], seed=22, move_pixels=27, dot_radius=5)
    wm = AutoencoderConcatPredictorWorldModel(robot, action_selector=make_selector("alternate", 22), device="cpu",
                                              config=cfg)
    wm.run_one_iteration()  # the first iteration in the thread that built the model, as a run's set-up is

    def loop() -> float:
        for _ in range(20):  # warm-up
            wm.run_one_iteration()
        t0 = time.perf_counter()
        for _ in range(iterations):
            wm.run_one_iteration()
        return (time.perf_counter() - t0) / iterations

    if name == "main":
        return loop()
    out: list[float] = []
    worker = threading.Thread(target=lambda: (use_threads(threads if name == "one_team" else None), out.append(loop())))
    worker.start()
    worker.join()
    return out[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60, help="timed iterations per placement and round")
    parser.add_argument("--placement", choices=PLACEMENTS, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    if args.placement:
        print(placement(args.placement, args.threads, args.iterations))
        return

    from autoencoder_concat_predictor_world_model import compute_path
    from config import AutoencoderConcatPredictorWorldModelConfig

    times: dict[str, list[float]] = {name: [] for name in PLACEMENTS}
    for _ in range(args.rounds):
        for name in PLACEMENTS:
            child = subprocess.run([sys.executable, __file__, "--placement", name, "--threads", str(args.threads),
                                    "--iterations", str(args.iterations)], capture_output=True, text=True, check=True)
            times[name].append(round(float(child.stdout.split()[-1]), 5))
    median = {name: statistics.median(ts) for name, ts in times.items()}
    out = {
        "benchmark": "threads", **machine_info(), "cpu": cpu_info(), "threads": args.threads,
        "compute_path": compute_path("cpu", AutoencoderConcatPredictorWorldModelConfig(), args.threads),
        "iterations_per_round": args.iterations, "seconds_per_iteration": times,
        "median_seconds_per_iteration": median,
        "ratio_to_main": {name: round(m / median["main"], 3) for name, m in median.items()},
    }
    report(out, "threads.jsonl")


if __name__ == "__main__":
    main()
