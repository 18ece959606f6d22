"""Replaying a fixed-shape function of CUDA tensors as a recorded CUDA graph.

The world model's training step and one-canvas prediction run with the same shapes every loop
iteration; recording them once as a graph and replaying it removes the per-kernel launch cost.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from config import LOGGER_NAME

LOG = logging.getLogger(f"{LOGGER_NAME}.engine")  # a child of the app's logger: its level applies


class GraphedCall:
    """A function of fixed-shape CUDA tensors, recorded once as a CUDA graph and then replayed.

    The first ``warmup`` calls run the function eagerly on a side stream (real work: for a training
    step these are real steps), as capture asks; the next call copies its inputs into static
    buffers, records the graph and replays it, and every later call only copies and replays. The
    outputs are static tensors that each replay overwrites: copy what must outlive the next call.
    If recording fails the function runs eagerly from then on (``failed`` says why).
    """

    def __init__(self, fn: Callable, warmup: int, keep: Callable[[], object] | None = None):
        self.fn, self.warmup, self.calls = fn, int(warmup), 0
        self.keep = keep  # returns what the recorded graph reads by address besides its inputs (cached indices)
        self.kept = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out = None
        self.failed: str | None = None

    def __call__(self, *inputs: torch.Tensor):
        self.calls += 1
        if self.failed is not None:
            return self.fn(*inputs)
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            try:
                self.static_in = [x.clone() for x in inputs]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.static_out = self.fn(*self.static_in)
                self.graph = graph
                self.kept = self.keep() if self.keep is not None else None  # alive as long as the graph
            except Exception as e:  # capture is all or nothing: nothing ran, run this call eagerly
                self.failed = f"{type(e).__name__}: {e}"[:300]
                self.static_in, self.static_out = [], None
                LOG.warning("CUDA graph capture failed, running eagerly: %s", self.failed)
                return self.fn(*inputs)
        else:
            for buf, x in zip(self.static_in, inputs):
                buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_out
