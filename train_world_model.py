"""Train the world model without a browser: the page's Run, from a terminal.

    python train_world_model.py --session alternate --iterations 200
    python train_world_model.py --live double_move --seed 3 --iterations 1000 --save-as double_move_3
    python train_world_model.py --session alternate --iterations 500 --from-checkpoint double_move_3 --tensorboard runs

It drives the same ``RunController`` as the page: the same loop in a worker thread, the same
checkpoint file, format, name rules and refusals. The model starts from the shared checkpoint when
that fits it (``--fresh``: a new model; ``--from-checkpoint NAME``: a named checkpoint); the run
saves to the shared checkpoint as every Run does, and ``--save-as NAME`` also keeps it under a name
(never over an existing file). A progress bar shows iterations per second, the latest prediction
error and the dot-found share. Ctrl-C stops after the current iteration and saves; a second Ctrl-C
quits at once (the last checkpoint file stays whole). The metric history is written as a CSV with
the page export's columns (``run_export.history_csv``). Settings are read from the environment once,
in ``main()`` (``config.from_env()``: ``CWM_SAVED_ROOT`` moves the data folder).

Exit status: 0 done; 1 the run failed (a frame could not be read: the iterations done are saved);
2 a bad flag value (one line names it); 130 stopped by Ctrl-C (saved).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import config
from checkpoints import CheckpointError
from config import AppConfig, AutoencoderConcatPredictorWorldModelConfig, ToroidalDotConfig, with_overrides
from frame_metrics import latest_dot_found_share
from private_files import UnsafeFolderError, check_folder
from run_controller import RunController, reproducible_mkl
from run_export import history_csv
from session_explorer_lib import SessionError, check_name, load_session
from tensorboard_log import TensorBoardLog
from toroidal_action_selectors import PATTERN_NAMES, make_selector
from toroidal_dot_robot import ToroidalDotRobot

MAX_ITERATIONS = 10**9  # the --iterations bound: any run a terminal can wait for
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # 130: the shell's code for a Ctrl-C


class UsageError(ValueError):
    """A flag value that cannot be used; the message names the flag and the problem."""


class _Parser(argparse.ArgumentParser):
    """Errors are one line and exit status 2 (argparse's own print the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _whole(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return value
    return parse


def _name(what: str):
    def parse(text: str) -> str:
        try:
            return check_name(text, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    p = _Parser(prog="train_world_model.py", description="Train the world model without a browser: the page's Run "
                "loop, checkpoints and metrics, with a progress bar. Ctrl-C stops after the current iteration and saves.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--session", type=_name("session"), metavar="NAME",
                        help="replay this recorded session (a folder in saved/sessions/toroidal_dot), from its first frame")
    source.add_argument("--live", choices=PATTERN_NAMES, metavar="PATTERN",
                        help=f"train on the live robot driven by this action pattern: {', '.join(PATTERN_NAMES)}")
    p.add_argument("--seed", type=_whole(0, 2**32 - 1), default=None, metavar="S",
                   help="with --live: the robot's start position and the random pattern's seed (default 0)")
    p.add_argument("--iterations", type=_whole(1, MAX_ITERATIONS), required=True, metavar="N",
                   help="loop iterations to run (observe, train one step, act, predict)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-checkpoint", type=_name("checkpoint"), metavar="NAME",
                       help="start from the named checkpoint NAME.pth (saved by the page or --save-as) instead of the "
                            "shared one")
    start.add_argument("--fresh", action="store_true", help="start from a new, untrained model whatever the files hold")
    p.add_argument("--save-as", type=_name("checkpoint"), metavar="NAME",
                   help="also save the trained model as the named checkpoint NAME.pth (refused if that name is taken)")
    p.add_argument("--threads", type=_whole(1, 1024), default=min(4, os.cpu_count() or 1), metavar="T",
                   help="torch CPU threads (default: the cores, at most 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the model trains (default: cuda when present, else cpu)")
    p.add_argument("--metrics-csv", type=Path, metavar="PATH",
                   help="write the metric history here (default: saved/runs/<start time>-<source>/metrics.csv); "
                        "its columns are the page export's metrics.csv")
    p.add_argument("--tensorboard", type=Path, metavar="DIR",
                   help="also log every iteration to TensorBoard, in a new run folder under DIR (tensorboard --logdir DIR)")
    p.add_argument("--tensorboard-images-every", type=_whole(0, MAX_ITERATIONS), metavar="N",
                   default=AppConfig.tensorboard_images_every,
                   help=f"with --tensorboard: log the current, predicted and error pictures every N iterations "
                        f"(default {AppConfig.tensorboard_images_every}; 0: none)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="FIELD=VALUE",
                   help="override world-model settings of config.py for this run, e.g. --set embed_dim=32 decoder_depth=2 "
                        "(a checkpoint loads only into its own architecture; its decoder position code and mode "
                        "are taken from the file)")
    return p


# -----------------------------------------------------------------------------
# getting ready: everything a bad flag value can refuse happens before the first iteration


@dataclass
class Plan:
    """A run ready to start."""

    controller: RunController
    total: int
    label: str  # what the model trains on, for messages and folder names
    robot: ToroidalDotRobot | None  # the live robot, or None when a session is replayed
    selector: object
    save_as: str | None
    csv_path: Path
    tensorboard: TensorBoardLog | None


def prepare(args: argparse.Namespace, app: AppConfig, model_cfg: AutoencoderConcatPredictorWorldModelConfig) -> Plan:
    """Check every flag against the files and the machine and build the controller and its model.

    Raises:
        UsageError: naming the flag and the problem.
    """
    if args.seed is not None and not args.live:
        raise UsageError("--seed is the live robot's seed: use it with --live")
    try:
        cfg = with_overrides(model_cfg, args.set)
    except ValueError as e:
        raise UsageError(f"--set: {e}") from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no CUDA device (use --device cpu)")
    torch.set_num_threads(1)  # this thread only samples the run; the run's worker computes with args.threads
    c = RunController(config=cfg, device=args.device, threads=args.threads)
    if args.save_as is not None:
        _check_free_name(c, args.save_as)
    robot = selector = None
    if args.session is not None:
        try:
            c.load_session(load_session(args.session))
        except SessionError as e:
            raise UsageError(f"--session: {e}") from None
        label = args.session
    else:
        seed = args.seed or 0
        env = ToroidalDotConfig()
        robot = ToroidalDotRobot(img_size=env.img_size, dot_radius=env.dot_radius, move_pixels=env.move_pixels, seed=seed)
        selector, label = make_selector(args.live, seed), f"live-{args.live}-seed{seed}"
    _start_model(c, args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    csv_path = args.metrics_csv or Path(config.SAVED_ROOT) / "runs" / f"{stamp}-{label}" / "metrics.csv"
    board = None
    if args.tensorboard is not None:
        try:  # the same rule as the app's folders outside saved/: 0700 when made, refused when another account could change it
            folder = check_folder(args.tensorboard, "the --tensorboard folder")
        except UnsafeFolderError as e:
            raise UsageError(f"--tensorboard: {e}") from None
        board = TensorBoardLog(folder, label, images_every=args.tensorboard_images_every,
                               flush_s=app.tensorboard_flush_s, dot_window=app.dot_window)
        try:
            board.open()
        except OSError as e:
            raise UsageError(f"--tensorboard: cannot make a run folder in {args.tensorboard}: {e.strerror or e}") from None
        c.iteration_hook = board
    return Plan(c, args.iterations, label, robot, selector, args.save_as, csv_path, board)


def _check_free_name(c: RunController, name: str) -> None:
    try:
        path = c.named_checkpoint_path(name)
    except ValueError as e:
        raise UsageError(f"--save-as: {e}") from None
    if path.exists() or path.is_symlink():
        raise UsageError(f"--save-as: a checkpoint named {name} exists already (a name is never saved over: choose another)")


def _start_model(c: RunController, args: argparse.Namespace) -> None:
    """Make the model as the flags ask: a named checkpoint, a fresh model, or the shared checkpoint."""
    if args.fresh:
        c.reset_model()
    elif args.from_checkpoint is not None:
        try:
            c.load_named(args.from_checkpoint)
        except (ValueError, CheckpointError) as e:
            raise UsageError(f"--from-checkpoint: {e}") from None
    else:
        c.analysis_model()  # created from the shared checkpoint when that fits, as at a first Run on the page


def origin_line(c: RunController) -> str:
    o = c.origin
    if o.kind == "loaded":
        return f"Model: {o.path.name} (step {o.step}, iteration {o.iteration}){o.note}"
    if o.kind == "refused":
        return (f"Model: new; the shared checkpoint {o.path.name} was refused ({o.reason}); it is kept aside "
                f"under another name at the first save")
    if o.kind == "reset":
        return "Model: new (--fresh)"
    return "Model: new (no shared checkpoint yet)"


# -----------------------------------------------------------------------------
# the run


def run(plan: Plan, app: AppConfig) -> bool:
    """Run the plan with a progress bar; True when Ctrl-C stopped it. The run ends saved either way."""
    c, interrupted = plan.controller, []

    def stop_softly(signum, frame) -> None:
        interrupted.append(signum)
        c.stop_event.set()  # the worker ends after the current iteration, then saves
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C quits at once

    steps = c.run(plan.total) if plan.robot is None else c.run_live(plan.total, plan.robot, plan.selector)
    bar = tqdm(total=plan.total, unit="it", desc=plan.label[:30], dynamic_ncols=True, file=sys.stderr)
    previous = signal.getsignal(signal.SIGINT)
    try:
        for k, _ in enumerate(c.stream(steps, app.update_interval_s)):
            if k == 0:  # the run has started: from now on Ctrl-C stops it softly
                signal.signal(signal.SIGINT, stop_softly)
            status = c.status()
            bar.update(status.done - bar.n)
            error, share = status.last.get("prediction_error"), latest_dot_found_share(c.history, app.dot_window)
            bar.set_postfix_str(f"prediction error {_number(error)}, dot found {_share(share)}", refresh=False)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    return bool(interrupted)


def report(plan: Plan, app: AppConfig, seconds: float, interrupted: bool) -> int:
    """Save as named, write the CSV, print what was done; returns the exit status."""
    c, code = plan.controller, EXIT_INTERRUPTED if interrupted else 0
    status = c.status()
    how = " (stopped by Ctrl-C)" if interrupted else ""
    print(f"Trained {status.done} of {plan.total} iterations on {plan.label} in {seconds:.1f} s "
          f"({status.done / max(seconds, 1e-9):.2f} iterations/s){how}; model step {status.model_step}, "
          f"iteration {status.model_iteration}.")
    window = [m for m in c.history[-app.dot_window:] if m.get("prediction_error") is not None]
    if window:
        error, copy = (sum(m[key] for m in window) / len(window) for key in ("prediction_error", "copy_error"))
        print(f"Last {len(window)} predictions: dot found {_share(latest_dot_found_share(c.history, app.dot_window))}, "
              f"prediction error {_number(error)} (copy-last-frame {_number(copy)}).")
    saved = c.saved
    if saved is not None and saved.ok:
        aside = f"; the refused file was kept as {saved.set_aside}" if saved.set_aside else ""
        print(f"Checkpoint: saved {_shown(saved.path)} (step {saved.step}, iteration {saved.iteration}){aside}.")
    elif saved is not None:
        print(f"Checkpoint: NOT saved to {_shown(saved.path)}: {saved.reason}", file=sys.stderr)
        code = EXIT_FAILED
    if plan.save_as is not None and status.done:
        try:
            named = c.save_named(plan.save_as)
            print(f"Checkpoint: also saved as {_shown(named.path)} (--from-checkpoint {plan.save_as} starts from it).")
        except (ValueError, CheckpointError) as e:
            print(f"Checkpoint: NOT saved as {plan.save_as}: {e}", file=sys.stderr)
            code = EXIT_FAILED
    _write_csv(plan.csv_path, c.history)
    print(f"Metrics: {_shown(plan.csv_path)} ({len(c.history)} rows, the page export's metrics.csv columns).")
    if plan.tensorboard is not None:
        plan.tensorboard.close()
        print(f"TensorBoard: {_shown(plan.tensorboard.folder)} (tensorboard --logdir {_shown(plan.tensorboard.root)})")
    if status.problem:
        print(f"The run stopped early: {status.problem}", file=sys.stderr)
        code = EXIT_FAILED
    return code


def _write_csv(path: Path, history: list[dict]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.write_text(history_csv(history))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.5f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _shown(path: Path) -> str:
    """``path`` relative to the working folder when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, read the settings once, train and report; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    app, model_cfg = config.from_env()  # the environment is read here, once
    reproducible_mkl(app.mkl_cbwr)  # before any tensor work: the run's worker sums as the main thread does
    try:
        plan = prepare(args, app, model_cfg)
        print(origin_line(plan.controller), flush=True)
        t0 = time.perf_counter()
        interrupted = run(plan, app)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the run started, or a second Ctrl-C during it
        print("Interrupted: quit without waiting for a save (the last checkpoint file is whole).", file=sys.stderr)
        return EXIT_INTERRUPTED
    return report(plan, app, time.perf_counter() - t0, interrupted)


if __name__ == "__main__":
    sys.exit(main())
