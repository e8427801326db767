"""prefixkv: KV-cache kernels for prefix caching in LLM inference.

Subpackages: ``prefixkv.paged`` (numpy: spec, validation, reference, host-side cache machinery),
``prefixkv.kernels`` (hardware kernels), ``prefixkv.jax_frontend``, ``prefixkv.torch_frontend``.
"""

__version__ = "0.1.0"
