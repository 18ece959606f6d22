"""Seconds per Run-loop iteration of this project against the seed's reference implementation, in one run.

The reference is ih/developmental-robot-movement (default: commit da831d0 of the local git mirror).
Each side is a fresh model at its own default settings on its own toroidal dot robot (224 px,
dot radius 5, 27 px per move, seed 0) that always moves right:

* **ours**: ``AutoencoderConcatPredictorWorldModel(...).run_one_iteration()`` with the default
  config, ``ToroidalDotRobot(seed=0)`` and ``make_selector("always_move")``;
* **reference**: its ``AutoencoderConcatPredictorWorldModel(...).run(max_iterations=1)``, the call
  its own explorer times as one iteration (observe, score the last prediction, train one step on
  the canvas, pick the action, predict the next frame, act, trim the history), on its
  ``ToroidalDotRobot`` built from its ``config.ToroidalDotConfig``, with its
  ``SEQUENCE_ALWAYS_MOVE`` selector behind the two-argument adapter its explorer uses. Its
  spec-sized model (embed 256, 5 + 5 blocks) and its batch of one canvas are its defaults.

The two sides never share a process (both have a ``config.py`` and a ``models/`` package): each
runs in a fresh ``python -I -B`` child with the same torch threads, untimed warm-up iterations
(at least 3: neither loop trains or predicts in its first two, and ours trains its third on one
canvas, its replay buffer still empty), then the timed iterations; the child sends its
per-iteration wall times back as JSON. Rounds alternate the sides and swap which goes first each
round, so both see the same machine. The reference's progress
prints go to /dev/null (formatting them is part of its iteration). A package of ``STAND_IN_ALLOWED``
that the reference's own files import and that is missing here gets an empty stand-in module, in
its child only, that fails on any attribute use, so a timed path that needed one would fail rather
than measure other work (a library's optional import, such as timm's of wandb, is left to fail as
usual); the JSON lists the stand-ins used (``stood_in_for``) and that nothing was patched. The
reference is extracted (``git archive``) or copied into a private temporary folder that is removed
afterwards.

    python benchmarks/bench_reference.py                       # 3 rounds x (10 warm-up + 30 timed), 1 thread
    python benchmarks/bench_reference.py --threads 2
    python benchmarks/bench_reference.py --reference /path/to/checkout       # a folder of the reference's files
    python benchmarks/bench_reference.py --reference /path/to/repo.git --reference-commit da831d0

Prints one JSON object (machine, lscpu flags, torch's CPU capability, threads, both sides' model
sizes and parameter counts, the reference commit, per round and overall median and minimum seconds
per iteration, the ratio reference / ours: above 1 means ours is faster) and appends it to
``benchmarks/out/reference.jsonl``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine_info, report, same_sums  # noqa: E402
from bench_time_to_dot import cpu_info  # noqa: E402

DEFAULT_REFERENCE = Path("/work/.mirror/ih+developmental-robot-movement/repo")  # bare git mirror of the reference
DEFAULT_COMMIT = "da831d0"  # the reference commit the seed README describes
REFERENCE_ENTRY = "autoencoder_concat_predictor_world_model.py"  # a folder holding this is the reference's files
STAND_IN_ALLOWED = ("wandb", "cv2", "rpyc", "ipywidgets")  # imported by the reference, never on its Run-loop path
MIN_WARMUP = 3  # iterations 1-2 neither train nor predict; ours trains iteration 3 on one canvas (no replays yet)
TARGET_RATIO = 1.3  # the target: reference seconds / our seconds per iteration

# -----------------------------------------------------------------------------
# the child processes: a shared head and tail around each side's construction

_HEAD = r"""
import json, os, random, sys, time
args = json.loads(sys.argv[1])
sys.path[:0] = args["path"]
real_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # the loop's own prints go nowhere
stood_in = []
if args["stand_in"]:
    import importlib.abc, importlib.machinery

    class StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # last on sys.meta_path: answers only for allowed names that no real finder found, imported
        # by the reference's own files (a library's optional import, e.g. timm's wandb, still fails)
        def find_spec(self, name, path=None, target=None):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back  # past importlib's machinery to the import statement
            importer = "" if frame is None else frame.f_code.co_filename
            if name.split(".")[0] in args["stand_in"] and importer.startswith(args["path"][0] + os.sep):
                stood_in.append(name)
                return importlib.machinery.ModuleSpec(name, self, is_package=True)

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            def missing(attr):
                raise AttributeError(f"{module.__name__} is a benchmark stand-in (not installed here): no {attr}")
            module.__getattr__ = missing

    sys.meta_path.append(StandIn())
import numpy as np, torch
torch.set_num_threads(args["threads"])
torch.manual_seed(0); np.random.seed(0); random.seed(0)
device = torch.device(args["device"])
"""

_OURS = r"""
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from config import AutoencoderConcatPredictorWorldModelConfig
from toroidal_action_selectors import make_selector
from toroidal_dot_robot import ToroidalDotRobot
cfg = AutoencoderConcatPredictorWorldModelConfig()
wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=0), make_selector("always_move"), device=device, config=cfg)
step, model = wm.run_one_iteration, wm.model
shape = {"embed_dim": cfg.embed_dim, "depth": cfg.depth, "decoder_embed_dim": cfg.decoder_embed_dim,
         "decoder_depth": cfg.decoder_depth, "decoder_mode": cfg.decoder_mode, "canvases_per_step": 1 + cfg.replay_batch_size}
"""

_REFERENCE = r"""
import config
from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
from toroidal_action_selectors import SEQUENCE_ALWAYS_MOVE, create_sequence_action_selector
from toroidal_dot_interface import ToroidalDotRobot
dot = config.ToroidalDotConfig
robot = ToroidalDotRobot(img_size=dot.IMG_SIZE, dot_radius=dot.DOT_RADIUS, move_pixels=dot.DOT_MOVE_PIXELS,
                         action_delay=dot.DOT_ACTION_DELAY, seed=0)
sequence = create_sequence_action_selector(SEQUENCE_ALWAYS_MOVE)

def selector(observation, action_space):  # the adapter the reference's explorer puts around its selectors
    return sequence()[0]

wm = AutoencoderConcatPredictorWorldModel(robot, action_selector=selector, device=device)
step, model = (lambda: wm.run(max_iterations=1)), wm.autoencoder
shape = {"embed_dim": model.embed_dim, "depth": len(model.blocks), "decoder_embed_dim": model.decoder_embed.out_features,
         "decoder_depth": len(model.decoder_blocks), "decoder_mode": "self", "canvases_per_step": 1}
"""

_TAIL = r"""
def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()

for _ in range(args["warmup"]):
    step()
times = []
for _ in range(args["iterations"]):
    sync()
    t = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t)
real_stdout.write(json.dumps({
    "times_s": times, "threads": torch.get_num_threads(), "model": shape,
    "parameters": sum(p.numel() for p in model.parameters()),
    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    "stood_in_for": sorted(set(stood_in))}) + "\n")
"""

SNIPPETS = {"ours": _HEAD + _OURS + _TAIL, "reference": _HEAD + _REFERENCE + _TAIL}


# -----------------------------------------------------------------------------
# the reference's files and the two sides' runs


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()


def materialise_reference(source: Path, commit: str | None, into: Path) -> str | None:
    """Put the reference's files into ``into``: copied from a folder that holds them, or ``git
    archive``d from a git directory at ``commit``. Returns the full commit (None for a folder)."""
    if (source / REFERENCE_ENTRY).is_file():
        shutil.copytree(source, into, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        return None
    full = _git("--git-dir", str(source), "rev-parse", "--verify", f"{commit}^{{commit}}")
    into.mkdir()
    archive = subprocess.run(["git", "--git-dir", str(source), "archive", full], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    if not (into / REFERENCE_ENTRY).is_file():
        raise SystemExit(f"{source} at {commit} has no {REFERENCE_ENTRY}")
    return full


def run_side(side: str, path: list[str], workdir: Path, args) -> dict:
    """One fresh child process of ``side``; returns what it reported (times in seconds)."""
    params = {"path": path, "threads": args.threads, "device": args.device, "warmup": args.warmup,
              "iterations": args.iterations, "stand_in": list(STAND_IN_ALLOWED) if side == "reference" else []}
    done = subprocess.run([sys.executable, "-I", "-B", "-c", SNIPPETS[side], json.dumps(params)],
                          cwd=workdir, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {side} run failed:\n" + "\n".join(done.stderr.strip().splitlines()[-15:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _seconds(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 5), "min_s": round(min(times), 5), "n": len(times)}


def summarise(rounds: list[dict]) -> dict:
    """Per round and overall median and minimum of each side, and reference / ours ratios."""
    per_round = []
    for r in rounds:
        ours, ref = _seconds(r["ours"]), _seconds(r["reference"])
        per_round.append({"order": r["order"], "ours": ours, "reference": ref,
                          "ratio_median": round(ref["median_s"] / ours["median_s"], 3),
                          "ratio_min": round(ref["min_s"] / ours["min_s"], 3),
                          "ours_times_s": [round(t, 5) for t in r["ours"]],
                          "reference_times_s": [round(t, 5) for t in r["reference"]]})
    ours = _seconds([t for r in rounds for t in r["ours"]])
    ref = _seconds([t for r in rounds for t in r["reference"]])
    return {"ours": ours, "reference": ref,
            "ratio_per_round": [r["ratio_median"] for r in per_round],
            "ratio_median_of_rounds": round(statistics.median(r["ratio_median"] for r in per_round), 3),
            "ratio_of_overall_medians": round(ref["median_s"] / ours["median_s"], 3),
            "ratio_of_overall_minimums": round(ref["min_s"] / ours["min_s"], 3),
            "rounds": per_round}


def _our_commit() -> dict:
    try:
        return {"commit": _git("-C", str(REPO), "rev-parse", "HEAD"),
                "uncommitted_changes": bool(_git("-C", str(REPO), "status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE,
                        help="a folder of the reference's files, or its git directory (default: the local mirror)")
    parser.add_argument("--reference-commit", default=DEFAULT_COMMIT, help="commit to extract from a git directory")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each one run of each side (order swapped each round)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first (at least 3)")
    parser.add_argument("--iterations", type=int, default=30, help="timed iterations per run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
    parser.add_argument("--device", default="cpu", help="torch device of both sides")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    if args.warmup < MIN_WARMUP:
        parser.error(f"--warmup must be at least {MIN_WARMUP}: the first timed iteration must be a full one on both sides")
    if args.rounds < 1 or args.iterations < 1:
        parser.error("--rounds and --iterations must be at least 1")
    if not args.reference.exists():
        parser.error(f"no reference at {args.reference}: give --reference (a folder or a git directory)")

    with tempfile.TemporaryDirectory(prefix="bench_reference_") as tmp:  # created 0700, removed at the end
        reference_dir, workdir = Path(tmp) / "reference", Path(tmp) / "work"
        commit = materialise_reference(args.reference, args.reference_commit, reference_dir)
        workdir.mkdir()
        paths = {"ours": [str(REPO)], "reference": [str(reference_dir)]}
        rounds, reports = [], {}
        for i in range(args.rounds):
            order = ["ours", "reference"] if i % 2 == 0 else ["reference", "ours"]
            results = {side: run_side(side, paths[side], workdir, args) for side in order}
            rounds.append({"order": order, **{side: results[side]["times_s"] for side in order}})
            reports = results

    out = {
        "benchmark": "reference_speed",
        **machine_info(),
        "cpu": cpu_info(),
        "device": args.device,
        "threads": args.threads,
        "threads_in_children": {side: reports[side]["threads"] for side in ("ours", "reference")},
        "warmup": args.warmup,
        "iterations": args.iterations,
        "ours_source": _our_commit(),
        "reference_source": {"path": str(args.reference), "commit": commit,
                             "stood_in_for": reports["reference"]["stood_in_for"], "patched": [],
                             "selector_adapter": "selector(observation, action_space) -> sequence()[0], as its explorer"},
        "models": {side: {**reports[side]["model"], "parameters": reports[side]["parameters"],
                          "trainable_parameters": reports[side]["trainable_parameters"]} for side in ("ours", "reference")},
        **summarise(rounds),
        "target_ratio": TARGET_RATIO,
    }
    report(out, "reference.jsonl")


if __name__ == "__main__":
    main()
