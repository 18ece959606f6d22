"""Does bf16 pay on this CPU? The Run loop's iteration in fp32 against bf16 autocast, in one process.

Issue 19 asked for bf16 where the CPU has AMX (its large bf16 matmuls run ~5x its fp32 ones) with
the attention kept in fp32 if that is faster. This benchmark answers it for the model as it is
configured, on the machine it runs on, so the decision can be re-taken on each machine kind:

* ``loop``: median seconds of ``run_one_iteration`` (observe, train on the batch, predict) of three
  fresh default models on the live robot, stepped in turn for ``--rounds`` rounds (order rotated
  each round, so a noisy neighbour slows every precision alike):
  ``fp32``; ``bf16`` = CPU autocast around the forward passes (what the CUDA path does);
  ``bf16_linear`` = the same with every ``scaled_dot_product_attention`` call run in fp32;
  besides the wall clock, the CPU time of the calling thread per iteration, which other processes
  on a shared machine hardly inflate (exact at ``--threads 1``; at more threads the pool's own
  threads are not counted, so read only the wall clock there);
* ``attention``: one attention call forward + backward at the loop's shapes (the decoder's 196
  queries over 603 keys at head width 16, the encoder's 407 tokens at head width 32), timed alone:
  torch's flash kernel in fp32, the plain matmul-softmax-matmul in fp32 and in bf16.

Prints one JSON object (lscpu flags, torch's CPU capability, threads) and appends it to
``benchmarks/out/cpu_precision.jsonl``.

    python benchmarks/bench_cpu_precision.py --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from bench_common import machine_info, report, same_sums  # noqa: E402
from bench_time_to_dot import cpu_info  # noqa: E402

PRECISIONS = ("fp32", "bf16", "bf16_linear")
ATTENTION_SHAPES = {  # name -> (batch, heads, queries, keys, head width) as the loop calls it
    "decoder_train": (4, 4, 196, 603, 16),
    "encoder_train": (4, 4, 407, 407, 32),
    "decoder_predict": (1, 4, 196, 603, 16),
}


@contextlib.contextmanager
def fp32_attention():
    """Every ``F.scaled_dot_product_attention`` call inside runs in fp32, outside autocast."""
    sdpa = F.scaled_dot_product_attention

    def attention32(q, k, v, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return sdpa(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)

    F.scaled_dot_product_attention = attention32
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def precision_context(name: str):
    """A fresh context for one iteration in precision ``name``."""
    if name == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if name == "bf16_linear":
        stack.enter_context(fp32_attention())
    stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False))
    return stack


def time_loop(rounds: int, per_round: int, warmup: int) -> dict:
    """Seconds per ``run_one_iteration`` for each precision, three models stepped in turn."""
    from autoencoder_concat_predictor_world_model import AutoencoderConcatPredictorWorldModel
    from toroidal_action_selectors import make_selector
    from toroidal_dot_robot import ToroidalDotRobot

    models = {}
    for name in PRECISIONS:
        wm = AutoencoderConcatPredictorWorldModel(ToroidalDotRobot(seed=22), action_selector=make_selector("random", 22),
                                                  device="cpu")
        wm._autocast = lambda name=name: precision_context(name)  # the engine's hook for its forward passes
        for _ in range(warmup):
            wm.run_one_iteration()
        models[name] = wm
    wall = {name: [] for name in PRECISIONS}
    cpu = {name: [] for name in PRECISIONS}
    for r in range(rounds):
        order = PRECISIONS[r % 3:] + PRECISIONS[:r % 3]
        for name in order:
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.thread_time()
                models[name].run_one_iteration()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
    out = {}
    for name in PRECISIONS:
        out[name] = {"median_ms": round(statistics.median(wall[name]) * 1e3, 1), "min_ms": round(min(wall[name]) * 1e3, 1),
                     "thread_cpu_median_ms": round(statistics.median(cpu[name]) * 1e3, 1), "n": len(wall[name])}
    for name in PRECISIONS[1:]:
        for key in ("median_ms", "thread_cpu_median_ms"):
            out[name][f"over_fp32_{key}"] = round(out[name][key] / out["fp32"][key], 3)
    return out


def time_attention(repeats: int) -> dict:
    """Minimum milliseconds of one attention call forward + backward at each loop shape."""

    def plain(q, k, v):
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v

    def timed(fn, tensors):
        best = float("inf")
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            fn(*tensors).sum().backward()
            if i >= 3:
                best = min(best, time.perf_counter() - t0)
        return round(best * 1e3, 2)

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    out = {}
    for shape_name, (B, H, Nq, Nk, hd) in ATTENTION_SHAPES.items():
        q, k, v = (torch.randn(B, H, n, hd) for n in (Nq, Nk, Nk))
        fp32 = [t.requires_grad_() for t in (q, k, v)]
        bf16 = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out[shape_name] = {"flash_fp32_ms": timed(flash, fp32), "plain_fp32_ms": timed(plain, fp32),
                           "plain_bf16_ms": timed(plain, bf16)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds of the loop comparison")
    parser.add_argument("--per-round", type=int, default=10, help="iterations of each precision per round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations of each model first")
    parser.add_argument("--attention-repeats", type=int, default=30, help="timed calls per attention variant")
    args = parser.parse_args(argv)
    same_sums()  # before any tensor work
    torch.set_num_threads(args.threads)
    out = {"benchmark": "cpu_precision", **machine_info(), "cpu": cpu_info(), "threads": args.threads,
           "bf16_autocast_supported": torch.backends.mkldnn.is_available(),
           "loop": time_loop(args.rounds, args.per_round, args.warmup),
           "attention": time_attention(args.attention_repeats)}
    report(out, "cpu_precision.jsonl")


if __name__ == "__main__":
    main()
