"""Block copies between torch caches (any device) and host numpy arrays: the gather / scatter
that :class:`prefixkv.paged.tiers.BlockOffloader` takes for torch caches (its tiers hold
numpy rows), and the tensor <-> numpy conversions they rest on (bfloat16 and float8_e4m3fn
through their bit patterns as the ml_dtypes types, which numpy and ``Tensor.numpy()`` lack)."""

from __future__ import annotations

import numpy as np
import torch

from ..paged import validate
from ..paged.spec import dtype_name, numpy_dtype
from ._ops import gather_blocks, scatter_blocks


def _ids(block_ids) -> torch.Tensor:
    """Block ids as a tensor; host integers as an int32 host tensor, as is an empty list or
    tuple (numpy makes float64 of it). Left on the host: the ops check host ids' values by
    default (range, distinct destinations) and then move them to the caches' device (moved
    first, GPU caches' ids had gone unchecked: a repeated destination written twice, an id
    past the cache clamped). The ops check the rest: dtype, naming block_ids."""
    if not isinstance(block_ids, torch.Tensor):
        a = np.asarray(block_ids)
        if a.size == 0 and not isinstance(block_ids, np.ndarray):
            a = a.astype(np.int32)
        if a.dtype.kind not in "iufb":  # strings, None, objects: torch's error names nothing
            raise TypeError(f"block_ids: expected integer block ids (a tensor, numpy array or "
                            f"list), got {type(block_ids).__name__} of {a.dtype} values")
        if a.dtype.kind in "iu":
            if a.size and (int(a.min()) < -2**31 or int(a.max()) >= 2**31):
                raise ValueError(f"block_ids: values must fit int32, got {a.min()}..{a.max()}")
            a = a.astype(np.int32)
        block_ids = torch.from_numpy(np.ascontiguousarray(a))
    return block_ids


#: dtypes numpy lacks (ml_dtypes has them) and Tensor.numpy() refuses: moved as their bits
_BITS = {torch.bfloat16: (torch.int16, np.int16, "bfloat16"),
         torch.float8_e4m3fn: (torch.uint8, np.uint8, "float8_e4m3fn")}
_BITS_BY_NAME = {name: (dtype, np_bits) for dtype, (_, np_bits, name) in _BITS.items()}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a host numpy array (a copy off the CPU; bfloat16 and
    float8_e4m3fn as their ml_dtypes types, bit for bit)."""
    t = t.detach().cpu()
    bits = _BITS.get(t.dtype)
    if bits is not None:
        return t.view(bits[0]).numpy().view(numpy_dtype(bits[2]))
    return t.numpy()


def from_numpy(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """A numpy array as a tensor on ``device`` (bfloat16 and float8_e4m3fn from their ml_dtypes
    types, bit for bit)."""
    x = np.ascontiguousarray(x)
    found = _BITS_BY_NAME.get(dtype_name(x))
    if found is not None:
        dtype, np_bits = found
        return torch.from_numpy(x.view(np_bits)).view(dtype).to(device)
    return torch.from_numpy(x).to(device)


def gather_blocks_to_host(caches, block_ids) -> np.ndarray:
    """``gather_blocks`` into a host numpy array ``[n, len(caches), *block_shape]`` (block ids
    a tensor, numpy array or list). ``BlockOffloader(..., gather=gather_blocks_to_host)``."""
    return to_numpy(gather_blocks(caches, _ids(block_ids)))


def scatter_blocks_from_host(caches, buffer, block_ids) -> None:
    """``scatter_blocks`` of a host array ``[n, len(caches), *block_shape]`` (numpy, bfloat16
    as ml_dtypes) into ``caches`` in place. ``BlockOffloader(...,
    scatter=scatter_blocks_from_host)``."""
    dev = validate.check_caches(caches)[0].device
    if not isinstance(buffer, torch.Tensor):
        a = np.asarray(buffer)
        if a.dtype.kind not in "iufb" and dtype_name(a) not in _BITS_BY_NAME:
            raise TypeError(f"buffer: expected a tensor or numpy array of the caches' blocks, "
                            f"got {type(buffer).__name__} of {a.dtype} values")
        buffer = from_numpy(a, dev)
    scatter_blocks(caches, buffer.to(dev), _ids(block_ids))


__all__ = ["from_numpy", "gather_blocks_to_host", "scatter_blocks_from_host", "to_numpy"]
