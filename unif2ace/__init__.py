"""unif2ace: fused C++/CUDA kernels and the UniF2ace model for fine-grained face understanding and generation."""
from unif2ace._core import WITH_CUDA, cpu_isa
from unif2ace import ops
from unif2ace.model import UniF2aceConfig, UniF2aceModel

__version__ = "0.1.0"
__all__ = ["WITH_CUDA", "FacePipeline", "cpu_isa", "UniF2aceConfig", "UniF2aceModel", "ops", "__version__"]


def __getattr__(name):
    # unif2ace.FacePipeline, imported on first use (it pulls in the tokenizers and data modules)
    if name == "FacePipeline":
        from unif2ace.pipeline import FacePipeline

        return FacePipeline
    raise AttributeError(f"module 'unif2ace' has no attribute {name!r}")
