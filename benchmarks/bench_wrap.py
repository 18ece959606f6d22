"""Where the last misses are: predictions within 3 px split by what the dot did between the frames.

The time-to-dot curves climb to ~0.8 and then take as long again to reach 0.9. This benchmark runs one
fresh model on the live robot (bare loop) and sorts every checked prediction by the true move from
frame t-1 to frame t: ``stay`` (the dot did not move), ``move`` (it moved right inside the frame) or
``wrap`` (it left the frame's right edge and came back at its left edge), then counts the hits
(dot within 3 px) of each kind per window of iterations. Per window it also gives where the
predicted dot lies against the real one: the median signed offset of its centre (x, y in pixels, on
the torus), the median area of its bright pixels (the real dot has ~80) and the predictions with no
dot (this is how the torus code's "collapse" near iteration 200 was found to be a vertical drift;
``--window 25`` to see it). Prints one JSON object (lscpu flags,
torch's CPU capability, the config overrides) and appends it to ``benchmarks/out/wrap.jsonl``.

    python benchmarks/bench_wrap.py --pattern always_move --seed 22 --iterations 800
    python benchmarks/bench_wrap.py --pattern random --seed 33 --set decoder_position=torus
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_common import machine_info, report, same_sums  # noqa: E402
from bench_learning import _config  # noqa: E402
from bench_time_to_dot import WITHIN_PX, cpu_info  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pattern", default="always_move", help="action pattern of the live robot")
    parser.add_argument("--seed", type=int, default=22, help="robot and pattern seed")
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--window", type=int, default=200, help="iterations per counted window")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="config overrides")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    torch.set_num_threads(args.threads)

    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel, compute_path
    from frame_metrics import dot_centroid
    from toroidal_action_selectors import make_selector
    from toroidal_dot_robot import ToroidalDotRobot

    cfg, overrides = _config(args.set)
    wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(img_size=cfg.frame_size[0], seed=args.seed),
                                              action_selector=make_selector(args.pattern, args.seed), device="cpu", config=cfg)
    counts: dict[str, dict[str, list[int]]] = {}  # window -> kind -> [hits, predictions]
    drift: dict[str, dict[str, list]] = {}  # window -> {"offsets": [(dx, dy)], "areas": [px], "no_dot": [1]}
    previous = None
    t0 = time.perf_counter()
    half = cfg.frame_size[0] / 2
    for i in range(args.iterations):
        predicted = wm.last_prediction  # the prediction this iteration checks against its frame t
        m = wm.run_one_iteration()
        now = dot_centroid(wm.last_observation)
        if m["dot_error"] is not None and predicted is not None and now is not None:
            d = drift.setdefault(f"{i // args.window * args.window}-{(i // args.window + 1) * args.window}",
                                 {"offsets": [], "areas": [], "no_dot": []})
            centre = dot_centroid(predicted)
            if centre is None:
                d["no_dot"].append(1)
            else:  # the shorter way round the torus
                d["offsets"].append([(centre[k] - now[k] + half) % (2 * half) - half for k in (0, 1)])
                d["areas"].append(int((predicted.max(axis=-1) > 127).sum()))
        if m["dot_error"] is not None and previous is not None and now is not None:
            dx = now[0] - previous[0]
            kind = "stay" if abs(dx) < 1 else ("move" if dx > 0 else "wrap")
            lo = i // args.window * args.window
            cell = counts.setdefault(f"{lo}-{lo + args.window}", {}).setdefault(kind, [0, 0])
            cell[0] += m["dot_error"] <= WITHIN_PX
            cell[1] += 1
        previous = now
    out = {"benchmark": "wrap", **machine_info(), "cpu": cpu_info(), "compute_path": compute_path("cpu", cfg),
           "pattern": args.pattern, "seed": args.seed, "iterations": args.iterations, "config_overrides": overrides,
           "seconds": round(time.perf_counter() - t0, 1),
           "within_3px_by_kind": {w: {k: f"{h}/{n}" for k, (h, n) in kinds.items()} for w, kinds in counts.items()},
           "predicted_dot_by_window": {w: {
               "median_offset_xy_px": np.round(np.median(d["offsets"], axis=0), 1).tolist() if d["offsets"] else None,
               "median_area_px": float(np.median(d["areas"])) if d["areas"] else None,
               "no_dot": f"{len(d['no_dot'])}/{len(d['no_dot']) + len(d['offsets'])}"} for w, d in drift.items()}}
    report(out, "wrap.jsonl")


if __name__ == "__main__":
    main()
