"""prefixkv.torch_frontend: every prefixkv op as a torch custom op (``torch.ops.prefixkv.<op>``;
hashing's is ``hash_blocks_v1``, the spec's version) with a Python wrapper of the same name;
backend by device (Triton / CUDA C on CUDA, vectorized torch on CPU), ``backend=`` or
``PREFIXKV_<OP>_BACKEND`` / ``PREFIXKV_BACKEND`` override. ``plan_paged_attention`` /
``plan_shared_prefix_attention`` check a step's attention metadata once for the calls of every
layer."""

try:  # without torch the first import below fails deep inside; say which extra brings it
    import torch  # noqa: F401
except ImportError as e:
    raise ImportError("prefixkv.torch_frontend needs PyTorch: pip install 'prefixkv[torch]' "
                      "(for the CPU-only build see the README)") from e

from ._hashing import hash_blocks as hash_blocks
from ._host import gather_blocks_to_host as gather_blocks_to_host
from ._host import scatter_blocks_from_host as scatter_blocks_from_host
from ._memory import pinned_host_allocator as pinned_host_allocator
from ._ops import attention_workspace_size as attention_workspace_size
from ._ops import copy_blocks as copy_blocks
from ._ops import gather_blocks as gather_blocks
from ._ops import merge_attention_states as merge_attention_states
from ._ops import paged_attention as paged_attention
from ._ops import scatter_blocks as scatter_blocks
from ._ops import shared_prefix_attention as shared_prefix_attention
from ._ops import swap_blocks as swap_blocks
from ._ops import write_kv as write_kv
from ._plan import AttentionPlan as AttentionPlan
from ._plan import plan_paged_attention as plan_paged_attention
from ._plan import plan_shared_prefix_attention as plan_shared_prefix_attention
from ._registry import REGISTRIES as REGISTRIES
