"""The learning sweep (``benchmarks/bench_learning.py --matrix``) on Ray, run as a user runs it: two
tiny cells as Ray tasks on a local two-CPU cluster, streamed into the JSONL log and summarised."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

TINY_SET = ["embed_dim=32", "num_heads=2", "decoder_embed_dim=32", "decoder_depth=2", "decoder_position=canvas"]  # a tiny model


def test_two_cells_run_as_ray_tasks_and_are_logged_and_summarised(tmp_path):
    env = {**os.environ, "CWM_BENCH_OUT": str(tmp_path), "CWM_SAVED_ROOT": str(tmp_path / "saved")}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_learning.py"), "--matrix", "--patterns", "alternate",
           "--seeds", "11", "--sources", "replay", "live", "--threads-list", "1", "--max-iterations", "4",
           "--every", "2", "--cpus", "2", "--log", "sweep", "--set", *TINY_SET]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["ray_cluster"] == {"address": "local", "cpus": 2}  # the local cluster the cells ran on
    assert summary["benchmark"] == "learning_matrix" and summary["cells"] == 2
    assert summary["parallel_cells"] == {"1": 2}  # two 1-CPU cells at once on the two-CPU cluster
    assert summary["config_overrides"] == {"embed_dim": 32, "num_heads": 2, "decoder_embed_dim": 32, "decoder_depth": 2,
                                           "decoder_position": "canvas"}
    assert sorted(c["source"] for c in summary["all"]) == ["live", "replay"]
    assert all(c["iterations"] == 4 and c["last_100"]["n"] == 2 for c in summary["all"])  # 2 scored predictions each
    logged = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert sorted((c["source"], c["threads"]) for c in logged) == [("live", 1), ("replay", 1)]
    assert all(len(c["curve"]) == 2 for c in logged)  # a curve point every 2 iterations
    assert (tmp_path / "sweep.png").stat().st_size > 0
