"""Launcher of the CUDA C prefixkv-v1 chain kernel (``blake3_hash.cu``), compiled at first use
by CuPy (``RawModule``, NVRTC); one thread per sequence. Nothing touches a GPU at import."""

from __future__ import annotations

import functools
from pathlib import Path

from ...paged.reference.hashing import one_chunk_blocks

SOURCE = Path(__file__).with_name("blake3_hash.cu")
KERNEL_NAME = "prefixkv_hash_blocks_v1"


@functools.lru_cache(maxsize=1)
def _kernel():
    import cupy

    module = cupy.RawModule(code=SOURCE.read_text(), options=("--std=c++17",))
    return module.get_function(KERNEL_NAME)


def check_block_size(block_size: int, has_extra: bool) -> None:
    one_chunk_blocks(block_size, has_extra, "the CUDA kernel")


def hash_blocks_cuda(tok, cu, boff, parents, extra, key, out, *, block_size: int,
                     stream: int | None = None, device: int | None = None, threads: int = 64):
    """Run the chain kernel on CUDA arrays (torch tensors or CuPy arrays, anything with
    ``__cuda_array_interface__``), all contiguous 4-byte integers on one device.

    tok: [num_tokens]; cu: int32[num_seqs + 1]; boff: int32[num_seqs] (first output row of each
    sequence); parents: [num_seqs, 8]; extra: [num_out, 4] or None; key: [8];
    out: [num_out, 8], written in place. uint32 data may be passed as int32 bit patterns.
    stream: a raw cudaStream_t (e.g. ``torch.cuda.current_stream().cuda_stream``).
    device: the CUDA device index of the arrays (default: CuPy's current device).
    """
    import cupy

    check_block_size(block_size, extra is not None)
    num_seqs = int(cu.shape[0]) - 1
    if num_seqs <= 0 or int(out.shape[0]) == 0:
        return out
    with cupy.cuda.Device(device if device is not None else cupy.cuda.Device().id):
        args = [cupy.asarray(x) for x in (tok, cu, boff, parents)]
        ext = args[0] if extra is None else cupy.asarray(extra)
        args += [ext, cupy.asarray(key), cupy.asarray(out)]  # zero-copy views
        names = ("tok", "cu", "boff", "parents", "extra", "key", "out")
        for name, a in zip(names, args, strict=True):  # the kernel reads raw 4-byte rows
            if a.dtype.itemsize != 4 or not a.flags.c_contiguous:
                raise ValueError(f"{name}: expected a contiguous array of 4-byte integers, got "
                                 f"{a.dtype} of shape {tuple(a.shape)} and strides "
                                 f"{tuple(a.strides)}")
        blocks = (num_seqs + threads - 1) // threads
        with cupy.cuda.ExternalStream(stream) if stream is not None else cupy.cuda.Stream.null:
            _kernel()((blocks,), (threads,), (*args, cupy.int32(num_seqs),
                                              cupy.int32(block_size),
                                              cupy.int32(extra is not None)))
    return out
