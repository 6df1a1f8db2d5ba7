"""unif2ace: fused C++/CUDA kernels and the UniF2ace model for fine-grained face understanding and generation."""
from unif2ace._core import WITH_CUDA
from unif2ace import ops
from unif2ace.model import UniF2aceConfig, UniF2aceModel

__version__ = "0.1.0"
__all__ = ["WITH_CUDA", "UniF2aceConfig", "UniF2aceModel", "ops", "__version__"]
