"""Play and compare speed. Prints one JSON object; not part of the test suite.

Records a ``--frames``-frame session (pattern random, seed 5) into a temporary ``saved/`` folder and
times, with the default model (a fresh one: the time does not depend on the weights):

* ``play_step``: one press of *Move* through the page's handler (``page_play.play`` with one action:
  the model's prediction, the simulated truth, the strip of the whole play and the table), and the
  PNG encoding of its three pictures that the server does next; ``--steps`` presses of one play, so
  the later ones draw the longer strips (the maximum is reported beside the median);
* ``compare``: ``page_play.compare_models`` of a named checkpoint against this tab's model on the
  whole session (loading the checkpoint, copying the tab's model, both evaluations in the same
  batches, the top-5 pictures, the table and the plot data), ``--repeats`` times.

Targets on the project's 2-core CPU: a play step in at most 0.2 s, a 200-frame compare in at most
10 s. One JSON object with lscpu's flags and torch's CPU capability, also appended to
``benchmarks/out/play_compare.jsonl``.

    python benchmarks/bench_play_compare.py                  # 200 frames, 20 presses, 3 compares
    python benchmarks/bench_play_compare.py --frames 1000 --repeats 1
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from bench_common import machine_info, report, same_sums  # noqa: E402
from bench_time_to_dot import cpu_info  # noqa: E402

import config  # noqa: E402
import page_common  # noqa: E402
import page_play  # noqa: E402
import page_sessions  # noqa: E402
from record_session import record_session  # noqa: E402

SESSION = "bench_play"
PLAY_TARGET_S, COMPARE_TARGET_S = 0.2, 10.0


def _png_seconds(pictures) -> float:
    """Encode the pictures as PNG, as the server does before it sends them."""
    started = time.perf_counter()
    for picture in pictures:
        Image.fromarray(picture).save(io.BytesIO(), format="PNG")
    return time.perf_counter() - started


def time_play(user: page_common.UserState, steps: int) -> dict:
    page_play.play_start(2, user)
    page_play.play("1", user)  # the first press also creates the tab's model: not timed
    handler, encode = [], []
    for _ in range(steps):
        started = time.perf_counter()
        imagined, truth, strip, _, _ = page_play.play("1", user)
        handler.append(time.perf_counter() - started)
        encode.append(_png_seconds([imagined["value"], truth["value"], strip["value"]]))
    total = [h + e for h, e in zip(handler, encode)]
    return {"presses": steps, "median_s": round(statistics.median(total), 4), "max_s": round(max(total), 4),
            "handler_median_s": round(statistics.median(handler), 4), "png_median_s": round(statistics.median(encode), 4),
            "last_strip_columns": user.controller.current_play().steps + 1}


def time_compare(user: page_common.UserState, repeats: int) -> dict:
    user.controller.save_named("bench")
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        text, _, top, _ = page_play.compare_models("bench", page_play.THIS_TAB, SESSION, user)
        seconds.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(seconds), 3), "runs_s": [round(s, 3) for s in seconds],
            "reported_in_page": text.split(" transitions in ")[1].split(" (")[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames in the recorded session")
    parser.add_argument("--steps", type=int, default=20, help="timed presses of Move in one play (at most 48)")
    parser.add_argument("--repeats", type=int, default=3, help="timed comparisons")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    app, _ = config.from_env()
    torch.set_num_threads(app.run_threads())  # as the app computes a batched analysis (in a thread with that many)
    with tempfile.TemporaryDirectory(prefix="bench-play-") as tmp:
        config.use_saved_root(Path(tmp) / "saved")
        record_session("random", args.frames - 1, 5, name=SESSION, root=config.SESSIONS_ROOT)
        user = page_common.UserState()
        page_sessions.load_session(SESSION, user)
        play = time_play(user, min(args.steps, app.max_play_steps - 2))
        compare = time_compare(user, args.repeats)
    out = {
        "benchmark": "play_compare",
        **machine_info(),
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "frames": args.frames,
        "play_step": play,
        "compare": compare,
        "target_s": {"play_step": PLAY_TARGET_S, "compare": COMPARE_TARGET_S},
        "target_met": play["max_s"] <= PLAY_TARGET_S and compare["median_s"] <= COMPARE_TARGET_S,
    }
    report(out, "play_compare.jsonl")


if __name__ == "__main__":
    main()
