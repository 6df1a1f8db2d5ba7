"""Access to the compiled core `unif2ace._C`: loading it, and passing torch tensors to it.

Tensors cross into C++ as DLPack capsules; every CUDA call runs on the caller's current stream.
"""
from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

try:
    from unif2ace import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "unif2ace._C is missing: the C++ core was not built. Install with `pip install -e .` "
        "(CMake, Ninja and pybind11 are needed; add UNIF2ACE_CUDA=1 for the CUDA kernels)."
    ) from exc

WITH_CUDA: bool = bool(_C.with_cuda)


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels run at in this process: "baseline", "avx2" or "avx512" in a
    portable build (the best this CPU has, capped by the environment variable UNIF2ACE_CPU_ISA), or the -march of a
    build made with UNIF2ACE_CPU_ARCH (e.g. "native")."""
    return _C.cpu_isa()


def dl(t: torch.Tensor):
    """A DLPack capsule of `t` (detached: the core never records autograd history)."""
    return to_dlpack(t.detach())


def stream_of(t: torch.Tensor) -> int:
    """The raw handle of the current CUDA stream of `t`'s device (0 for CPU tensors)."""
    if t.device.type != "cuda":
        return 0
    if not WITH_CUDA:
        raise RuntimeError(
            "unif2ace was built without CUDA kernels; rebuild with UNIF2ACE_CUDA=1 to run on CUDA tensors"
        )
    return torch.cuda.current_stream(t.device).cuda_stream
