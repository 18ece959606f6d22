"""Whole-session evaluation speed. Prints one JSON object; not part of the test suite.

Records a ``--frames``-frame session (pattern random, seed 5) into a temporary ``saved/`` folder and
times the evaluation of every transition with the default model (a fresh one: the time does not
depend on the weights):

* ``engine``: ``RunController.evaluate`` on a session loaded from disk for each repeat (so frames
  are decoded from PNG every time), per batch size;
* ``endpoint``: ``/evaluate_session`` called through ``gradio_client`` on the real app launched as a
  subprocess (what a user waits for: loading the session, predicting, the table and the plot data,
  the HTTP round trip). The first call also creates the tab's model; it is reported apart.

The target is a 200-frame session in at most 10 s on the project's 2-core CPU. The result is
also appended to ``benchmarks/out/evaluate.jsonl``.

    python benchmarks/bench_evaluate.py                 # 200 frames, 3 repeats
    python benchmarks/bench_evaluate.py --frames 500 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
from bench_common import machine_info, report, same_sums  # noqa: E402
from conftest import launch_app, stop_process  # noqa: E402
from gradio_client import Client  # noqa: E402

from run_controller import RunController  # noqa: E402
from record_session import record_session  # noqa: E402
from session_explorer_lib import load_session  # noqa: E402

SESSION = "bench_eval"


def time_engine(root: Path, checkpoint: Path, batch_sizes: tuple[int, ...], repeats: int) -> dict:
    controller = RunController(checkpoint_path=checkpoint, device="cpu")
    out = {}
    for batch in batch_sizes:
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            evaluation = controller.evaluate(load_session(SESSION, root=root), batch)
            seconds.append(time.perf_counter() - started)
        out[str(batch)] = {"median_s": round(statistics.median(seconds), 3), "runs_s": [round(s, 3) for s in seconds],
                           "transitions": len(evaluation.mse)}
    return out


def time_endpoint(saved_root: Path, work: Path, repeats: int) -> dict:
    server = launch_app(saved_root, work, e2e=False)
    try:
        client = Client(server.url, verbose=False, download_files=str(work / "downloads"))
        seconds = []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            text, _ = client.predict(SESSION, api_name="/evaluate_session")
            seconds.append(time.perf_counter() - started)
        client.close()
    finally:
        stop_process(server.proc)
    return {"first_call_s": round(seconds[0], 3), "median_s": round(statistics.median(seconds[1:]), 3),
            "runs_s": [round(s, 3) for s in seconds[1:]], "reported_in_page": text.split(" in ")[1].split(" (")[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames in the recorded session")
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per setting")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64], help="engine batch sizes to time")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        saved_root = Path(tmp) / "saved"
        root = saved_root / "sessions" / "toroidal_dot"
        record_session("random", args.frames - 1, 5, name=SESSION, root=root)
        engine = time_engine(root, Path(tmp) / "engine.pth", tuple(args.batch_sizes), args.repeats)
        endpoint = time_endpoint(saved_root, Path(tmp), args.repeats)
    out = {
        "benchmark": "evaluate_session",
        **machine_info(),
        "threads": torch.get_num_threads(),
        "frames": args.frames,
        "engine_by_batch": engine,
        "endpoint": endpoint,
        "target_s": 10.0,
        "target_met": endpoint["median_s"] <= 10.0 and endpoint["first_call_s"] <= 10.0,
    }
    report(out, "evaluate.jsonl")


if __name__ == "__main__":
    main()
