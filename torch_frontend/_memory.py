"""Host memory for the host tier when the device caches live on a GPU."""

from __future__ import annotations

import ctypes
import mmap
import weakref

import numpy as np
import torch

#: cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every CUDA context, and mapped
#: into the device address space (under unified addressing at the same address), so kernels
#: such as the CUDA C swap read and write it directly
_FLAGS = 1 | 2


def pinned_host_allocator(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``(shape, numpy dtype) -> np.ndarray`` in page-locked (pinned) memory when CUDA is
    available, so host <-> device block copies run asynchronously on a stream; plain memory
    otherwise. Pass it as ``HostTier(budget, allocator=pinned_host_allocator)``.

    Each array sits on whole pages of its own, registered with ``cudaHostRegister`` and
    unregistered when the array is freed: a tier's budget is what it pins (torch's pinned
    allocator would round each block up to a power of two, 8 MiB for a 5 MiB block, and keep
    it cached after the tier drops it). Any numpy dtype works, bfloat16 through ml_dtypes.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0 or not torch.cuda.is_available():
        return np.empty(shape, dtype)
    return _registered(nbytes).view(dtype).reshape(shape)


def _registered(nbytes: int) -> np.ndarray:
    """uint8[nbytes] starting on a page boundary, its pages page-locked until it is freed
    (two arrays never share a page: CUDA registers whole pages, and only once)."""
    page = mmap.PAGESIZE
    size = -(-nbytes // page) * page
    raw = np.empty(size + page, np.uint8)
    start = -raw.ctypes.data % page
    ptr = raw.ctypes.data + start
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(ptr, size, _FLAGS))
    if err:
        _clear_cuda_error()
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed with cudaError {err} "
                           f"(out of lockable memory? see ulimit -l)")
    weakref.finalize(raw, cudart.cudaHostUnregister, ptr)  # runs before raw's memory is freed
    return raw[start:start + nbytes]


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error, which a failed cudaHostRegister leaves set: the
    next kernel launch's check would report it as its own. torch's cudart bindings have no
    cudaGetLastError, so it is called in the runtime torch loaded (found by its soname)."""
    major = str(torch.version.cuda or "").split(".")[0]
    for name in (f"libcudart.so.{major}", "libcudart.so"):
        try:
            ctypes.CDLL(name).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
