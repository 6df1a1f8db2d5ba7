"""Replaying a fixed piece of GPU work (a decode step, a MaskGIT forward) as a CUDA graph.

A step of generation launches hundreds of small kernels (24 layers of attention, MoE and norms); for a few rows
the GPU finishes each of them faster than Python can launch the next, so the step costs the host's launch time.
A CUDA graph records the launches once and replays them all with one call.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor


class GraphedCall:
    """Calls `fn()` — work that reads fixed input tensors (updated in place by the caller between calls) and returns
    a tensor — eagerly the first time, and from then on as a replayed CUDA graph.

    The first call is real work: it runs eagerly and its result is returned; then fn is recorded once more into a
    graph (recording executes nothing). Later calls replay the graph, which re-reads the same inputs and rewrites the
    same output tensor, so each result must be consumed before the next call. fn is recorded with torch's sync debug
    mode set to "error": a host synchronisation inside it (`.item()`, `.tolist()`, a blocking copy) aborts the
    recording cleanly, and fn then keeps running eagerly, with one warning naming the cause. With `enabled=False`
    nothing is recorded: every call runs fn eagerly.
    """

    def __init__(self, fn: Callable[[], Tensor], *, enabled: bool, name: str):
        self.fn, self.enabled, self.name = fn, enabled, name
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.output: Optional[Tensor] = None
        self.failure: Optional[str] = None  # why recording failed, if it did

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.output
        if not self.enabled:
            return self.fn()
        self.enabled = False  # one recording attempt
        # The eager run goes on a side stream, as torch advises before a capture (lazy initialisation such as
        # cuBLAS workspaces then happens outside the graph).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn()
        torch.cuda.current_stream().wait_stream(side)
        out.record_stream(torch.cuda.current_stream())
        self._record()
        return out

    def _record(self) -> None:
        graph = torch.cuda.CUDAGraph()
        previous = torch.cuda.get_sync_debug_mode()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    output = self.fn()
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
        except RuntimeError as e:
            self.failure = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"{self.name}: not captured as a CUDA graph ({self.failure}); it runs eagerly", stacklevel=3)
            return
        self.graph, self.output = graph, output
