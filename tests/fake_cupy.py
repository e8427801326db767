"""A fake ``cupy`` and torch CUDA stubs, so prefixkv's CUDA C launchers (kernels/cuda/*.py) run
on a machine without a GPU: tests/_cuda_launcher_cases.py, in a subprocess only, because
:func:`install` patches torch for the whole process.

Memory: every tensor stays on the CPU. A tensor marked by :func:`to_device` (or made by
``.to(cuda)``, ``torch.stack`` of such tensors, ...) reports ``device == cuda:0``; one marked by
:func:`pin` (or made by ``.pin_memory()``) reports ``is_pinned()``. Marks belong to the storage,
so views share them. ``.to(cuda)`` and ``.pin_memory()`` copy, as on a GPU machine.

Kernels: the fake ``RawModule``'s functions run the kernels compiled as host C++ against
tests/cuda_host_shim.h (the library test_cuda_on_host.py builds) through ctypes, after the checks
CuPy and CUDA would make: grid and block within CUDA's limits (no empty grid), one argument per
kernel parameter of the parameter's type (a Python int is not an ``int``), every array argument
in device memory, and the pointer tables of swap_blocks pointing at device or pinned memory.
Each launch is appended to :data:`LAUNCHES` with the device and stream it was issued on.
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np

LAUNCHES: list[dict] = []
CURRENT_STREAM = 0x5EED  # the cuda_stream of torch.cuda.current_stream() under the stubs

_MARKS: dict[int, tuple[str, int, object]] = {}  # storage ptr -> (kind, nbytes, keep-alive)
_state = {"device": 0, "stream": 0}
_lib: ctypes.CDLL | None = None

# kernel name -> (shim launcher, parameter kinds): "a8"/"a4" arrays of 8-/4-byte integers,
# "i32" a np.int32 scalar
KERNELS = {
    "swap_blocks_kernel": ("launch_swap_blocks", ("a8",) * 9),
    "prefixkv_hash_blocks_v1": ("launch_hash_blocks", ("a4",) * 7 + ("i32",) * 3),
}


def _storage(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _mark(t, kind: str):
    ptr, nbytes = _storage(t)
    t._fake_cupy_mark = kind  # an empty storage has no address of its own
    if ptr:
        _MARKS[ptr] = (kind, nbytes, t)
    return t


def to_device(t):
    """Mark t (its whole storage) as memory of CUDA device 0; returns t."""
    return _mark(t, "cuda")


def pin(t):
    """Mark t (its whole storage) as pinned host memory; returns t."""
    return _mark(t, "pinned")


def where(t) -> str:
    """'cuda', 'pinned' or 'cpu' (pageable host memory)."""
    ptr, _ = _storage(t)
    if ptr in _MARKS:
        return _MARKS[ptr][0]
    return getattr(t, "_fake_cupy_mark", "cpu")


def _region(ptr: int) -> str:
    for start, (kind, nbytes, _) in _MARKS.items():
        if start <= ptr < start + nbytes:
            return kind
    return "cpu"


# ------------------------------------------------------------------------------ fake cupy


class _Device:
    def __init__(self, device=None):
        self.id = _state["device"] if device is None else int(device)

    def __enter__(self):
        self._prev = _state["device"]
        _state["device"] = self.id
        return self

    def __exit__(self, *exc):
        _state["device"] = self._prev
        return False


class _Stream:
    def __init__(self, ptr: int):
        self.ptr = ptr

    def __enter__(self):
        self._prev = _state["stream"]
        _state["stream"] = self.ptr
        return self

    def __exit__(self, *exc):
        _state["stream"] = self._prev
        return False


def _external_stream(ptr, device_id=-1):
    if not isinstance(ptr, int):
        raise TypeError(f"ExternalStream: expected an int stream pointer, got {type(ptr)}")
    return _Stream(ptr)


class _Function:
    def __init__(self, name: str):
        self.name = name  # CuPy's RawModule functions load per device: no device check here
        self.launcher, self.params = KERNELS[name]

    def __call__(self, grid, block, args, **kwargs):
        if kwargs:
            raise TypeError(f"{self.name}: unexpected launch options {sorted(kwargs)}")
        grid, block = tuple(grid), tuple(block)
        dims = (*grid, *(1,) * (3 - len(grid))), (*block, *(1,) * (3 - len(block)))
        for what, d, limit in (("grid", dims[0], (2**31 - 1, 65535, 65535)),
                               ("block", dims[1], (1024, 1024, 64))):
            if not all(isinstance(x, int) and 1 <= x <= m for x, m in zip(d, limit, strict=True)):
                raise RuntimeError(f"{self.name}: invalid {what} {d} "
                                   f"(cudaErrorInvalidConfiguration)")
        if int(np.prod(dims[1])) > 1024:
            raise RuntimeError(f"{self.name}: {dims[1]} is over 1024 threads")
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: takes {len(self.params)} arguments, got {len(args)}")
        c_args = []
        for i, (a, kind) in enumerate(zip(args, self.params, strict=True)):
            if kind == "i32":
                if type(a) is not np.int32:
                    raise TypeError(f"{self.name}: argument {i} must be a numpy.int32, got "
                                    f"{type(a).__name__}")
                c_args.append(ctypes.c_int(int(a)))
                continue
            if not isinstance(a, _DeviceArray):
                raise TypeError(f"{self.name}: argument {i} must be a device array, got "
                                f"{type(a).__name__}")
            if a.dtype.kind not in "iu" or a.dtype.itemsize != int(kind[1]):
                raise TypeError(f"{self.name}: argument {i} must hold {kind[1]}-byte integers, "
                                f"got {a.dtype}")
            c_args.append(ctypes.c_void_p(a.ctypes.data))  # CuPy passes the data pointer only
        if self.name == "swap_blocks_kernel":
            _check_swap_args(args, dims[0])
        # the shim launchers take (grid.x[, grid.y], block.x): a 1-D block, a 1-D grid for the
        # hash kernel
        grid_dims = 2 if self.name == "swap_blocks_kernel" else 1
        if dims[0][grid_dims:] != (1,) * (3 - grid_dims) or dims[1][1:] != (1, 1):
            raise RuntimeError(f"{self.name}: the host shim runs a {grid_dims}-D grid of 1-D "
                               f"blocks, got grid {dims[0]}, block {dims[1]}")
        LAUNCHES.append({"kernel": self.name, "grid": dims[0], "block": dims[1],
                         "device": _state["device"], "stream": _state["stream"]})
        head = (*dims[0][:grid_dims], dims[1][0])
        getattr(_lib, self.launcher)(*map(ctypes.c_uint, head), *c_args)


def _check_swap_args(args, grid) -> None:
    """The table rows hold one entry per cache (grid.y) and point at device or pinned
    memory; the id rows one entry per copy (grid.x)."""
    n, num_caches = grid[0], grid[1]
    for i, row in enumerate(args[:7]):
        if row.shape != (num_caches,):
            raise RuntimeError(f"swap_blocks_kernel: table row {i} has shape {row.shape}, the "
                               f"grid {num_caches} caches (reads past the row)")
    for i, row in enumerate(args[7:]):
        if row.shape[0] < n:
            raise RuntimeError(f"swap_blocks_kernel: id row {i} has {row.shape[0]} entries, "
                               f"the grid {n} copies")
    for side, ptrs, blocks in (("src", args[0], args[5]), ("dst", args[1], args[6])):
        for c, (p, nb) in enumerate(zip(ptrs.tolist(), blocks.tolist(), strict=True)):
            if nb and _region(int(p) & (2**64 - 1)) == "cpu":
                raise RuntimeError(f"swap_blocks_kernel: {side} cache {c} is pageable host "
                                   f"memory (illegal address on a GPU)")


class _DeviceArray(np.ndarray):
    """A numpy view of device memory: what the fake cupy hands to a fake kernel."""


def _as_device_array(x, what: str) -> _DeviceArray:
    import torch

    if isinstance(x, _DeviceArray):
        return x
    if isinstance(x, torch.Tensor):
        if where(x) != "cuda":
            raise TypeError(f"cupy.{what}: the tensor is not on a CUDA device ({where(x)})")
        return x.detach().numpy().view(_DeviceArray)
    raise TypeError(f"cupy.{what}: expected a CUDA tensor or array, got {type(x).__name__}")


class _RawModule:
    def __init__(self, code: str, options=(), **kwargs):
        if not isinstance(code, str) or "__global__" not in code:
            raise ValueError("RawModule: expected CUDA source code")
        self.code, self.options = code, tuple(options)

    def get_function(self, name: str) -> _Function:
        if name not in KERNELS or f" {name}(" not in self.code:
            raise AttributeError(f"RawModule: no kernel {name!r} in the source")
        return _Function(name)


def _fake_cupy() -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.__fake__ = True
    cupy.int32 = np.int32
    cupy.RawModule = _RawModule
    cupy.from_dlpack = lambda t: _as_device_array(t, "from_dlpack")
    cupy.asarray = lambda x: _as_device_array(x, "asarray")
    cupy.cuda = types.SimpleNamespace(Device=_Device, ExternalStream=_external_stream,
                                      Stream=types.SimpleNamespace(null=_Stream(0)))
    return cupy


# ------------------------------------------------------------------------------ torch stubs


def _install_torch_stubs() -> None:
    import torch

    base_device = torch._C.TensorBase.device
    orig_to, orig_stack = torch.Tensor.to, torch.stack
    orig_empty_like = torch.empty_like
    cuda0 = torch.device("cuda", 0)

    def device(self):
        return cuda0 if where(self) == "cuda" else base_device.__get__(self)

    def is_cuda_target(a, k) -> bool:
        d = k.get("device", a[0] if a else None)
        if isinstance(d, str):
            d = torch.device(d)
        return isinstance(d, torch.device) and d.type == "cuda"

    def to(self, *a, **k):
        if is_cuda_target(a, k):
            if k.get("device") is None and a and isinstance(a[0], torch.device):
                a = a[1:]
            k.pop("device", None)
            k.pop("non_blocking", None)
            out = orig_to(self, *a, **k) if a or k else self
            if where(self) == "cuda":
                return out if out is self else to_device(out)
            return to_device(out.clone())  # a host -> device copy
        out = orig_to(self, *a, **k)
        if out is not self and where(self) == "cuda":
            d = k.get("device", a[0] if a else None)
            if not (isinstance(d, (str, torch.device)) and torch.device(d).type == "cpu"):
                to_device(out)  # e.g. a dtype change stays on the device
        return out

    def stack(tensors, *a, **k):
        out = orig_stack(tensors, *a, **k)
        kinds = {where(t) for t in tensors}
        if kinds == {"cuda"}:
            to_device(out)
        elif "cuda" in kinds:
            raise RuntimeError("torch.stack: tensors on different devices")
        return out

    def empty_like(t, *a, pin_memory=False, **k):
        if pin_memory and where(t) == "cuda":
            raise RuntimeError("empty_like: pin_memory=True of a CUDA tensor")
        out = orig_empty_like(t, *a, **k)
        if pin_memory:
            return pin(out)
        return to_device(out) if where(t) == "cuda" and "device" not in k else out

    def pin_memory(self):
        if where(self) == "cuda":
            raise RuntimeError("cannot pin a CUDA tensor")
        return pin(self.clone())

    def record_stream(self, stream):
        if where(self) != "cuda":
            raise RuntimeError("record_stream: the tensor is not on a CUDA device")

    torch.Tensor.device = property(device)
    torch.Tensor.to = to
    torch.Tensor.is_pinned = lambda self: where(self) == "pinned"
    torch.Tensor.pin_memory = pin_memory
    torch.Tensor.record_stream = record_stream
    torch.stack = stack
    torch.empty_like = empty_like
    torch.cuda.current_device = lambda: 0
    torch.cuda.current_stream = lambda device=None: types.SimpleNamespace(
        cuda_stream=CURRENT_STREAM, device=cuda0)


def install(shim_path: str) -> types.ModuleType:
    """Load the host-compiled kernels, put the fake ``cupy`` in sys.modules and stub torch."""
    global _lib
    if "cupy" in sys.modules and not getattr(sys.modules["cupy"], "__fake__", False):
        raise RuntimeError("a real cupy is imported already; the fake would not be used")
    _lib = ctypes.CDLL(shim_path)
    sys.modules["cupy"] = cupy = _fake_cupy()
    _install_torch_stubs()
    return cupy
