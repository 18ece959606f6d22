"""Export speed. Prints one JSON object; not part of the test suite.

Launches the real app against a temporary ``saved/`` folder with one recorded session, runs
``--iterations`` iterations through ``gradio_client`` and times ``/export`` (building the zip of eight
PNG pictures, the metric CSV and JSON files, plus Gradio handing the file to the client), and
``/browse_history`` for a few iterations. The target is an export under 5 s. The result is
also appended to ``benchmarks/out/export.jsonl``.

    python benchmarks/bench_export.py [--iterations 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from bench_common import machine_info, report  # noqa: E402
from conftest import launch_app, stop_process  # noqa: E402
from gradio_client import Client  # noqa: E402

from record_session import record_session  # noqa: E402

SESSION = "bench_export"


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="iterations run before exporting")
    parser.add_argument("--repeats", type=int, default=3, help="timed exports")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        saved = Path(tmp) / "saved"
        record_session("alternate", 200, 1, name=SESSION, root=saved / "sessions" / "toroidal_dot")
        server = launch_app(saved, Path(tmp), e2e=False)
        try:
            client = Client(server.url, verbose=False, download_files=str(Path(tmp) / "downloads"))
            client.predict(SESSION, api_name="/load_session")
            run_s, _ = timed(lambda: client.predict(args.iterations, api_name="/run_world_model"))
            exports = [timed(lambda: client.predict(api_name="/export")) for _ in range(args.repeats)]
            browse = [timed(lambda i=i: client.predict(i, api_name="/browse_history"))[0]
                      for i in (1, args.iterations // 2, args.iterations)]
            path = exports[-1][1]
            path = path["value"] if isinstance(path, dict) else path
            with zipfile.ZipFile(path) as zf:
                files = sorted(zf.namelist())
            zip_kb = round(Path(path).stat().st_size / 1024, 1)
            client.close()
        finally:
            stop_process(server.proc)
    out = {
        "benchmark": "export",
        **machine_info(),
        "iterations_run": args.iterations,
        "run_s": round(run_s, 1),
        "export_s": [round(s, 3) for s, _ in exports],
        "export_median_s": round(statistics.median(s for s, _ in exports), 3),
        "browse_history_s": [round(s, 3) for s in browse],
        "zip_kb": zip_kb,
        "files": files,
        "target_s": 5.0,
        "target_met": max(s for s, _ in exports) <= 5.0,
    }
    report(out, "export.jsonl")


if __name__ == "__main__":
    main()
