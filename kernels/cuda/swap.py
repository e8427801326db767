"""swap_blocks with the CUDA C kernel of swap_blocks.cu, loaded with CuPy ``RawModule`` on
first use (CuPy needs a GPU; nothing here runs at import).

All caches of a swap move in one launch on torch's current CUDA stream (one per 65535 caches:
the cache is the grid's y index, which CUDA bounds there); index and pointer tables reach CuPy
through DLPack (zero-copy). The host side must be pinned memory.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from .transfer import upload

SOURCE = Path(__file__).with_name("swap_blocks.cu")
THREADS = 256
#: CUDA's bound on a grid's y dimension: the caches a launch moves.
MAX_GRID_Y = 65535


@functools.cache
def _kernel(device_index: int):
    import cupy

    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=SOURCE.read_text(), options=("-std=c++17",))
        return module.get_function("swap_blocks_kernel")


def _device_index(src_caches, dst_caches) -> int:
    """The one CUDA device of the caches: one launch there reads and writes every cache
    through raw pointers, so caches on another GPU are refused (no peer access is assumed,
    and its stream would not order the copy)."""
    found = {t.device.index if t.device.index is not None else torch.cuda.current_device()
             for t in (*src_caches, *dst_caches) if t.device.type == "cuda"}
    if not found:
        raise ValueError("swap_blocks: the cuda-c backend needs a cache on a CUDA device")
    if len(found) > 1:
        raise ValueError(f"swap_blocks: the cuda-c backend needs the CUDA caches on one "
                         f"device, got cuda:{sorted(found)}")
    return found.pop()


def swap_blocks(src_caches, dst_caches, src_ids, dst_ids) -> None:
    import cupy

    n = int(src_ids.shape[0])
    if n == 0:
        return
    dev = _device_index(src_caches, dst_caches)
    for name, caches in (("src_caches", src_caches), ("dst_caches", dst_caches)):
        for i, c in enumerate(caches):
            if c.shape[0] and not c[0].is_contiguous():
                raise ValueError(f"{name}[{i}]: the cuda-c backend needs each block contiguous")
            if c.device.type == "cpu" and not c.is_pinned():
                raise ValueError(f"{name}[{i}]: the cuda-c backend needs pinned host memory")
    table = torch.tensor(
        [[c.data_ptr() for c in src_caches], [c.data_ptr() for c in dst_caches],
         [c.stride(0) * c.element_size() for c in src_caches],
         [c.stride(0) * c.element_size() for c in dst_caches],
         [math.prod(c.shape[1:]) * c.element_size() for c in src_caches],  # 0 blocks: fine
         [c.shape[0] for c in src_caches], [c.shape[0] for c in dst_caches]],
        dtype=torch.int64)
    device = torch.device("cuda", dev)
    stream = torch.cuda.current_stream(device)
    table = table.pin_memory().to(device, non_blocking=True)
    ids = torch.stack([upload(i.to(torch.int64), device) for i in (src_ids, dst_ids)])
    fn = _kernel(dev)
    with cupy.cuda.Device(dev), cupy.cuda.ExternalStream(stream.cuda_stream, dev):
        t = cupy.from_dlpack(table)
        idx = cupy.from_dlpack(ids)
        for lo in range(0, len(src_caches), MAX_GRID_Y):  # more caches: launch refused
            hi = min(lo + MAX_GRID_Y, len(src_caches))
            fn((n, hi - lo), (THREADS,), (*(row[lo:hi] for row in t), idx[0], idx[1]))
    # keep the tables alive until the copy ran on the stream
    table.record_stream(stream)
    ids.record_stream(stream)
