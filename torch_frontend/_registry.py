"""The backends of every torch op, from :mod:`prefixkv.paged.registry`.

Selection: ``backend=`` argument, then ``PREFIXKV_<OP>_BACKEND``, then ``PREFIXKV_BACKEND``,
then priority among the backends that run on the tensors' device. Nothing here touches a device.

- ``triton`` (cuda): the Triton kernels of :mod:`prefixkv.kernels.triton`.
- ``cuda-c`` (cuda, ``swap_blocks`` only): CUDA C block copies loaded with CuPy.
- ``torch`` (cpu, cuda): the vectorized torch path, lowest priority on cuda.
"""

from __future__ import annotations

import torch

from ..paged.registry import Backend, Registry

_NATIVE = "prefixkv.torch_frontend._native"
_TRITON_ATTN = "prefixkv.kernels.triton.attention"
_TRITON_CACHE = "prefixkv.kernels.triton.cache"

OPS = ("paged_attention", "shared_prefix_attention", "merge_attention_states", "write_kv",
       "copy_blocks", "gather_blocks", "scatter_blocks", "swap_blocks")

REGISTRIES: dict[str, Registry] = {op: Registry(op) for op in OPS}

_TRITON_IMPL = {
    "paged_attention": f"{_TRITON_ATTN}:paged_attention",
    "shared_prefix_attention": f"{_TRITON_ATTN}:shared_prefix_attention",
    "merge_attention_states": f"{_TRITON_ATTN}:merge_attention_states",
    "write_kv": f"{_TRITON_CACHE}:write_kv",
    "copy_blocks": f"{_TRITON_CACHE}:copy_blocks",
    "gather_blocks": f"{_TRITON_CACHE}:gather_blocks",
    "scatter_blocks": f"{_TRITON_CACHE}:scatter_blocks",
}
_BLOCK_OPS = ("copy_blocks", "gather_blocks", "scatter_blocks")


def _blocks_supported(**ctx) -> tuple[bool, str]:
    if not ctx.get("block_contiguous", True):
        return False, "needs each cache block contiguous (cache[b].is_contiguous())"
    return True, ""


def _register_all() -> None:
    for op, reg in REGISTRIES.items():
        reg.register(Backend("torch", ("cpu", "cuda"), f"{_NATIVE}:{op}", priority=0,
                             requires=("torch",), doc="vectorized torch ops"))
        if op in _TRITON_IMPL:
            reg.register(Backend("triton", ("cuda",), _TRITON_IMPL[op], priority=10,
                                 requires=("triton",), doc="Triton kernels",
                                 supports=_blocks_supported if op in _BLOCK_OPS else None))
    REGISTRIES["swap_blocks"].register(Backend(
        "cuda-c", ("cuda",), "prefixkv.kernels.cuda.swap:swap_blocks", priority=20,
        requires=("cupy",), supports=_cuda_c_swap_supports,
        doc="CUDA C batched block copies (CuPy RawModule), all caches in one launch"))


def _cuda_c_swap_supports(**ctx) -> tuple[bool, str]:
    if not ctx.get("pinned_host", True):
        return False, "needs the host side in pinned memory (tensor.pin_memory())"
    if not ctx.get("block_contiguous", True):
        return False, "needs each cache block contiguous (cache[b].is_contiguous())"
    if not ctx.get("one_gpu", True):  # one launch on one device, raw pointers in its table
        return False, "needs the CUDA caches on one device (these span several GPUs)"
    return True, ""


_register_all()


def platform_of(*tensors: torch.Tensor) -> str:
    """'cuda' when any tensor lives on a CUDA device, else that device's type."""
    if len(tensors) == 1:
        return tensors[0].device.type
    types = {t.device.type for t in tensors}
    return "cuda" if "cuda" in types else next(iter(types), "cpu")


def select(op: str, platform: str, backend: str | None = None, **context):
    """The implementation to call (raises BackendError listing every backend and why)."""
    return REGISTRIES[op].select(platform, backend, **context).load()
