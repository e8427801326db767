"""Every op of the contract as a ``torch.library.custom_op`` (``torch.ops.prefixkv.<op>``) and
its Python wrapper of the same name.

The custom ops pick the backend at run time by device (:mod:`._registry`); the wrappers run the
static input checks of :mod:`prefixkv.paged.validate` always, the host value checks when
:func:`~prefixkv.paged.validate.value_checks_enabled` says so (index tensors on the CPU, or
checked mode), never while ``torch.compile`` traces. The custom ops run the same checks when
the dispatcher runs them (called directly, or in a compiled graph: see ``_op``'s guards).
Cache ops mutate their caches in place and declare it in ``mutates_args``; no op returns an
input or a view of one. Index tensors (block tables, lengths, slot mappings, block ids) may
stay on the CPU with the data on a GPU in the wrappers: checked on the host, then copied over
on every call; on the GPU already they are used as they are (no
copy, no sync: what CUDA-graph capture needs). The CUDA tensors of a call live on one device,
which must be the current one (``torch.cuda.set_device``, or ``with torch.cuda.device(d):``),
as in vLLM's and SGLang's one-process-per-GPU workers: the Triton and CuPy launches go to the
current device.

Attention ops come twice: ``prefixkv::paged_attention`` returns fresh ``(out, lse)``;
``prefixkv::paged_attention_out`` writes caller buffers. With ``out=``, ``lse=`` and a
``workspace=`` of :func:`attention_workspace_size` bytes the triton backend allocates nothing
(CUDA-graph capture, a fixed memory budget); the CPU path ignores the workspace.

A wrapper called in plain eager mode runs its layout checks (all but the value checks) once
per layout of its arguments (:func:`_layout_key`), and the op's implementation directly
(:func:`_invoke`):
the dispatcher round trip of a ``custom_op`` costs about 50-120 us a call in torch's Python
(its ADInplaceOrView kernel rebuilds the schema's argument list per argument), more than a
small decode kernel. Under ``torch.compile``, a dispatch mode (fake tensors, export,
functionalization), the profiler, autograd or a tensor subclass they call
``torch.ops.prefixkv.<op>``.
"""

from __future__ import annotations

import functools
import inspect
import sys

import numpy as np
import torch
from torch.autograd.graph import increment_version

from ..kernels.cuda.transfer import upload
from ..paged import validate
from ..paged.spec import WORKSPACE_ALIGN, dtype_name, register_dtype_names
from ._native import _dequantized_blocks, _host_ids, _overlaps, _span, traced
from ._registry import platform_of, select

Tensor = torch.Tensor
_LIB = "prefixkv"
_is_functional = torch._is_functional_tensor  # torch.func.functionalize's wrapped tensors
register_dtype_names(d for d in vars(torch).values() if isinstance(d, torch.dtype))


def _want_values(*tensors) -> bool:
    if traced(*tensors):
        return False
    live = [t for t in tensors if t is not None]
    return validate.value_checks_enabled(host_inputs=all(t.device.type == "cpu" for t in live))


def _at_most(lens: Tensor, capacity: int) -> Tensor:
    """Unchecked lengths on the host (value checks off) clipped to [0, ``capacity``] keys,
    what the value checks allow (valid lengths pass unchanged): the CPU paths loop over a
    sequence's kv_len keys, so one garbage length near 2**31 hung a 2-sequence call, and a
    negative one reached torch.arange (or, as a prefix length, wrapped to 2**31 - 1 in the
    cascade's joined tables). Lengths on a device pass as they are (a clamp here would
    allocate inside a captured graph): the triton kernels clip them themselves, and the torch
    paths' padding is the table's width."""
    if lens.device.type != "cpu":
        return lens
    return lens.clamp(0, min(capacity, 2**31 - 1))


def _on(device: torch.device, *tensors):
    """``tensors`` on ``device`` with unit stride along their last axis (index tensors kept on
    the CPU with caches on a GPU are copied after their host value checks, without stalling
    the stream; such tensors on the device already are passed as they are, the CUDA-graph-safe
    way). The kernels read a 1-D index tensor as contiguous and a table's row as contiguous (a
    column slice of a wider table is fine: they take its row stride); any other view (a column
    of an [n, 2] mapping, a column-major table) is copied first, never read with the wrong
    strides. None stays None."""
    return tuple(None if t is None else upload(t if _unit_last_stride(t) else t.contiguous(),
                                               device) for t in tensors)


def _unit_last_stride(t: Tensor) -> bool:
    return t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1


def _tensors(same_device: bool = True, raw: bool = False, **named) -> torch.device | None:
    """Each argument a torch.Tensor (a list or tuple: each item; None skipped), else a
    TypeError naming it, before anything runs: a numpy array or list reached a torch call
    deep inside (an error naming nothing, or a cache half-written). The data tensors (those
    named here) on one device unless ``same_device`` is False, else a ValueError naming the
    first elsewhere (the index tensors may stay on the CPU: see the module docstring). ``raw``:
    the kernels read them as raw memory, so a negative-bit view is refused (_no_neg_bits).
    Returns the first one's device."""
    device = first = None
    for name, value in named.items():
        items = (list(enumerate(value)) if isinstance(value, (list, tuple))
                 else [(None, value)])
        for i, t in items:
            label = name if i is None else f"{name}[{i}]"
            if t is None and i is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{label}: expected a torch.Tensor, got {type(t).__name__}")
            _dense(label, t)
            if raw:
                _no_neg_bits(**{label: t})
            if device is None:
                _has_data(label, t)  # the others: on its device (or each checked)
                device, first = t.device, label
            elif same_device and t.device != device:
                raise ValueError(f"{label}: expected it on {first}'s device {device}, got "
                                 f"{t.device}")
            elif not same_device:
                _has_data(label, t)
    return device


#: Static checks that passed, by the signature of their arguments (_static_check).
_PASSED: dict = {}
_PASSED_MAX = 4096


def _signature(a):
    """What a static check reads of an argument: a tensor's shape and dtype, else its type
    and value."""
    return (a.shape, a.dtype) if isinstance(a, Tensor) else (type(a), a)


def _static_check(check, *args, **kwargs):
    """``check(*args, **kwargs)``, a static check of validate (shapes, dtypes and option
    values only; never a device, stride or tensor value), run once per signature of its
    arguments in eager mode: every layer of every step repeats the same call, and the checks
    cost ~10 us of a ~60 us small call. Results of checks that passed are kept (at most
    _PASSED_MAX, then cleared); a failing one raises every time. Under torch.compile it runs
    as it is (once, when tracing)."""
    if torch.compiler.is_compiling():
        return check(*args, **kwargs)
    key = (check, *map(_signature, args), *((k, _signature(v)) for k, v in kwargs.items()))
    try:
        return _PASSED[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable argument: the check names it
        return check(*args, **kwargs)
    result = check(*args, **kwargs)
    if len(_PASSED) >= _PASSED_MAX:
        _PASSED.clear()
    _PASSED[key] = result
    return result


#: Eager calls whose layout checks passed, by _layout_key: what those checks returned.
_VOUCHED: dict = {}


def _direct() -> bool:
    """Whether a wrapper call runs in plain eager mode: not while torch.compile traces, and no
    dispatch or function mode (fake tensors, export, functionalization) or profiler on (those
    see the call through ``torch.ops.prefixkv.<op>``)."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._autograd._profiler_enabled())


def _layout_key(op: str, data: tuple, index: tuple = (), options: tuple = ()) -> tuple | None:
    """What the layout checks of an eager call of ``op`` (every check but the host value
    checks) read of its arguments: of each ``data`` tensor (None kept as None) its address,
    storage offset, shape, strides, dtype, device and its inference and negative bits; of
    each ``index`` tensor (None kept) its shape, dtype, device and negative bit (the
    checks read no index tensor's memory, so each step's new tensors of last step's shapes
    match); each option's type and value; whether inference mode is on. Those checks read
    nothing else, so equal keys get equal answers, also when a tensor was freed and another
    one made at its address with its layout. An engine repeats each layer's call every step:
    the attention, merge and write_kv wrappers run their layout checks once per key
    (_VOUCHED).

    None (the checks run every call) outside plain eager mode (_direct), or when an argument
    is anything else: a list, a numpy value, a tensor subclass, one that requires grad, a
    sparse or nested tensor (which have no strides), a functionalization-wrapped tensor."""
    if not _direct():
        return None
    key: list = [op, torch.is_inference_mode_enabled()]
    try:
        for a in data:
            if type(a) is Tensor and not a.requires_grad and not _is_functional(a):
                key.append((a.data_ptr(), a.storage_offset(), a.shape, a.stride(), a.dtype,
                            a.device, a.is_inference(), a.is_neg()))
            elif a is None:  # kept in its place: a tensor in the next slot is another call
                key.append(None)
            else:
                return None
        for a in index:
            if (type(a) is Tensor and not a.requires_grad and a.layout == torch.strided
                    and not _is_functional(a)):
                key.append((a.shape, a.dtype, a.device, a.is_neg(), a.is_nested))
            elif a is None:
                key.append(None)
            else:
                return None
    except (RuntimeError, NotImplementedError):  # no strides, no data pointer
        return None
    for a in options:
        kind = type(a)
        if kind not in _SCALAR_TYPES:
            return None
        key.append((kind, a))
    return tuple(key)


def _scale_tensors(k_scale, v_scale) -> tuple:
    """(k_scale, v_scale), each given as a tensor, else None: _layout_key's index tensors of
    write_kv (its checks read their shapes and values, not their memory), data tensors of the
    attention calls (their buffers must not share the scales' memory)."""
    return tuple(s if isinstance(s, Tensor) else None for s in (k_scale, v_scale))


def _scale_floats(k_scale, v_scale) -> tuple:
    """(k_scale, v_scale), each not given as a tensor (None, a float, or what the checks
    refuse), else None: _layout_key's options. With _scale_tensors, each keeps its slot."""
    return tuple(None if isinstance(s, Tensor) else s for s in (k_scale, v_scale))


def _vouched(key: tuple | None):
    """The kept answer for ``key``, or None (never reading _VOUCHED for a None key: dynamo,
    tracing a wrapper, built a variable of every kept key, minutes of a compile)."""
    return None if key is None else _VOUCHED.get(key)


def _vouch(key: tuple | None, result) -> None:
    """Keep ``result``, the passed layout checks' answer, for ``key`` (None: not kept; at most
    _PASSED_MAX answers, then cleared)."""
    if key is None:
        return
    if len(_VOUCHED) >= _PASSED_MAX:
        _VOUCHED.clear()
    _VOUCHED[key] = result


def _index_tensors(**named) -> None:
    """Each index argument a torch.Tensor with data (None skipped), else an error naming it."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t is not None:
            _dense(name, t)
            _no_neg_bits(**{name: t})  # ids are read raw, or through numpy
            _has_data(name, t)


def _dense(name: str, t: Tensor) -> None:
    """A TypeError naming a sparse or nested tensor: the ops read dense (strided) memory, and
    such a tensor failed deep inside torch (an error naming no argument, or the stride-0
    refusal of a sparse cache)."""
    if t.is_nested:
        raise TypeError(f"{name}: expected a dense tensor, got a nested tensor")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")


def _no_neg_bits(**named) -> None:
    """A ValueError naming the first tensor that is a negative-bit view (None skipped): the
    compiled and Triton kernels of attention, the merge and write_kv read and write raw
    memory, so such a view was read as its negation (the block ops route such caches to the
    torch backend, which resolves the bit: _block_contiguous). Not while compiling (dynamo
    cannot trace is_neg): the op's guard checks the real tensors."""
    if torch.compiler.is_compiling():
        return
    for name, t in named.items():
        if t is not None and t.is_neg():
            raise ValueError(f"{name}: a negative-bit view (torch._neg_view, or a real view of "
                             f"a conjugated complex tensor); pass {name}.resolve_neg()")


def _has_data(name: str, t: Tensor) -> None:
    """A ValueError naming a tensor on the meta device (shapes only: nothing to read or
    write); it had failed deep inside (torch's "Cannot copy out of meta tensor", or a backend
    error naming the platform, not the argument)."""
    if t.device.type == "meta":
        raise ValueError(f"{name}: a tensor on the meta device has no data to run on; pass it "
                         f"on the CPU or a CUDA device")


def _on_device(device: torch.device, **index) -> None:
    """A custom op called directly: each index tensor (None skipped) on ``device``, the data's,
    where the kernels read it (the wrappers copy host index tensors over), else a ValueError
    naming it: a GPU kernel handed a host pointer faults."""
    for name, t in index.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected it on the data's device {device} (the op reads "
                             f"it there; the wrapper of the same name in "
                             f"prefixkv.torch_frontend copies host index tensors over), got "
                             f"{t.device}")


def _block_spans(t: Tensor):
    """(first byte's address, block stride, bytes spanned by one block, num_blocks) of a cache
    whose
    block i lies within [first + i * stride, + span) and spans no more than its stride (block-
    major caches, their halves or layers in one stacked buffer); None for other layouts."""
    es = t.element_size()
    inner = list(zip(t.shape[1:], t.stride()[1:], strict=True))
    if any(st < 0 for _, st in inner) or t.stride(0) < 0:
        return None
    span = (sum((n - 1) * st for n, st in inner) + 1) * es
    step = t.stride(0) * es if t.shape[0] > 1 else span
    return (t.data_ptr(), step, span, t.shape[0]) if span <= step else None


def _meeting_pairs(first, second) -> list[tuple[int, int]]:
    """(i, j) for every ``first[i]`` and ``second[j]`` on one device whose byte spans
    intersect, whatever their storages (none while compiling: fake tensors have no memory).
    One sweep over the sorted spans: disjoint caches (a device's and a host's, or layers of
    one buffer) cost what their spans do."""
    if traced(*first, *second):
        return []
    spans = sorted((*_span(t), side, i) for side, group in enumerate((first, second))
                   for i, t in enumerate(group) if t.numel())
    pairs, live = [], []
    for lo, hi, side, i in spans:
        live = [x for x in live if x[0] > lo]  # spans still open at lo
        for _, other, k in live:
            if other != side:
                pair = (i, k) if side == 0 else (k, i)
                if first[pair[0]].device == second[pair[1]].device:
                    pairs.append(pair)
        live.append((hi, side, i))
    return sorted(pairs)


def _blocks_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether a block of cache a and a block of cache b share bytes: exact for the layouts of
    :func:`_block_spans` (disjoint halves or layers of one buffer pass), else whether their
    whole byte spans intersect."""
    if not _overlaps(a, b):
        return False
    pa, pb = _block_spans(a), _block_spans(b)
    if pa is None or pb is None:
        return True
    start_a = pa[0] + np.arange(pa[3], dtype=np.int64) * pa[1]  # sorted, disjoint
    start_b = pb[0] + np.arange(pb[3], dtype=np.int64) * pb[1]
    last = np.searchsorted(start_a, start_b + pb[2], side="left") - 1  # a's block before b's end
    return bool(np.any((last >= 0) & (start_a[np.maximum(last, 0)] + pa[2] > start_b)))


def _distinct(caches) -> list:
    """The caches with a tensor listed again (the same object, or the same memory, shape and
    strides: layers sharing one KV cache) dropped: copied once, a chained copy would
    otherwise read what its first pass already wrote. While compiling the same object only
    (fake tensors have no memory), by ``is`` (torch 2.11's dynamo refuses id() of a tensor
    made inside the compiled function): the op drops the others when it runs (_copy_blocks)."""
    out: list = []
    if traced(*caches):
        for c in caches:
            if not any(c is o for o in out):
                out.append(c)
        return out
    seen = set()
    for c in caches:
        key = (c.device, c.data_ptr(), tuple(c.shape), c.stride(), c.dtype)
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _writable(name: str, caches, kind: str = "cache") -> None:
    """A ValueError naming the first cache (``name[i]``, or ``name`` for one tensor) that
    reaches one memory location from two indices (a stride-0 view, e.g. from expand(), or an
    as_strided view whose blocks or rows overlap), before anything is written: torch refused
    such a destination only after the caches listed before it were written, naming none, and
    write_kv's row writes and the block copies went in unchecked (the last write to each
    location won). While torch.compile traces, stride-0 views only (the op checks the rest
    when it runs). A tensor of no element (any strides: numpy's empty arrays come with zeros)
    holds nothing twice."""
    items = enumerate(caches) if isinstance(caches, (list, tuple)) else [(None, caches)]
    for i, c in items:
        strides = c.stride()
        if 0 in strides and 0 not in c.shape and any(
                n > 1 and st == 0 for n, st in zip(c.shape, strides, strict=True)):
            why = "a stride-0 view, e.g. from expand()"
        elif torch.compiler.is_compiling() or not _self_aliases(c):
            continue
        else:
            why = "an overlapping view, e.g. from as_strided()"
        label = name if i is None else f"{name}[{i}]"
        what = (("its blocks share memory", "each block") if kind == "cache" and c.shape[0] > 1
                else ("its elements share memory", "each element"))
        raise ValueError(f"{label}: {what[0]} ({why}); pass a {kind} that holds {what[1]} "
                         f"once")


@functools.lru_cache(maxsize=1024)
def _one_to_one(shape, strides) -> bool:
    """Whether a layout provably reaches each element once: its axes of more than one
    element, by stride, each stride past the reach of the smaller ones (any permutation of a
    dense layout, padded or not: a stacked cache's halves, HND views, column slices). Kept
    by layout: every layer and step passes the same ones."""
    reach = 0
    for st, n in sorted((st, n) for n, st in zip(shape, strides, strict=True) if n > 1):
        if st <= reach:
            return False
        reach += (n - 1) * st
    return True


#: Element offsets of one block past which the exact alias checks give up (and accept).
_ALIAS_MAX_ELEMENTS = 1 << 22
#: Block distances past which the exact alias checks give up (and accept).
_ALIAS_MAX_SHIFTS = 4096


def _block_offsets(t: Tensor) -> np.ndarray | None:
    """The element offsets (from its first) of one block of t (axis 0 the block axis), or
    None when they are more than _ALIAS_MAX_ELEMENTS."""
    if int(np.prod(t.shape[1:], dtype=np.int64)) > _ALIAS_MAX_ELEMENTS:
        return None
    off = np.zeros(1, dtype=np.int64)
    for n, st in zip(t.shape[1:], t.stride()[1:], strict=True):
        off = (off[:, None] + np.arange(n, dtype=np.int64) * st).ravel()
    return off


def _shifts_meet(off: np.ndarray, other: np.ndarray, shift: int, stride: int,
                 shifts: range) -> bool:
    """Whether ``off + k * stride`` meets ``other + shift`` for a k in ``shifts``."""
    for k in shifts:
        if np.intersect1d(off + k * stride, other + shift, assume_unique=True).size:
            return True
    return False


def _self_aliases(t: Tensor) -> bool:
    """Whether two indices of t reach one element, for a layout _one_to_one cannot vouch for:
    exactly, by one block's offsets against themselves and the blocks near it (accepted when
    that takes more than _ALIAS_MAX_ELEMENTS offsets or _ALIAS_MAX_SHIFTS blocks)."""
    if t.numel() <= 1 or _one_to_one(tuple(t.shape), t.stride()):
        return False
    if t.dim() == 1:
        return True  # one axis of several elements, stride 0
    off = _block_offsets(t)
    if off is None:
        return False
    if np.unique(off).size < off.size:
        return True
    n, s0 = t.shape[0], t.stride(0)  # torch strides are never negative
    if n <= 1:
        return False
    if s0 == 0:
        return True
    reach = int(off.max() - off.min())
    last = min(n - 1, reach // s0)
    if last > _ALIAS_MAX_SHIFTS:
        return False
    return _shifts_meet(off, off, 0, s0, range(1, last + 1))


#: _share_elements' answers, by the two tensors' memory and layout.
_SHARED: dict = {}


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether views a and b reach a common element: exact for two views of one layout (the
    halves of a stacked cache, however interleaved), else whether their blocks' byte spans
    meet (_blocks_overlap). Answers are kept: engines pass the same caches every call."""
    if not _overlaps(a, b):
        return False
    key = (a.device, a.data_ptr(), b.data_ptr(), tuple(a.shape), tuple(b.shape), a.stride(),
           b.stride(), a.dtype, b.dtype)
    hit = _SHARED.get(key)
    if hit is None:
        hit = _SHARED[key] = _layouts_share(a, b)
        if len(_SHARED) > 1024:
            _SHARED.clear()
    return hit


def _layouts_share(a: Tensor, b: Tensor) -> bool:
    """_share_elements, uncached (spans that meet)."""
    if a.dim() == 0 or b.dim() == 0 or not _cluster_overlaps([a, b]):
        return a.dim() == 0 or b.dim() == 0
    es = a.element_size()
    shift, rest = divmod(b.data_ptr() - a.data_ptr(), es)
    if a.shape != b.shape or a.stride() != b.stride() or es != b.element_size() or rest:
        return True  # _cluster_overlaps: their blocks' spans meet
    off = _block_offsets(a)
    if off is None:
        return True
    n, s0 = a.shape[0], a.stride(0)  # torch strides are never negative
    if n <= 1 or s0 == 0:
        return _shifts_meet(off, off, shift, 0, range(1))
    # a's block i meets b's block j where (i - j) * s0 = shift + (a difference of offsets)
    reach = int(off.max() - off.min())
    lo, hi = max(-((reach - shift) // s0), -(n - 1)), min((shift + reach) // s0, n - 1)
    if hi - lo > _ALIAS_MAX_SHIFTS:
        return True
    return _shifts_meet(off, off, shift, s0, range(lo, hi + 1))


def _not_inference(**named) -> None:
    """A RuntimeError (torch's type for it) naming the first tensor (``name[i]`` in a list)
    that is an inference tensor (made under torch.inference_mode()) while inference mode is
    off, before anything is written: torch refused it only after the write (the version bump
    raises), and the compiled host copy and the GPU kernels write through raw pointers,
    unchecked. Run by the mutating ops themselves, so a compiled step is checked when it runs
    (eager: the same call)."""
    if torch.is_inference_mode_enabled():
        return
    for name, value in named.items():
        items = (list(enumerate(value)) if isinstance(value, (list, tuple))
                 else [(None, value)])
        for i, t in items:
            if t.is_inference():
                label = name if i is None else f"{name}[{i}]"
                raise RuntimeError(f"{label}: an inference tensor (made under "
                                   f"torch.inference_mode()) is written in place only inside "
                                   f"inference_mode; call the op there, or pass a clone")


def _check_out(name: str, buf, shape, dtype, device, owner: str = "q") -> None:
    if buf is None:
        return
    if not isinstance(buf, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(buf).__name__}")
    _dense(name, buf)
    _no_neg_bits(**{name: buf})  # written as raw memory
    if tuple(buf.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(buf.shape)}")
    if buf.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype_name(dtype)}, got {dtype_name(buf)}")
    if buf.device != device:
        raise ValueError(f"{name}: expected it on {owner}'s device {device}, got {buf.device}")


def _check_workspace(workspace, q) -> None:
    if workspace is None:
        return
    if not isinstance(workspace, torch.Tensor):
        raise TypeError(f"workspace: expected a torch.Tensor, got {type(workspace).__name__}")
    if workspace.dtype != torch.uint8 or workspace.dim() != 1 or not workspace.is_contiguous():
        raise ValueError(f"workspace: expected a contiguous 1-D uint8 tensor, got "
                         f"{dtype_name(workspace)} of shape {tuple(workspace.shape)}")
    if workspace.device != q.device:
        raise ValueError(f"workspace: expected it on q's device {q.device}, got "
                         f"{workspace.device}")
    # storage_offset() is not traceable: under torch.compile the op's guard checks it when the
    # graph runs (and the Triton launcher's _carve)
    if not torch.compiler.is_compiling() and workspace.storage_offset() % WORKSPACE_ALIGN:
        raise ValueError(f"workspace: must start {WORKSPACE_ALIGN}-byte aligned (a fresh "
                         f"tensor, or a slice at a multiple of {WORKSPACE_ALIGN})")


# ----------------------------------------------------------------------- fp8 KV caches


def _scale_tensor(name: str, scale, cache: Tensor) -> Tensor | None:
    """A checked k_scale / v_scale (validate.check_kv_scale ran) as a 0-d float32 tensor on the
    cache's device, or None. A Python float becomes a tensor so that a CUDA division by it is
    a true division (torch divides by a CPU scalar as a multiply by its reciprocal)."""
    if scale is None:
        return None
    if isinstance(scale, (int, float, np.integer, np.floating)):
        return torch.tensor(float(scale), dtype=torch.float32, device=cache.device)
    if not isinstance(scale, torch.Tensor):  # a numpy array or another framework's
        raise TypeError(f"{name}: expected a float or a torch.Tensor, got "
                        f"{type(scale).__name__}")
    return upload(scale.detach(), cache.device).reshape(())


def _kv_scales(k_scale, v_scale, k_cache: Tensor, v_cache: Tensor):
    """(k_scale, v_scale) as 0-d tensors on the caches' device after their value checks
    (host tensors always; device tensors in checked mode)."""
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if isinstance(scale, torch.Tensor):
            _has_data(name, scale)
    if _want_values(*(s for s in (k_scale, v_scale) if isinstance(s, torch.Tensor))):
        validate.check_kv_scale_values(k_scale, v_scale)
    return _scale_tensor("k_scale", k_scale, k_cache), _scale_tensor("v_scale", v_scale, v_cache)


# ----------------------------------------------------------------------- op registration

#: The Python implementation of every custom op, by op name (what the dispatcher calls).
_IMPL: dict = {}
#: Positions of each op's mutated arguments (its ``mutates_args``), by op name.
_MUTATED: dict = {}
#: The parameter names of each op, by op name.
_PARAMS: dict = {}


def _op(name: str, mutates_args=(), guard=None):
    """torch.library.custom_op(prefixkv::name), keeping the undecorated function in _IMPL. An op
    returning tensors gets a backward that says it has none (the ops are inference kernels,
    as FlashInfer's and vLLM's): torch's own error names no op and suggests writing one.

    ``guard``: the input checks of the op as the dispatcher runs it (``torch.ops.prefixkv.<op>``
    called directly, a torch.compile graph, a dispatch mode), with the op's signature; returns
    its arguments, unchecked host lengths clipped (_at_most). The wrappers run the same checks
    before they call the op, and in plain eager mode run _IMPL directly (checked once);
    called directly, an op without them crashed on caches of two block counts, wrote past a
    cache, left one half-written or looped on a garbage length."""
    def register(fn):
        _IMPL[name] = fn
        params = list(inspect.signature(fn).parameters)
        _MUTATED[name] = tuple(params.index(a) for a in mutates_args)
        _PARAMS[name] = tuple(params)
        entry = fn
        if guard is not None:
            @functools.wraps(fn)
            def entry(*args, **kwargs):
                return fn(*guard(*args, **kwargs))
        op = torch.library.custom_op(f"{_LIB}::{name}", mutates_args=mutates_args)(entry)
        if not mutates_args:
            op.register_autograd(functools.partial(_no_backward, name),
                                 setup_context=_no_context)
        return op
    return register


def _fake(op, name: str):
    """``op.register_fake(fn)``, the fake run after _fake_devices' check."""
    def register(fn):
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            _fake_devices(name, *args, **kwargs)
            return fn(*args, **kwargs)
        op.register_fake(fake)
        return fake
    return register


def _fake_devices(name: str, *args, **kwargs) -> None:
    """A ValueError naming the first tensor argument of op ``name`` (``name[i]`` in a list)
    not on the first one's device: called directly with one index tensor on the meta device
    and the rest on the CPU, the op is dispatched to its fake implementation, which returned
    uninitialized outputs or wrote nothing, without an error. (The wrappers and a traced graph
    hand every tensor on the data's device: swap_blocks alone mixes devices, and keeps its
    plain fake.)"""
    device = first = None
    for label, t in _labelled(name, *args, **kwargs):
        if device is None:
            device, first = t.device, label
        elif t.device != device:
            raise ValueError(f"{label}: expected it on {first}'s device {device}, got "
                             f"{t.device}")


def _labelled(name: str, *args, **kwargs):
    """(label, tensor) of every tensor argument of op ``name`` (``name[i]`` in a list)."""
    bound = inspect.signature(_IMPL[name]).bind(*args, **kwargs)
    for pname, value in bound.arguments.items():
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, t in items:
            if isinstance(t, torch.Tensor):
                yield (pname if i is None else f"{pname}[{i}]"), t


def _no_grad_writes(name: str, args: tuple) -> None:
    """In grad mode, a RuntimeError naming the first tensor argument of op ``name`` (one that
    writes in place: a cache or an ``out=`` buffer) that requires grad, as torch's own
    ``out=`` functions refuse: the written tensor got no gradient, so a loss through it
    backpropagated incomplete gradients without an error, and a leaf parameter was written in
    place. The wrappers check (_invoke): under the dispatcher a custom op runs with grad mode
    off, so the op cannot tell."""
    for pname, value in zip(_PARAMS[name], args, strict=False):  # defaults unpassed
        items = value if isinstance(value, (list, tuple)) else (value,)
        for i, t in enumerate(items):
            if isinstance(t, Tensor) and t.requires_grad:
                label = pname if value is t else f"{pname}[{i}]"
                raise RuntimeError(
                    f"{label}: requires grad, but prefixkv.{name} writes in place and has no "
                    f"gradient (an inference kernel). Call it under torch.no_grad() or "
                    f"torch.inference_mode(), or pass {pname} detached (.detach())")


def _forward_only(name: str) -> str:
    return (f"prefixkv.{name} is forward-only (an inference kernel): it has no gradient. Call "
            f"it under torch.no_grad() or torch.inference_mode(), or pass inputs that need no "
            f"grad (.detach())")


@torch.library.custom_op(f"{_LIB}::_no_gradient", mutates_args=())
def _no_gradient(op: str, grad: Tensor) -> Tensor:
    """The backward of the forward-only op ``op``: raises when it runs. An op, not a raise in
    the backward formula: AOTAutograd traces the backward whenever an input requires grad
    (backward called or not), so torch.compile of a forward in grad mode failed while
    compiling, where eager ran it; traced, this is an op like any other (its fake: a 0-d
    tensor the gradients are made of), and raises only in a backward that runs."""
    raise RuntimeError(_forward_only(op))


@_no_gradient.register_fake
def _(op, grad):
    return grad.new_zeros(())


def _grad_meta(x):
    """What a gradient of input ``x`` needs: (shape, dtype, device) of a floating tensor, a
    list of them for a list of tensors, else None (no gradient)."""
    if isinstance(x, Tensor):
        return (x.shape, x.dtype, x.device) if x.dtype.is_floating_point else None
    if isinstance(x, (list, tuple)):
        return [_grad_meta(t) for t in x]
    return None


def _no_context(ctx, inputs, output) -> None:
    ctx.inputs = tuple(_grad_meta(x) for x in inputs)


def _no_backward(name: str, ctx, *grads):
    """Gradients of every input made from _no_gradient's answer: the backward raises when it
    runs (_no_gradient), and traces (AOTAutograd) as a graph that would."""
    grad = next((g for g in grads if isinstance(g, Tensor)), None)
    if grad is None:
        raise RuntimeError(_forward_only(name))
    err = torch.ops.prefixkv._no_gradient(name, grad)

    def of(meta):
        if isinstance(meta, list):
            return [of(m) for m in meta]
        if meta is None:
            return None
        shape, dtype, device = meta
        return err.to(device=device, dtype=dtype).expand(shape)

    return tuple(of(m) for m in ctx.inputs)


#: Argument types that hold no tensor (skipped by _plain without an isinstance check).
_SCALAR_TYPES = frozenset({type(None), bool, int, float, str})


def _plain(args) -> bool:
    """Every tensor argument (also inside lists) a plain torch.Tensor needing no grad, none
    wrapped by functionalization (torch.func.functionalize: the op goes through the
    dispatcher, which unwraps them; run directly, the kernels read wrappers with no memory)."""
    for a in args:
        t = type(a)
        if t is torch.Tensor:
            if a.requires_grad or _is_functional(a):
                return False
        elif t in _SCALAR_TYPES:
            continue
        elif isinstance(a, (list, tuple)):
            if not _plain(a):
                return False
        elif isinstance(a, torch.Tensor):  # a subclass
            return False
    return True


def _invoke(name: str, args: tuple, direct: bool = False):
    """``torch.ops.prefixkv.<name>(*args)``; in plain eager mode (not compiling, no dispatch or
    function mode, no profiler, plain tensors without grad) its implementation directly, with
    the version bump of its mutated arguments that the dispatcher would have made. An op that
    writes in place refuses, in grad mode, tensors that require grad (_no_grad_writes: such a
    tensor is never _plain, so the direct path pays nothing for the check). ``direct``: the
    caller knows the call is direct (its _layout_key was not None, and every tensor of
    ``args`` is one of that key's tensors or made from them here)."""
    if not direct and (not _direct() or not _plain(args)):
        if _MUTATED[name] and torch.is_grad_enabled():
            _no_grad_writes(name, args)
        return getattr(torch.ops.prefixkv, name)(*args)
    result = _IMPL[name](*args)
    mutated = []
    for i in _MUTATED[name]:
        a = args[i]
        mutated.extend(t for t in (a if isinstance(a, (list, tuple)) else [a]) if t is not None)
    if mutated:
        increment_version(mutated)
    return result


# ------------------------------------------------------------------------------ attention ops


def _with_sinks(fn, out: Tensor, lse: Tensor | None, sinks: Tensor | None, run) -> None:
    """``run(lse, **kwargs)`` the backend call, with the sinks handed to ``fn`` when it reads
    them (``fn.reads_sinks``: the Triton kernels), else applied to its finished (out, lse)
    (an lse made for it when the caller keeps none)."""
    if sinks is None:
        run(lse)
        return
    if getattr(fn, "reads_sinks", False):
        run(lse, sinks=sinks)
        return
    lse_buf = lse if lse is not None else out.new_empty(out.shape[:2], dtype=torch.float32)
    run(lse_buf)
    _apply_sinks(out, lse_buf, sinks)


def _fp8_kwargs(fn, k_cache: Tensor, k_scale: Tensor | None, v_scale: Tensor | None) -> dict:
    """The scales as keyword arguments of backend entry ``fn`` when it reads float8_e4m3fn
    caches itself (``fn.reads_fp8``: the Triton kernels, the torch backend's paged and
    shared-prefix attention) and the caches are fp8; else {} (the caller dequantizes the named
    blocks first)."""
    if k_cache.dtype == torch.float8_e4m3fn and getattr(fn, "reads_fp8", False):
        return {"k_scale": k_scale, "v_scale": v_scale}
    return {}


def _attn_buffers(q: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    return out, lse


def _paged_lens(dims, block_tables, kv_lens, cu_q_lens) -> Tensor:
    """paged attention's host value checks when they run (_want_values), else kv_lens clipped
    to the table (_at_most): the kv_lens to use."""
    if _want_values(block_tables, kv_lens, cu_q_lens):
        validate.check_paged_attention_values(dims, block_tables, kv_lens, cu_q_lens)
        return kv_lens
    return _at_most(kv_lens, dims.max_blocks_per_seq * dims.block_size)


def _shared_lens(sdims, prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                 cu_q_lens) -> tuple[Tensor, Tensor]:
    """shared-prefix attention's host value checks when they run, else its lengths clipped
    to the tables: the (prefix_lens, kv_lens) to use."""
    if _want_values(prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                    cu_q_lens):
        validate.check_shared_prefix_attention_values(
            sdims, prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens)
        return prefix_lens, kv_lens
    bs = sdims.attention.block_size
    return (_at_most(prefix_lens, sdims.max_prefix_blocks * bs),
            _at_most(kv_lens, sdims.attention.max_blocks_per_seq * bs))


def _op_scale_values(k_scale, v_scale) -> None:
    """The value checks of an op's 0-d k_scale / v_scale tensors, where they run."""
    if k_scale is None and v_scale is None:
        return
    if _want_values(*(t for t in (k_scale, v_scale) if t is not None)):
        validate.check_kv_scale_values(k_scale, v_scale)


def _paged_layout(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *, sinks=None,
                  **options):
    """paged_attention's checks but the value checks, the wrapper's and the op's: dims."""
    _tensors(q=q, k_cache=k_cache, v_cache=v_cache, sinks=sinks, raw=True)
    _index_tensors(block_tables=block_tables, kv_lens=kv_lens, cu_q_lens=cu_q_lens)
    return _static_check(validate.check_paged_attention, q, k_cache, v_cache, block_tables,
                         kv_lens, cu_q_lens, sinks=sinks, **options)


def _paged_checks(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, *, sinks=None,
                  **options):
    """paged_attention's checks as the op runs them: (dims, the kv_lens to use)."""
    dims = _paged_layout(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, sinks=sinks,
                         **options)
    return dims, _paged_lens(dims, block_tables, kv_lens, cu_q_lens)


def _guard_paged(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale, causal,
                 sliding_window, logits_soft_cap, backend, k_scale=None, v_scale=None,
                 sinks=None) -> tuple:
    """paged_attention's checks as the op runs them (_op's guard)."""
    _, kv_lens = _paged_checks(
        q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, sinks=sinks, scale=scale,
        causal=causal, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        k_scale=k_scale, v_scale=v_scale)
    _on_device(q.device, block_tables=block_tables, kv_lens=kv_lens, cu_q_lens=cu_q_lens,
               k_scale=k_scale, v_scale=v_scale)
    _op_scale_values(k_scale, v_scale)
    return (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale, causal,
            sliding_window, logits_soft_cap, backend, k_scale, v_scale, sinks)


def _guard_buffers(q, out, lse, workspace, k_cache, v_cache, sinks=None, k_scale=None,
                   v_scale=None) -> None:
    """The checks of an attention call's out=, lse= and workspace= buffers: their layouts,
    writable, and sharing no memory with what the call reads (q, the caches, sinks, tensor
    scales) or with each other: a kernel writing one while another of its programs reads it
    gives garbage (an out that is a view of a cache would also overwrite the cache)."""
    _check_out("out", out, q.shape, q.dtype, q.device)
    _check_out("lse", lse, q.shape[:2], torch.float32, q.device)
    _check_workspace(workspace, q)
    for name, buf in (("out", out), ("lse", lse)):
        if buf is not None:
            _writable(name, buf, "buffer")
    bufs = [(n, b) for n, b in (("out", out), ("lse", lse), ("workspace", workspace))
            if b is not None]
    reads = [(n, t) for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                                 ("sinks", sinks), ("k_scale", k_scale), ("v_scale", v_scale))
             if isinstance(t, Tensor)]
    for i, (name, buf) in enumerate(bufs):
        for other, t in (*reads, *bufs[:i]):
            if _share_elements(buf, t):  # exact for q and out carved from one buffer
                raise ValueError(f"{name}: shares memory with {other}; pass a buffer of its "
                                 f"own")


def _guard_paged_out(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale, causal,
                     sliding_window, logits_soft_cap, backend, out, lse, workspace,
                     k_scale=None, v_scale=None, sinks=None) -> tuple:
    """paged_attention_out's checks as the op runs them (_op's guard)."""
    args = _guard_paged(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale, causal,
                        sliding_window, logits_soft_cap, backend, k_scale, v_scale, sinks)
    _guard_buffers(q, out, lse, workspace, k_cache, v_cache, sinks, k_scale, v_scale)
    return (*args[:11], out, lse, workspace, *args[11:])


def _shared_layout(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                   block_tables, kv_lens, cu_q_lens, *, sinks=None, **options):
    """shared_prefix_attention's checks but the value checks, the wrapper's and the op's:
    sdims."""
    _tensors(q=q, k_cache=k_cache, v_cache=v_cache, sinks=sinks, raw=True)
    _index_tensors(prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens,
                   prefix_ids=prefix_ids, block_tables=block_tables, kv_lens=kv_lens,
                   cu_q_lens=cu_q_lens)
    return _static_check(validate.check_shared_prefix_attention, q, k_cache, v_cache,
                         prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                         cu_q_lens, sinks=sinks, **options)


def _shared_checks(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                   block_tables, kv_lens, cu_q_lens, *, sinks=None, **options):
    """shared_prefix_attention's checks as the op runs them: (sdims, the prefix_lens and
    kv_lens to use)."""
    sdims = _shared_layout(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                           block_tables, kv_lens, cu_q_lens, sinks=sinks, **options)
    return (sdims, *_shared_lens(sdims, prefix_block_tables, prefix_lens, prefix_ids,
                                 block_tables, kv_lens, cu_q_lens))


def _guard_shared(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                  block_tables, kv_lens, cu_q_lens, scale, logits_soft_cap, backend,
                  k_scale=None, v_scale=None, sinks=None) -> tuple:
    """shared_prefix_attention's checks as the op runs them (_op's guard)."""
    _, prefix_lens, kv_lens = _shared_checks(
        q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
        kv_lens, cu_q_lens, sinks=sinks, scale=scale, logits_soft_cap=logits_soft_cap,
        k_scale=k_scale, v_scale=v_scale)
    _on_device(q.device, prefix_block_tables=prefix_block_tables, prefix_lens=prefix_lens,
               prefix_ids=prefix_ids, block_tables=block_tables, kv_lens=kv_lens,
               cu_q_lens=cu_q_lens, k_scale=k_scale, v_scale=v_scale)
    _op_scale_values(k_scale, v_scale)
    return (q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
            kv_lens, cu_q_lens, scale, logits_soft_cap, backend, k_scale, v_scale, sinks)


def _guard_shared_out(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                      block_tables, kv_lens, cu_q_lens, scale, logits_soft_cap, backend, out,
                      lse, workspace, k_scale=None, v_scale=None, sinks=None) -> tuple:
    """shared_prefix_attention_out's checks as the op runs them (_op's guard)."""
    args = _guard_shared(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                         block_tables, kv_lens, cu_q_lens, scale, logits_soft_cap, backend,
                         k_scale, v_scale, sinks)
    _guard_buffers(q, out, lse, workspace, k_cache, v_cache, sinks, k_scale, v_scale)
    return (*args[:12], out, lse, workspace, *args[12:])


# The mutated arguments of the *_out ops have no defaults: torch 2.11's ADInplaceOrView kernel
# looks them up by position and raises IndexError when a caller omits one. ``causal`` is
# optional in the schema so that the guard sees a None and refuses it by name: a plain bool
# schema turned None into False, a non-causal call.
@_op("paged_attention_out", mutates_args=("out", "lse", "workspace"), guard=_guard_paged_out)
def _paged_attention_out(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                         kv_lens: Tensor, cu_q_lens: Tensor | None, scale: float,
                         causal: bool | None, sliding_window: int | None,
                         logits_soft_cap: float | None,
                         backend: str | None, out: Tensor, lse: Tensor | None,
                         workspace: Tensor | None, k_scale: Tensor | None = None,
                         v_scale: Tensor | None = None, sinks: Tensor | None = None) -> None:
    fn = select("paged_attention", platform_of(q), backend)
    fp8 = _fp8_kwargs(fn, k_cache, k_scale, v_scale)
    if not fp8 and k_cache.dtype == torch.float8_e4m3fn:
        k_cache, v_cache, block_tables = _dequantized_blocks(q, k_cache, v_cache, k_scale,
                                                             v_scale, block_tables)
    _with_sinks(fn, out, lse, sinks, lambda lse_, **kw: fn(
        out, lse_, q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale=scale,
        causal=causal, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        workspace=workspace, **fp8, **kw))


@_op("paged_attention", guard=_guard_paged)
def _paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                     kv_lens: Tensor, cu_q_lens: Tensor | None, scale: float,
                     causal: bool | None, sliding_window: int | None,
                     logits_soft_cap: float | None,
                     backend: str | None, k_scale: Tensor | None = None,
                     v_scale: Tensor | None = None,
                     sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    out, lse = _attn_buffers(q)
    _IMPL["paged_attention_out"](q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale,
                                 causal, sliding_window, logits_soft_cap, backend, out, lse,
                                 None, k_scale, v_scale, sinks)
    return out, lse


@_fake(_paged_attention, "paged_attention")
def _(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, scale, causal, sliding_window,
      logits_soft_cap, backend, k_scale=None, v_scale=None, sinks=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@_fake(_paged_attention_out, "paged_attention_out")
def _(*args):
    return None


@_op("shared_prefix_attention_out", mutates_args=("out", "lse", "workspace"),
     guard=_guard_shared_out)
def _shared_prefix_attention_out(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                                 prefix_block_tables: Tensor, prefix_lens: Tensor,
                                 prefix_ids: Tensor, block_tables: Tensor, kv_lens: Tensor,
                                 cu_q_lens: Tensor | None, scale: float,
                                 logits_soft_cap: float | None, backend: str | None,
                                 out: Tensor, lse: Tensor | None,
                                 workspace: Tensor | None, k_scale: Tensor | None = None,
                                 v_scale: Tensor | None = None,
                                 sinks: Tensor | None = None) -> None:
    fn = select("shared_prefix_attention", platform_of(q), backend)
    fp8 = _fp8_kwargs(fn, k_cache, k_scale, v_scale)
    if not fp8 and k_cache.dtype == torch.float8_e4m3fn:
        k_cache, v_cache, prefix_block_tables, block_tables = _dequantized_blocks(
            q, k_cache, v_cache, k_scale, v_scale, prefix_block_tables, block_tables)
    _with_sinks(fn, out, lse, sinks, lambda lse_, **kw: fn(
        out, lse_, q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
        block_tables, kv_lens, cu_q_lens, scale=scale, logits_soft_cap=logits_soft_cap,
        workspace=workspace, **fp8, **kw))


@_op("shared_prefix_attention", guard=_guard_shared)
def _shared_prefix_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                             prefix_block_tables: Tensor, prefix_lens: Tensor, prefix_ids: Tensor,
                             block_tables: Tensor, kv_lens: Tensor, cu_q_lens: Tensor | None,
                             scale: float, logits_soft_cap: float | None,
                             backend: str | None, k_scale: Tensor | None = None,
                             v_scale: Tensor | None = None,
                             sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    out, lse = _attn_buffers(q)
    _IMPL["shared_prefix_attention_out"](q, k_cache, v_cache, prefix_block_tables,
                                         prefix_lens, prefix_ids, block_tables, kv_lens,
                                         cu_q_lens, scale, logits_soft_cap, backend, out, lse, None,
                                         k_scale, v_scale, sinks)
    return out, lse


@_fake(_shared_prefix_attention, "shared_prefix_attention")
def _(q, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@_fake(_shared_prefix_attention_out, "shared_prefix_attention_out")
def _(*args):
    return None


def _guard_merge(out_a, lse_a, out_b, lse_b, backend) -> tuple:
    """merge_attention_states' checks, the wrapper's and (as _op's guard) the op's."""
    _tensors(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b, raw=True)
    _static_check(validate.check_merge_attention_states, out_a, lse_a, out_b, lse_b)
    return out_a, lse_a, out_b, lse_b, backend


def _merge_buffers(out_a, out, lse) -> None:
    """The checks of a merge's out= and lse= buffers (None skipped)."""
    _check_out("out", out, out_a.shape, out_a.dtype, out_a.device, owner="out_a")
    _check_out("lse", lse, out_a.shape[:2], torch.float32, out_a.device, owner="out_a")
    for name, buf in (("out", out), ("lse", lse)):
        if buf is not None:
            _writable(name, buf, "buffer")


def _merge_memory(out_a, lse_a, out_b, lse_b, out, lse) -> None:
    """The merge's given out= and lse= buffers (None skipped) writable here and sharing no
    memory with the inputs or each other (not while torch.compile traces: the op checks the
    tensors it runs on, traced ones have no memory)."""
    if traced(out_a, lse_a, out_b, lse_b, out, lse):
        return
    _not_inference(**{n: b for n, b in (("out", out), ("lse", lse)) if b is not None})
    for name, buf in (("out", out), ("lse", lse)):
        if buf is None:
            continue
        for other, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b),
                         ("lse_b", lse_b),
                         *((("out", out),) if name == "lse" and out is not None else ())):
            if _overlaps(buf, t):
                raise ValueError(f"{name}: shares memory with {other}; pass a buffer of its "
                                 f"own")


def _guard_merge_out(out_a, lse_a, out_b, lse_b, out, lse, backend) -> tuple:
    """merge_attention_states_out's checks as the op runs them (_op's guard)."""
    _guard_merge(out_a, lse_a, out_b, lse_b, backend)
    _merge_buffers(out_a, out, lse)
    _merge_memory(out_a, lse_a, out_b, lse_b, out, lse)
    return out_a, lse_a, out_b, lse_b, out, lse, backend


@_op("merge_attention_states", guard=_guard_merge)
def _merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
                            backend: str | None) -> tuple[Tensor, Tensor]:
    out, lse = _attn_buffers(out_a)
    fn = select("merge_attention_states", platform_of(out_a), backend)
    fn(out, lse, out_a, lse_a, out_b, lse_b)
    return out, lse


@_fake(_merge_attention_states, "merge_attention_states")
def _(out_a, lse_a, out_b, lse_b, backend):
    return out_a.new_empty(out_a.shape), out_a.new_empty(out_a.shape[:2], dtype=torch.float32)


@_op("merge_attention_states_out", mutates_args=("out", "lse"), guard=_guard_merge_out)
def _merge_attention_states_out(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
                                out: Tensor, lse: Tensor, backend: str | None) -> None:
    # checked by the guard, or by the wrapper that calls this directly (_invoke)
    select("merge_attention_states", platform_of(out_a), backend)(out, lse, out_a, lse_a,
                                                                   out_b, lse_b)


@_fake(_merge_attention_states_out, "merge_attention_states_out")
def _(*args):
    return None


def paged_attention(q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens=None, *, scale=None,
                    causal=True, sliding_window=None, logits_soft_cap=None, return_lse=False,
                    sinks=None, k_scale=None, v_scale=None, out=None, lse=None, workspace=None,
                    backend=None):
    """Ragged paged attention over cached prefixes (decode, prefill and mixed batches).

    q: [num_tokens, num_q_heads, head_dim] float32|float16|bfloat16.
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype (views of a
    stacked cache are fine), or float8_e4m3fn read as float32(cache) * k_scale (v_scale):
    k_scale, v_scale None (1.0), a positive float or a float32 tensor of one element (fp8
    caches only; see docs/ops.md: the triton backend's kernel and the CPU decode kernel, also
    for the decodes of a mixed batch, read the fp8 bytes and the scales themselves; elsewhere
    the blocks the tables name are dequantized into q's dtype first).
    block_tables: i32[num_seqs, max_blocks_per_seq]. kv_lens: i32[num_seqs], cached prefix +
    this step's tokens. cu_q_lens: i32[num_seqs + 1] or
    None (decode). sinks: optional float[num_q_heads] on q's device, attention sinks (gpt-oss,
    vLLM's ``sinks``): one logit per q head added to the softmax denominator (read by the
    triton kernels, applied to the result by the other backends; see docs/ops.md). out:
    optional [num_tokens, num_q_heads, head_dim] buffer written in place; lse: optional
    f32[num_tokens, num_q_heads] buffer. workspace: optional uint8 buffer of
    :func:`attention_workspace_size` bytes for the temporaries (with out= it makes the triton
    backend allocate nothing). backend: "triton", "torch" or None.

    Returns out (q's dtype), and lse f32[num_tokens, num_q_heads] with ``return_lse``.
    Semantics: docs/ops.md and :func:`prefixkv.paged.reference.paged_attention_reference`.
    """
    layout = _layout_key(
        "paged_attention",
        (q, k_cache, v_cache, sinks, out, lse, workspace, *_scale_tensors(k_scale, v_scale)),
        (block_tables, kv_lens, cu_q_lens),
        (scale, causal, sliding_window, logits_soft_cap, return_lse,
         *_scale_floats(k_scale, v_scale)))
    dims = _attention_dims(layout, lambda: _paged_layout(
        q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, sinks=sinks, scale=scale,
        causal=causal, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap,
        return_lse=return_lse, k_scale=k_scale, v_scale=v_scale),
        q, out, lse, workspace, k_cache, v_cache, sinks, k_scale, v_scale)
    kv_lens = _paged_lens(dims, block_tables, kv_lens, cu_q_lens)
    block_tables, kv_lens, cu_q_lens = _on(q.device, block_tables, kv_lens, cu_q_lens)
    args = (q, k_cache, v_cache, block_tables, kv_lens, cu_q_lens, dims.scale, bool(causal),
            None if sliding_window is None else int(sliding_window),
            None if logits_soft_cap is None else float(logits_soft_cap), backend)
    return _run_attention("paged_attention", args, q, out, lse, workspace, return_lse, sinks,
                          _op_scales(k_scale, v_scale, k_cache, v_cache),
                          direct=layout is not None)


def _attention_dims(layout: tuple | None, check, q, out, lse, workspace, *reads):
    """The layout checks' answer for an attention call with _layout_key ``layout``: kept, or
    ``check()`` and the out=/lse=/workspace= checks (_guard_buffers, with ``reads``) run now
    (and the answer kept)."""
    dims = _vouched(layout)
    if dims is None:
        dims = check()
        _guard_buffers(q, out, lse, workspace, *reads)
        _vouch(layout, dims)
    return dims


def _op_scales(k_scale, v_scale, k_cache: Tensor, v_cache: Tensor) -> tuple:
    """The trailing (k_scale, v_scale) arguments of an attention op over float8_e4m3fn caches
    (0-d float32 tensors on the caches' device, or None): the op hands the fp8 caches and
    these to a backend that reads fp8 (Triton), or dequantizes the named blocks for the
    others. () for other caches: their calls stay as they were."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return ()
    return _kv_scales(k_scale, v_scale, k_cache, v_cache)


def _run_attention(op, args, q, out, lse, workspace, return_lse, sinks, scales=(),
                   direct=False):
    """The attention op ``op`` (or its ``_out`` form, with caller buffers, which the caller has
    checked with its layout checks: _guard_buffers) on ``args``. ``direct``: as in
    :func:`_invoke`."""
    if sinks is not None:  # the op's trailing (k_scale, v_scale, sinks)
        scales = (*(scales or (None, None)), sinks.detach())  # the ops are forward-only
    if out is None and lse is None and workspace is None:
        o, l_ = _invoke(op, (*args, *scales), direct)
    else:
        o = out if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
        l_ = lse  # None and not returned: the backend keeps it in the workspace
        if l_ is None and return_lse:
            l_ = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        if (not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
                and any(b is not None and b.is_inference() for b in (o, l_, workspace))):
            # buffers made under inference_mode, used outside it (tests/test_sinks.py): all
            # their writes inside it (a strided out had been written, then torch raised)
            with torch.inference_mode():
                _invoke(f"{op}_out", (*args, o, l_, workspace, *scales), direct)
        else:
            _invoke(f"{op}_out", (*args, o, l_, workspace, *scales), direct)
    return (o, l_) if return_lse else o


def shared_prefix_attention(q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids,
                            block_tables, kv_lens, cu_q_lens=None, *, scale=None,
                            logits_soft_cap=None, return_lse=False, sinks=None,
                            sliding_window=None, k_scale=None, v_scale=None, out=None, lse=None,
                            workspace=None, backend=None):
    """Causal attention of sequences sharing cached prefixes, each prefix's KV read once for
    all its sequences (on a GPU; on the CPU only for prefix groups large enough to pay for a
    pass of their own, see docs/ops.md: smaller ones read it through each sequence's table).

    prefix_block_tables: i32[num_prefixes, max_prefix_blocks]; prefix_lens: i32[num_prefixes]
    (multiples of block_size); prefix_ids: i32[num_seqs], a prefix row or -1. block_tables,
    kv_lens, cu_q_lens: each sequence's own tokens after its prefix (as in paged_attention).
    Equals paged_attention over the concatenation (prefix blocks, then own blocks).
    sinks, out, lse, workspace: as in :func:`paged_attention` (each row's sink counted once).
    sliding_window: as in :func:`paged_attention`, counted over prefix then own tokens; with a
    window the call runs as paged_attention over each sequence's prefix then own blocks (each
    query sees its own part of the prefix: nothing to share). k_scale, v_scale: as in
    :func:`paged_attention` (float8_e4m3fn caches).
    """
    layout = _layout_key(
        "shared_prefix_attention",
        (q, k_cache, v_cache, sinks, out, lse, workspace, *_scale_tensors(k_scale, v_scale)),
        (prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens),
        (scale, logits_soft_cap, return_lse, sliding_window, *_scale_floats(k_scale, v_scale)))
    sdims = _attention_dims(layout, lambda: _shared_layout(
        q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
        kv_lens, cu_q_lens, sinks=sinks, scale=scale, logits_soft_cap=logits_soft_cap,
        return_lse=return_lse, sliding_window=sliding_window, k_scale=k_scale,
        v_scale=v_scale), q, out, lse, workspace, k_cache, v_cache, sinks, k_scale, v_scale)
    prefix_lens, kv_lens = _shared_lens(sdims, prefix_block_tables, prefix_lens, prefix_ids,
                                        block_tables, kv_lens, cu_q_lens)
    prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens = _on(
        q.device, prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens, cu_q_lens)
    scales = _op_scales(k_scale, v_scale, k_cache, v_cache)
    soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
    if sliding_window is not None:  # checked above: paged attention over the joined tables
        tables, lens = _prefix_then_own_tables(prefix_block_tables, prefix_lens, prefix_ids,
                                               block_tables, kv_lens,
                                               sdims.attention.block_size)
        args = (q, k_cache, v_cache, tables, lens, cu_q_lens, sdims.attention.scale, True,
                int(sliding_window), soft_cap, backend)
        return _run_attention("paged_attention", args, q, out, lse, workspace, return_lse,
                              sinks, scales, direct=layout is not None)
    args = (q, k_cache, v_cache, prefix_block_tables, prefix_lens, prefix_ids, block_tables,
            kv_lens, cu_q_lens, sdims.attention.scale, soft_cap, backend)
    return _run_attention("shared_prefix_attention", args, q, out, lse, workspace, return_lse,
                          sinks, scales, direct=layout is not None)


def _prefix_then_own_tables(prefix_block_tables, prefix_lens, prefix_ids, block_tables, kv_lens,
                            block_size: int) -> tuple[Tensor, Tensor]:
    """The cascade's batch as plain paged attention, on the index tensors' device with no host
    sync: each sequence's table is its prefix's blocks then its own (prefix lengths are whole
    blocks), its kv_len grown by the prefix. Entries past a row's blocks hold other entries of
    the given tables (never read)."""
    num_prefixes, width = prefix_block_tables.shape
    num_seqs, own_width = block_tables.shape
    pid = prefix_ids.long()
    has = (pid >= 0) & (pid < num_prefixes)
    p = pid.clamp(0, max(num_prefixes - 1, 0))
    plen = (torch.where(has, prefix_lens.long()[p], 0) if num_prefixes
            else torch.zeros_like(pid))
    plen = plen.clamp(0, width * block_size)  # what the value checks allow (unchecked: any)
    pblocks = plen // block_size
    cols = torch.arange(width + own_width, device=block_tables.device)
    own = (block_tables.long().gather(
        1, (cols[None, :] - pblocks[:, None]).clamp(0, max(own_width - 1, 0)))
        if own_width else torch.zeros((num_seqs, cols.numel()), dtype=torch.long,
                                      device=block_tables.device))
    pre = (prefix_block_tables.long()[p][:, cols.clamp(max=width - 1)] if num_prefixes and width
           else own)
    tables = torch.where(cols[None, :] < pblocks[:, None], pre, own)
    # in int32 (unchecked lengths near its limits must not wrap to ~2**31 keys)
    kv = (kv_lens.long().clamp(min=0) + plen).clamp(max=2**31 - 1)
    return tables.to(torch.int32), kv.to(torch.int32)


def _apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> None:
    """The attention sinks' share of the softmax, in place on a finished (out, lse): with
    lse' = log(e^lse + e^sink), out becomes out e^(lse - lse') (computed in float32: one more
    rounding of a bf16/f16 out) and lse becomes lse'. A row with lse -inf (no key) stays 0
    and gets lse' = sink."""
    if (not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            and (out.is_inference() or lse.is_inference())):
        with torch.inference_mode():  # buffers made under inference_mode, used outside it
            return _apply_sinks(out, lse, sinks)
    sink = sinks.detach().to(torch.float32)[None, :]  # the ops are forward-only
    new_lse = torch.logaddexp(lse, sink)
    weight = torch.where(lse == float("-inf"), 0.0, torch.exp(lse - new_lse))
    out.mul_(weight.unsqueeze(-1))
    lse.copy_(new_lse)


def attention_workspace_size(q, k_cache, block_tables, cu_q_lens=None, *,
                             prefix_block_tables=None, backend=None) -> int:
    """Bytes of the ``workspace=`` with which paged_attention (or shared_prefix_attention, when
    ``prefix_block_tables`` is given) on these shapes allocates nothing: 0 for a backend that
    uses none (the CPU path). From shapes and the device only: tensors on the "meta" device
    size for the current CUDA device. The size serves this batch and every smaller one with
    the same heads and block-table width (a smaller decode batch splits long contexts more),
    so size it once for the largest batch (e.g. the largest CUDA-graph batch size) and reuse it
    across layers and steps. With ``prefix_block_tables`` it also covers the calls with a
    sliding window (paged attention over prefix-then-own tables). Shapes and dtypes the call
    refuses are refused here, with its errors.
    """
    op = "paged_attention" if prefix_block_tables is None else "shared_prefix_attention"
    # the call's static checks (shapes, dtypes), with kv_lens and prefix metadata of the shapes
    # the call takes: a size for a call that cannot run would be no answer
    for name, t in (("q", q), ("k_cache", k_cache), ("block_tables", block_tables),
                    ("cu_q_lens", cu_q_lens), ("prefix_block_tables", prefix_block_tables)):
        if name in ("q", "k_cache") or t is not None:  # meta tensors too: shapes only
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            _dense(name, t)
    lens = torch.empty(validate.check_index("block_tables", block_tables, ndim=2)[:1],
                       dtype=torch.int32, device="meta")
    if prefix_block_tables is None:
        _static_check(validate.check_paged_attention, q, k_cache, k_cache, block_tables, lens,
                      cu_q_lens)
    else:
        prefixes = validate.check_index("prefix_block_tables", prefix_block_tables, ndim=2)
        _static_check(validate.check_shared_prefix_attention, q, k_cache, k_cache,
                      prefix_block_tables,
                      torch.empty(prefixes[:1], dtype=torch.int32, device="meta"), lens,
                      block_tables, lens, cu_q_lens)
    platform = platform_of(q)
    fn = select(op, "cuda" if platform == "meta" else platform, backend)
    module = sys.modules[fn.__module__]
    size = getattr(module, f"{op}_workspace_bytes", None)
    if size is None:
        return 0
    if prefix_block_tables is None:
        return int(size(q, k_cache, block_tables, cu_q_lens))
    shared = int(size(q, k_cache, prefix_block_tables, block_tables, cu_q_lens))
    paged = getattr(module, "paged_attention_workspace_bytes", None)
    if paged is None:
        return shared
    # a call with sliding_window runs paged_attention over prefix-then-own tables
    wide = torch.empty((block_tables.shape[0], prefix_block_tables.shape[1]
                        + block_tables.shape[1]), dtype=torch.int32, device="meta")
    return max(shared, int(paged(q, k_cache, wide, cu_q_lens)))


def merge_attention_states(out_a, lse_a, out_b, lse_b, *, out=None, lse=None, backend=None):
    """Log-sum-exp merge of two partial attentions over disjoint key sets.

    out_a, out_b: [num_tokens, num_heads, head_dim] float; lse_a, lse_b: f32[num_tokens,
    num_heads] (natural log). Returns (out in out_a's dtype, lse f32). Two empty states (lse
    -inf) merge to out 0, lse -inf. out, lse: optional buffers of those shapes and dtypes on
    out_a's device, written in place and returned (vLLM's ``merge_attn_states(output, ...,
    output_lse)``), sharing no memory with the inputs or each other; with both given nothing
    is allocated (out alone: lse is made).
    """
    layout = _layout_key("merge_attention_states", (out_a, lse_a, out_b, lse_b, out, lse))
    if _vouched(layout) is None:
        _guard_merge(out_a, lse_a, out_b, lse_b, backend)
        _merge_buffers(out_a, out, lse)  # a buffer made here needs no check
        _merge_memory(out_a, lse_a, out_b, lse_b, out, lse)
        _vouch(layout, True)
    if out is None and lse is None:
        return _invoke("merge_attention_states", (out_a, lse_a, out_b, lse_b, backend),
                       layout is not None)
    if out is None:
        out = torch.empty_like(out_a, memory_format=torch.contiguous_format)
    if lse is None:
        lse = torch.empty(out_a.shape[:2], dtype=torch.float32, device=out_a.device)
    _invoke("merge_attention_states_out", (out_a, lse_a, out_b, lse_b, out, lse, backend),
            layout is not None)
    return out, lse


# ---------------------------------------------------------------------------------- cache ops


def _block_contiguous(caches) -> bool:
    """Each cache's blocks contiguous, their bytes their values: the Triton and CUDA C block
    copies move raw bytes, so a conjugate or negative-bit view takes the torch backend (which
    resolves the bit) as a strided one does."""
    return all(c.shape[0] == 0 or (c[0].is_contiguous() and not (c.is_conj() or c.is_neg()))
               for c in caches)


def _write_kv_layout(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    """write_kv's checks but the value checks, the wrapper's (once per _layout_key) and the
    op's."""
    _tensors(key=key, value=value, k_cache=k_cache, v_cache=v_cache, raw=True)
    _index_tensors(slot_mapping=slot_mapping)
    _static_check(validate.check_write_kv, key, value, k_cache, v_cache, slot_mapping,
                  k_scale=k_scale, v_scale=v_scale)
    _writable("k_cache", k_cache)
    _writable("v_cache", v_cache)
    if traced(key, value, k_cache, v_cache):
        return  # the op checks the memory when it runs: traced tensors have none
    _not_inference(k_cache=k_cache, v_cache=v_cache)
    for name, rows in (("key", key), ("value", value)):
        for cname, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if _overlaps(rows, cache):  # written while read: K then V would see the change
                raise ValueError(f"{name}: shares memory with {cname}; pass a copy")
    if _share_elements(k_cache, v_cache):  # the values would overwrite the keys
        raise ValueError("v_cache: shares memory with k_cache; the keys and the values each "
                         "need a cache of their own")


def _write_kv_checks(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                     layout: tuple | None = None) -> None:
    """write_kv's layout checks (once per _layout_key ``layout``, every call for None), then
    its host value checks of slot_mapping."""
    if _vouched(layout) is None:
        _write_kv_layout(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        _vouch(layout, True)
    if _want_values(slot_mapping):
        validate.check_write_kv_values(k_cache, slot_mapping)


def _guard_write_kv(key, value, k_cache, v_cache, slot_mapping, backend, k_scale=None,
                    v_scale=None) -> tuple:
    """write_kv's checks as the op runs them (_op's guard)."""
    _write_kv_checks(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    _on_device(k_cache.device, slot_mapping=slot_mapping, k_scale=k_scale, v_scale=v_scale)
    _op_scale_values(k_scale, v_scale)
    return key, value, k_cache, v_cache, slot_mapping, backend, k_scale, v_scale


@_op("write_kv", mutates_args=("k_cache", "v_cache"), guard=_guard_write_kv)
def _write_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor,
              slot_mapping: Tensor, backend: str | None, k_scale: Tensor | None = None,
              v_scale: Tensor | None = None) -> None:
    # checked by the guard, or by the wrapper that calls this directly (_invoke)
    if validate.is_fp8(k_cache):  # every backend quantizes (bit-exact, docs/ops.md)
        select("write_kv", platform_of(k_cache), backend)(
            key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
        return
    select("write_kv", platform_of(k_cache), backend)(key, value, k_cache, v_cache, slot_mapping)


@_fake(_write_kv, "write_kv")
def _(*args):
    return None


def _copy_checks(caches, src, dst) -> tuple[int, bool]:
    """copy_blocks' checks, the wrapper's and the op's: (num_blocks, whether the ids were
    value-checked)."""
    _tensors(caches=caches)
    _index_tensors(src=src, dst=dst)
    num_blocks = validate.check_copy_blocks(caches, src, dst)
    _writable("caches", caches)
    checked = _want_values(src, dst)
    if checked:
        validate.check_copy_blocks_values(num_blocks, src, dst)
    return num_blocks, checked


def _guard_copy(caches, src, dst, backend, resolved=False) -> tuple:
    """copy_blocks' checks as the op runs them (_op's guard)."""
    _copy_checks(caches, src, dst)
    _on_device(caches[0].device, src=src, dst=dst)
    return caches, src, dst, backend, resolved


@_op("copy_blocks", mutates_args=("caches",), guard=_guard_copy)
def _copy_blocks(caches: list[Tensor], src: Tensor, dst: Tensor, backend: str | None,
                 resolved: bool = False) -> None:
    _not_inference(caches=caches)
    # ``resolved``: the eager wrapper dropped repeated caches and settled whether the caches'
    # memory chains (it saw real tensors). Else (traced by torch.compile, which gives them no
    # memory, or torch.ops.prefixkv.copy_blocks called directly) it is settled here, on the
    # tensors the op runs on: views of one memory copied one after another chain.
    if not resolved:
        caches = _distinct(caches)
        if _chains(caches):
            for name, ids in (("src", src), ("dst", dst)):  # named, before any read or write
                _host_ids(name, ids, caches[0].shape[0])
            staged = [_IMPL["gather_blocks"]([c], src, backend) for c in caches]
            for c, blocks in zip(caches, staged, strict=True):
                _IMPL["scatter_blocks"]([c], blocks, dst, backend)
            return
    select("copy_blocks", platform_of(*caches), backend,
           block_contiguous=_block_contiguous(caches))(caches, src, dst)


@_fake(_copy_blocks, "copy_blocks")
def _(*args):
    return None


def _gather_checks(caches, block_ids, out=None) -> None:
    """gather_blocks' checks (with its ``out=`` unless None), the wrapper's and the op's."""
    _tensors(caches=caches)
    _index_tensors(block_ids=block_ids)
    validate.check_gather_blocks(caches, block_ids)
    if out is not None:
        _gather_out(out, caches, block_ids)
    if _want_values(block_ids):
        validate.check_block_ids_values(int(caches[0].shape[0]), block_ids, distinct=False)


def _guard_gather(caches, block_ids, backend) -> tuple:
    """gather_blocks' checks as the op runs them (_op's guard)."""
    _gather_checks(caches, block_ids)
    _on_device(caches[0].device, block_ids=block_ids)
    return caches, block_ids, backend


def _guard_gather_into(out, caches, block_ids, backend) -> tuple:
    """gather_blocks_into's checks as the op runs them (_op's guard)."""
    _gather_checks(caches, block_ids, out)
    _on_device(caches[0].device, block_ids=block_ids)
    return out, caches, block_ids, backend


@_op("gather_blocks", guard=_guard_gather)
def _gather_blocks(caches: list[Tensor], block_ids: Tensor, backend: str | None) -> Tensor:
    c0 = caches[0]
    buffer = torch.empty((block_ids.shape[0], len(caches), *c0.shape[1:]), dtype=c0.dtype,
                         device=c0.device)
    select("gather_blocks", platform_of(*caches), backend,
           block_contiguous=_block_contiguous(caches))(buffer, caches, block_ids)
    return buffer


@_fake(_gather_blocks, "gather_blocks")
def _(caches, block_ids, backend):
    c0 = caches[0]
    return c0.new_empty((block_ids.shape[0], len(caches), *c0.shape[1:]))


@_op("gather_blocks_into", mutates_args=("out",), guard=_guard_gather_into)
def _gather_blocks_into(out: Tensor, caches: list[Tensor], block_ids: Tensor,
                        backend: str | None) -> None:
    _not_inference(out=out)
    # Here, not in the wrapper: under torch.compile only the op sees the memory it runs on
    for i, c in enumerate(caches):
        if _overlaps(out, c):  # written while read
            raise ValueError(f"out: shares memory with caches[{i}]; pass a buffer of its own")
    select("gather_blocks", platform_of(*caches), backend,
           block_contiguous=_block_contiguous(caches))(out, caches, block_ids)


@_fake(_gather_blocks_into, "gather_blocks_into")
def _(*args):
    return None


def _scatter_checks(caches, buffer, block_ids) -> None:
    """scatter_blocks' checks, the wrapper's and the op's."""
    _tensors(caches=caches)
    _index_tensors(buffer=buffer, block_ids=block_ids)
    validate.check_scatter_blocks(caches, buffer, block_ids)
    _writable("caches", caches)
    if _want_values(block_ids):
        validate.check_block_ids_values(int(caches[0].shape[0]), block_ids, distinct=True)


def _guard_scatter(caches, buffer, block_ids, backend) -> tuple:
    """scatter_blocks' checks as the op runs them (_op's guard)."""
    _scatter_checks(caches, buffer, block_ids)
    _on_device(caches[0].device, buffer=buffer, block_ids=block_ids)
    return caches, buffer, block_ids, backend


@_op("scatter_blocks", mutates_args=("caches",), guard=_guard_scatter)
def _scatter_blocks(caches: list[Tensor], buffer: Tensor, block_ids: Tensor,
                    backend: str | None) -> None:
    _not_inference(caches=caches)
    # Here, not in the wrapper: under torch.compile only the op sees the memory it runs on.
    # By address (_overlaps): a storage key each cost ~0.5 us (64 caches: 30 us)
    for i, c in enumerate(caches):
        if _blocks_overlap(buffer, c):  # read while written
            raise ValueError(f"buffer: shares memory with caches[{i}]; pass a copy")
    select("scatter_blocks", platform_of(*caches), backend,
           block_contiguous=_block_contiguous(caches))(caches, buffer, block_ids)


@_fake(_scatter_blocks, "scatter_blocks")
def _(*args):
    return None


def _swap_memory_checks(src_caches, dst_caches) -> None:
    """A ValueError naming the caches when a destination shares memory with a source (the
    copies of one call run in no order) or with another destination (the last writer would
    win; a pair listed again is copied twice, the same bytes). By address, not storage (two
    storages may hold one memory), and pairs compared only where their byte spans meet:
    every layer's K and V both ways made ~1,500 pair checks, ~1 ms of host time a call (64
    caches). Run by the op, on the tensors it runs on (under torch.compile the wrapper sees
    fake tensors, which have no memory)."""
    clashes = [(j, i) for i, j in _meeting_pairs(src_caches, dst_caches)
               if _blocks_overlap(src_caches[i], dst_caches[j])]
    if clashes:
        j, i = min(clashes)
        raise ValueError(f"dst_caches[{j}]: shares memory with src_caches[{i}]; copy_blocks "
                         f"copies blocks within the same caches (all reads before any write)")
    once = sorted({(id(dst), id(src)): j for j, (src, dst) in reversed(list(enumerate(
        zip(src_caches, dst_caches, strict=True))))}.values())
    if _any_blocks_overlap([dst_caches[j] for j in once]):
        j, i = min((j, i) for x, i in enumerate(once) for j in once[x + 1:]
                   if _blocks_overlap(dst_caches[i], dst_caches[j]))
        raise ValueError(f"dst_caches[{j}]: shares memory with dst_caches[{i}]; each "
                         f"destination cache once")


def _guard_swap(src_caches, dst_caches, src_ids, dst_ids, backend) -> tuple:
    """swap_blocks' checks, the wrapper's and (as _op's guard) the op's: ids on either
    device."""
    _index_tensors(src_ids=src_ids, dst_ids=dst_ids)
    _tensors(src_caches=src_caches, dst_caches=dst_caches, same_device=False)
    validate.check_swap_blocks(src_caches, dst_caches, src_ids, dst_ids)
    if _want_values(src_ids, dst_ids):
        validate.check_swap_blocks_values(src_caches, dst_caches, src_ids, dst_ids)
    _writable("dst_caches", dst_caches)
    return src_caches, dst_caches, src_ids, dst_ids, backend


@_op("swap_blocks", mutates_args=("dst_caches",), guard=_guard_swap)
def _swap_blocks(src_caches: list[Tensor], dst_caches: list[Tensor], src_ids: Tensor,
                 dst_ids: Tensor, backend: str | None) -> None:
    _not_inference(dst_caches=dst_caches)
    _swap_memory_checks(src_caches, dst_caches)
    caches = (*src_caches, *dst_caches)
    platform = platform_of(*caches)  # once: ~80 us over 128 caches
    host = [c for c in caches if c.device.type == "cpu"]
    pinned = all(c.is_pinned() for c in host) if platform == "cuda" else True
    devices = {c.device.index for c in caches if c.device.type == "cuda"}
    fn = select("swap_blocks", platform, backend, pinned_host=pinned,
                block_contiguous=_block_contiguous(caches), one_gpu=len(devices) <= 1)
    fn(src_caches, dst_caches, src_ids, dst_ids)


@_swap_blocks.register_fake
def _(*args):
    """Devices may mix (device and host caches), but not the meta device with real ones:
    called directly with one tensor there, the op came here and copied nothing."""
    tensors = list(_labelled("swap_blocks", *args))
    if any(t.device.type != "meta" for _, t in tensors):
        for label, t in tensors:
            _has_data(label, t)
    return None


def write_kv(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None,
             backend=None) -> None:
    """Write this step's keys/values into the cache in place.

    key, value: [num_tokens, num_kv_heads, head_dim], the cache's dtype (rows past
    len(slot_mapping) are ignored), or any float dtype (both the same) for float8_e4m3fn
    caches. k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    slot_mapping: i32[n] or i64[n] (vLLM's dtype), slot = block * block_size + offset,
    negative = skip.
    k_scale, v_scale: float8_e4m3fn caches only; None (1.0), a positive float or a float32
    tensor of one element: the cache stores fp8(sat(x / scale)) in float32 (docs/ops.md;
    bit-exact with :func:`prefixkv.paged.reference.quantize_fp8_reference` on the torch and
    triton backends).
    """
    layout = _layout_key("write_kv", (key, value, k_cache, v_cache),
                         (slot_mapping, *_scale_tensors(k_scale, v_scale)),
                         _scale_floats(k_scale, v_scale))
    _write_kv_checks(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale, layout)
    (slot_mapping,) = _on(k_cache.device, slot_mapping)
    direct = layout is not None
    if validate.is_fp8(k_cache):
        _invoke("write_kv", (key, value, k_cache, v_cache, slot_mapping, backend,
                             *_kv_scales(k_scale, v_scale, k_cache, v_cache)), direct)
        return
    _invoke("write_kv", (key, value, k_cache, v_cache, slot_mapping, backend), direct)


def copy_blocks(caches, src, dst, *, backend=None) -> None:
    """Copy block src[i] to dst[i] in every cache, in place (all reads before any write).

    caches: sequence of tensors with the block axis first. src, dst: i32[n] or i64[n] (the
    columns of vLLM's [n, 2] block_mapping as they are); dst distinct.
    """
    num_blocks, checked = _copy_checks(caches, src, dst)
    caches = _distinct(caches)
    if traced(*caches):  # no memory to compare: the op settles it (_copy_blocks)
        src, dst = _on(caches[0].device, src, dst)
        _invoke("copy_blocks", (caches, src, dst, backend, False))
        return
    if _chains(caches):
        # other views of one memory (another dtype or block shape, a part of a cache): each
        # copied by itself, the later ones would read blocks the earlier ones wrote. All
        # sources are read first, then written (the ids named here when they are on the host)
        if not checked and src.device.type == "cpu" and dst.device.type == "cpu":
            validate.check_copy_blocks_values(num_blocks, src, dst)
        src, dst = _on(caches[0].device, src, dst)
        staged = [_invoke("gather_blocks", ([c], src, backend)) for c in caches]
        for c, blocks in zip(caches, staged, strict=True):
            _invoke("scatter_blocks", ([c], blocks, dst, backend))
        return
    src, dst = _on(caches[0].device, src, dst)
    _invoke("copy_blocks", (caches, src, dst, backend, True))


def _chains(caches) -> bool:
    """Whether copying ``caches`` (distinct) one after another can chain: two of them views of
    one memory whose blocks meet. Whatever the ids: two views shifted by a block (base[0:7],
    base[1:8]) chain with no id both a source and a destination (B's source block 1 is A's
    destination block 2). Real tensors only (eager, or inside the op): fake ones have no
    memory (_any_blocks_overlap is False)."""
    return len(caches) > 1 and _any_blocks_overlap(caches)


def _any_blocks_overlap(caches) -> bool:
    """Whether blocks of two of ``caches`` share bytes (never while compiling: fake tensors
    have no memory). Caches of one device, by address, linear after a sort for the layouts
    engines use: caches whose whole byte spans are disjoint (layer-major buffers) pass at
    once, as do caches of one block-major buffer that each hold one part of every block row (a
    [num_blocks, layers, 2, ...] buffer); any other cluster of spans that meet is checked
    pair by pair (_blocks_overlap). 64 caches in one buffer: 0.1-0.3 ms, where all pairs
    took 13-67 ms; a tensor each: ~25 us."""
    if traced(*caches):
        return False
    devices: dict = {}
    for c in caches:
        devices.setdefault(c.device, []).append(c)
    return any(len(g) > 1 and _spans_meet(g) for g in devices.values())


def _spans_meet(caches) -> bool:
    """_any_blocks_overlap over caches of one device."""
    spans = sorted((*_span(c), i) for i, c in enumerate(caches) if c.numel())
    cluster: list = []
    end = 0
    for item in spans + [None]:
        if cluster and item is not None and item[0] < end:  # meets the cluster's spans
            cluster.append(item)
            end = max(end, item[1])
            continue
        if len(cluster) > 1 and _cluster_overlaps([caches[x[2]] for x in cluster]):
            return True
        cluster, end = ([item], item[1]) if item is not None else ([], 0)
    return False


def _cluster_overlaps(cluster) -> bool:
    """Whether blocks of two caches of ``cluster`` (whose spans meet) share bytes: no when
    each is block-major with one block stride and block count and their first blocks tile
    one block row without meeting (so every row's do), else pair by pair."""
    parts = [_block_spans(c) for c in cluster]
    if all(p is not None for p in parts) and len({(p[1], p[3]) for p in parts}) == 1:
        step = parts[0][1]
        first = sorted((c.data_ptr(), p[2]) for c, p in zip(cluster, parts, strict=True))
        if (all(a + n <= b for (a, n), (b, _) in zip(first, first[1:], strict=False))
                and first[-1][0] + first[-1][1] <= first[0][0] + step):
            return False
    return any(_blocks_overlap(a, b) for i, a in enumerate(cluster) for b in cluster[i + 1:])


def gather_blocks(caches, block_ids, *, out=None, backend=None):
    """Blocks into one contiguous buffer [n, len(caches), *block_shape], buffer[i, c] =
    caches[c][block_ids[i]]; block_ids i32[n] or i64[n].

    out: None (a new buffer), or the caller's contiguous tensor of that shape, the caches'
    dtype and device, sharing no memory with them, written and returned: a staging buffer
    reused call after call (no allocation; a new host buffer's first write faults its pages
    in, which cost more than the copy: bench/bench_torch_copy.py), and a fixed address for a
    captured CUDA graph.
    """
    _gather_checks(caches, block_ids, out)
    (block_ids,) = _on(caches[0].device, block_ids)
    if out is None:
        return _invoke("gather_blocks", (list(caches), block_ids, backend))
    _invoke("gather_blocks_into", (out, list(caches), block_ids, backend))
    return out


def _gather_out(out, caches, block_ids) -> None:
    """gather_blocks' out=: an error naming it unless it can take the gathered blocks."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    _dense("out", out)
    _no_neg_bits(out=out)
    c0 = caches[0]
    shape = (block_ids.shape[0], len(caches), *c0.shape[1:])
    if tuple(out.shape) != shape:
        raise ValueError(f"out: expected shape {shape}, got {tuple(out.shape)}")
    if out.dtype != c0.dtype:
        raise TypeError(f"out: expected {dtype_name(c0.dtype)} (the caches' dtype), got "
                        f"{dtype_name(out)}")
    if out.device != c0.device:
        raise ValueError(f"out: expected it on the caches' device {c0.device}, got "
                         f"{out.device}")
    if not out.is_contiguous():
        raise ValueError("out: expected a contiguous tensor")
    _writable("out", out, "buffer")


def scatter_blocks(caches, buffer, block_ids, *, backend=None) -> None:
    """caches[c][block_ids[i]] = buffer[i, c] in place (block_ids i32[n] or i64[n],
    distinct). buffer shares no memory with a cache (a view of one is refused: pass a copy)."""
    _scatter_checks(caches, buffer, block_ids)
    buffer, block_ids = _on(caches[0].device, buffer, block_ids)
    _invoke("scatter_blocks", (list(caches), buffer, block_ids, backend))


def swap_blocks(src_caches, dst_caches, src_ids, dst_ids, *, backend=None) -> None:
    """Copy block src_ids[i] of every src cache to block dst_ids[i] of the matching dst cache.

    The device <-> host transfer path (offload/onload): src_caches and dst_caches are
    sequences of tensors with the block axis first, pairwise of the same block shape and dtype,
    typically every layer's K and V on the GPU and their pinned-host twins. Runs on the current
    CUDA stream (``with torch.cuda.stream(s):``) and may return before the copies ran: until
    that stream passes the call, do not read a host dst cache nor change a host src cache or
    pinned host ids. src_ids, dst_ids: i32[n] or i64[n] on either device; dst_ids distinct.
    """
    _guard_swap(src_caches, dst_caches, src_ids, dst_ids, backend)
    _invoke("swap_blocks", (list(src_caches), list(dst_caches), src_ids, dst_ids, backend))


__all__ = ["attention_workspace_size", "copy_blocks", "gather_blocks", "merge_attention_states",
           "paged_attention", "scatter_blocks", "shared_prefix_attention", "swap_blocks",
           "write_kv"]
