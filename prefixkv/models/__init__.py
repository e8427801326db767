"""Small Llama-style decoders in JAX and PyTorch whose attention runs through prefixkv, the
engine loop that serves a request stream through the ``paged/`` prefix cache, and the workload
of the demo (``python -m prefixkv.demo``).

``config`` (sizes + deterministic numpy weights), ``workload`` (the request stream, its arrivals),
``engine`` (scheduler + PrefixCache + offload), ``jax_llama`` / ``torch_llama`` /
``numpy_llama`` (model adapters). Framework modules are imported on use only.
"""

from .config import LlamaConfig as LlamaConfig
from .config import init_weights as init_weights
from .engine import Engine as Engine
from .engine import EngineConfig as EngineConfig
from .workload import WorkloadConfig as WorkloadConfig
from .workload import arrival_times as arrival_times
from .workload import make_workload as make_workload


def make_adapter(framework: str, config: LlamaConfig, weights, *, num_blocks: int,
                 block_size: int, device: str | None = None):
    """The model adapter for ``framework`` ("jax", "torch" or "numpy")."""
    if framework == "jax":
        from .jax_llama import JaxLlama

        return JaxLlama(config, weights, num_blocks=num_blocks, block_size=block_size,
                        device=device)
    if framework == "torch":
        from .torch_llama import TorchLlama

        return TorchLlama(config, weights, num_blocks=num_blocks, block_size=block_size,
                          device=device)
    if framework == "numpy":
        from .numpy_llama import NumpyLlama

        return NumpyLlama(config, weights, num_blocks=num_blocks, block_size=block_size)
    raise ValueError(f"framework: expected 'jax', 'torch' or 'numpy', got {framework!r}")
