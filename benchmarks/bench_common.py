"""What every benchmark's JSON shares: the machine it ran on, and printing plus logging the result."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from config import AppConfig
from run_controller import reproducible_mkl

OUT_DIR = Path(os.environ.get("CWM_BENCH_OUT") or Path(__file__).resolve().parent / "out")  # logs and pictures


def same_sums() -> None:
    """MKL's reproducibility mode as the app and the trainer set it (``run_controller.reproducible_mkl``):
    call it first in ``main``, before any tensor work; worker processes inherit it."""
    reproducible_mkl(AppConfig().mkl_cbwr)


def machine_info() -> dict:
    """torch version, machine, processor, CPU count and MKL's mode ($MKL_CBWR), for the head of a result."""
    return {"torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", "")}


def report(out: dict, log_name: str) -> None:
    """Print the result as indented JSON and append it as one line to ``benchmarks/out/<log_name>``."""
    print(json.dumps(out, indent=1))
    OUT_DIR.mkdir(exist_ok=True)
    with open(OUT_DIR / log_name, "a") as f:
        f.write(json.dumps(out) + "\n")
