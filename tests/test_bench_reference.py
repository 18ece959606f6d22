"""``benchmarks/bench_reference.py`` run as a user runs it, tiny: the reference extracted from the local
git mirror, both loops timed in alternating fresh processes, one JSON object printed and logged,
the private temporary folder gone afterwards. Skipped where the mirror is absent (CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

MIRROR = "/work/.mirror/ih+developmental-robot-movement/repo"  # the benchmark's default reference


@pytest.mark.slow  # ~20 s: two fresh processes a side
@pytest.mark.skipif(not os.path.isdir(MIRROR), reason=f"no git mirror of the reference implementation at {MIRROR}")
def test_both_loops_are_timed_in_alternating_rounds_and_logged(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "CWM_BENCH_OUT": str(tmp_path), "TMPDIR": str(scratch)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_reference.py"),
           "--rounds", "2", "--warmup", "3", "--iterations", "1", "--threads", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out == json.loads((tmp_path / "reference.jsonl").read_text().splitlines()[-1])
    assert not list(scratch.glob("bench_reference_*"))  # the extracted reference is removed (torch may leave its own)
    assert out["reference_source"]["commit"].startswith("da831d0")
    assert out["reference_source"]["stood_in_for"] == [] and out["reference_source"]["patched"] == []
    assert out["threads_in_children"] == {"ours": 1, "reference": 1}
    assert [r["order"] for r in out["rounds"]] == [["ours", "reference"], ["reference", "ours"]]
    for r in out["rounds"]:
        assert len(r["ours_times_s"]) == len(r["reference_times_s"]) == 1
        assert r["ratio_median"] == pytest.approx(r["reference"]["median_s"] / r["ours"]["median_s"], rel=1e-2)
    assert out["ours"]["n"] == out["reference"]["n"] == 2
    models = out["models"]
    assert (models["reference"]["embed_dim"], models["reference"]["depth"]) == (256, 5)  # the spec-sized model
    assert models["reference"]["parameters"] > models["ours"]["parameters"] > 0
    assert out["cpu"]["torch_cpu_capability"] and out["target_ratio"] == 1.3


def test_fewer_than_three_warm_up_iterations_are_refused(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_reference.py"), "--warmup", "2"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--warmup must be at least 3" in done.stderr
