"""benchmarks/gpu_check.sh, the one script a developer lent a GPU runs: its logic, on the CPU.

``--device cpu --smoke`` takes every step the GPU run takes (environment, tests, speed benchmark,
learning matrix, summary) at the smallest sizes, so a broken step shows here and not on the
rare machine with a GPU."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu_and_writes_a_summary(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "CWM_SAVED_ROOT": str(tmp_path / "saved")}  # nothing lands in benchmarks/out
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {"environment", "tests", "speed_default", "learning_matrix"}  # no fp32 rerun on a CPU
    assert all(step["exit_code"] == 0 for step in summary.values())
    assert summary["environment"]["result"]["requested"] == "cpu"
    speed = summary["speed_default"]["result"]
    assert speed["benchmark"] == "world_model_speed" and speed["device"] == "cpu"
    assert speed["core_loop_median_s"] > 0 and speed["kernel_floor"]["total_s"] > 0
    assert speed["kernel_floor"]["attention_backward_s"] > 0 and speed["gflop_per_iteration"] > 1
    matrix = summary["learning_matrix"]["result"]
    assert matrix["benchmark"] == "learning_matrix" and matrix["cells"] == 2  # alternate x seed 11 x replay/live
    assert len((tmp_path / "gpu_check_smoke_matrix.jsonl").read_text().splitlines()) == 2  # the cells' log, beside the summary
    assert json.loads((tmp_path / "speed.jsonl").read_text().splitlines()[-1])["benchmark"] == "world_model_speed"
