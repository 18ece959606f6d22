"""Server memory over many API clients. Prints one JSON object; not part of the test suite.

Launches the real app (``concat_world_model_explorer_gradio.py``) as a subprocess, once per
configuration, against a temporary ``saved/`` folder holding one small recorded session, and runs
``--cycles`` connect-run-close cycles of ``gradio_client`` clients: connect, ``/load_session``,
``/run_world_model`` for ``--iterations`` iterations, close. Every client gets its own model at its
first run. API clients' Gradio state lives on for an hour after they leave (production behaviour:
``GRADIO_IS_E2E_TEST`` is never set here), so within the benchmark only the app's ``ModelPool``
frees their models: at most 4 stay resident, and any model idle for ``CWM_IDLE_PARK_S`` is parked
to a file under ``TMPDIR`` and freed.

The server's resident memory (VmRSS in ``/proc/<pid>/status``, MB) is read after launch, after
every cycle and once more ``--settle-s`` after the last cycle. Configurations:

* ``default``: malloc arenas capped at 2, models parked after 300 s idle (so within the run only
  the 4-model cap frees memory);
* ``park_fast``: arenas capped at 2, models parked after 2 s idle;
* ``no_arena_cap``: glibc's default arenas (one per thread), models parked after 300 s idle.

The result is also appended to ``benchmarks/out/memory.jsonl``.

    python benchmarks/bench_memory.py                              # all configurations, 20 cycles
    python benchmarks/bench_memory.py --configs park_fast --cycles 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_common import machine_info, report  # noqa: E402
from conftest import launch_app, stop_process  # noqa: E402
from gradio_client import Client  # noqa: E402

from record_session import record_session  # noqa: E402

SESSION = "bench_alt"
# name -> the environment the app is launched with (every knob explicit, so the caller's shell cannot leak in)
CONFIGS = {
    "default": {"CWM_MALLOC_ARENAS": "2", "CWM_IDLE_PARK_S": "300"},
    "park_fast": {"CWM_MALLOC_ARENAS": "2", "CWM_IDLE_PARK_S": "2"},
    "no_arena_cap": {"CWM_MALLOC_ARENAS": "0", "CWM_IDLE_PARK_S": "300"},
}
PARKED_LINE = "parked an idle model"
RELOADED_LINE = "reloaded a parked model"


def proc_status_mb(pid: int, key: str = "VmRSS") -> float:
    """A memory line of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``, ...) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / 1024, 1)  # the kernel writes kB
    raise KeyError(f"{key} not in /proc/{pid}/status")


def launch_server(work: Path, saved_root: Path, env_extra: dict[str, str]):
    """Start the app with production Gradio settings (no GRADIO_IS_E2E_TEST) and its temp files
    under ``work``; returns the running ``AppServer`` once its HTTP root answers."""
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    return launch_app(saved_root, work, env_extra={"TMPDIR": str(work / "tmp"), **env_extra}, e2e=False)


def one_cycle(url: str, downloads: Path, iterations: int) -> None:
    """Connect, load the session, run, close: what a script using the API does."""
    client = Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)
    try:
        client.predict(SESSION, api_name="/load_session")
        client.predict(iterations, api_name="/run_world_model")
    finally:
        client.close()


def measure_config(name: str, cycles: int, iterations: int, settle_s: float) -> dict:
    """One fresh server under configuration ``name``: RSS after launch, after each cycle and after settling."""
    with tempfile.TemporaryDirectory(prefix=f"bench_memory_{name}_", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        saved_root = work / "saved"
        record_session("alternate", 30, 0, name=SESSION, root=saved_root / "sessions" / "toroidal_dot")
        server = launch_server(work, saved_root, CONFIGS[name])
        proc, url, log_path = server.proc, server.url, server.log_path
        try:
            time.sleep(1.0)  # let the freshly answering server finish its start-up allocations
            start = proc_status_mb(proc.pid)
            rss, seconds = [], []
            for _ in range(cycles):
                t = time.perf_counter()
                one_cycle(url, work / "downloads", iterations)
                seconds.append(time.perf_counter() - t)
                rss.append(proc_status_mb(proc.pid))
            time.sleep(settle_s)
            final = proc_status_mb(proc.pid)
            peak = proc_status_mb(proc.pid, "VmHWM")
            log = log_path.read_text(errors="replace")
            park_files = len(list((work / "tmp").glob("cwm-parked-*/*.park")))
        finally:
            stop_process(proc)
    return {
        "env": CONFIGS[name],
        "rss_mb_start": start,
        "rss_mb_cycles": rss,
        "rss_mb_max": max([start, *rss, final]),
        "rss_mb_final": final,
        "growth_mb": round(final - start, 1),
        "growth_after_cycle_1_mb": round(final - rss[0], 1) if rss else None,  # without the first model's one-time costs
        "vm_hwm_mb": peak,  # the kernel's peak RSS, between the readings too
        "parked_lines": log.count(PARKED_LINE),
        "reloaded_lines": log.count(RELOADED_LINE),
        "park_files_at_end": park_files,  # models living on disk rather than in memory
        "cycle_median_s": round(statistics.median(seconds), 2) if seconds else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to measure, each in its own fresh server")
    parser.add_argument("--cycles", type=int, default=20, help="connect-run-close cycles per configuration")
    parser.add_argument("--iterations", type=int, default=2, help="iterations each client runs")
    parser.add_argument("--settle-s", type=float, default=10.0, help="seconds to wait after the last cycle")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill runs the finally blocks that stop the servers

    t0 = time.perf_counter()
    configs = {name: measure_config(name, args.cycles, args.iterations, args.settle_s) for name in args.configs}
    out = {
        "benchmark": "server_memory",
        **machine_info(),
        "cycles": args.cycles,
        "iterations": args.iterations,
        "settle_s": args.settle_s,
        "seconds": round(time.perf_counter() - t0, 1),
        "configs": configs,
    }
    report({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **out}, "memory.jsonl")


if __name__ == "__main__":
    main()
