"""Host memory for the host tier when the device caches live on a GPU."""

from __future__ import annotations

import numpy as np
import torch


def pinned_host_allocator(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """``(shape, numpy dtype) -> np.ndarray`` in page-locked (pinned) memory when CUDA is
    available, so host <-> device block copies run asynchronously on a stream; plain memory
    otherwise. Pass it as ``HostTier(budget, allocator=pinned_host_allocator)``.

    The array views a torch uint8 tensor (which it keeps alive), so any numpy dtype works,
    bfloat16 through ml_dtypes included.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    return buf.numpy().view(dtype).reshape(shape)
