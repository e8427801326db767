"""prefixkv.jax_frontend: the prefixkv ops for JAX, callable eagerly and inside ``jax.jit``.

Each op validates its inputs (shapes/dtypes at trace time, index values on the host when the
inputs are concrete host arrays or in checked mode) and runs the backend chosen for the
platform: Pallas Mosaic kernels on TPU, Pallas GPU kernels on CUDA where registered, and a
compiled XLA composite elsewhere (the CPU path). ``backend=`` or ``PREFIXKV_<OP>_BACKEND`` /
``PREFIXKV_BACKEND`` override; an impossible request raises :class:`BackendError` listing every
backend and why it was refused. Cache-updating ops return new caches: donate them under
``jax.jit`` to update in place. ``plan_paged_attention`` / ``plan_shared_prefix_attention``
check a step's attention metadata once, on the host; the plan (a pytree) runs every layer.
"""

try:  # without JAX the first import below fails deep inside; say which extra brings it
    import jax  # noqa: F401
except ImportError as e:
    raise ImportError("prefixkv.jax_frontend needs JAX: pip install 'prefixkv[jax]' (on TPU: "
                      "'prefixkv[tpu]')") from e

from ..paged.registry import BackendError as BackendError
from ._hashing import hash_blocks as hash_blocks
from ._ops import copy_blocks as copy_blocks
from ._ops import explain_backends as explain_backends
from ._ops import gather_blocks as gather_blocks
from ._ops import merge_attention_states as merge_attention_states
from ._ops import paged_attention as paged_attention
from ._ops import scatter_blocks as scatter_blocks
from ._ops import shared_prefix_attention as shared_prefix_attention
from ._ops import write_kv as write_kv
from ._plan import AttentionPlan as AttentionPlan
from ._plan import plan_paged_attention as plan_paged_attention
from ._plan import plan_shared_prefix_attention as plan_shared_prefix_attention
from ._sharding import kv_head_specs as kv_head_specs
from ._sharding import tensor_parallel_paged_attention as tensor_parallel_paged_attention
from ._sharding import tensor_parallel_write_kv as tensor_parallel_write_kv
