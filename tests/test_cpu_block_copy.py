"""The compiled one-pass host block copy (kernels/cpu/block_copy.cc) and the PyTorch CPU cache
ops that run on it: swap_blocks, copy_blocks, gather_blocks, scatter_blocks.

The raw copy is checked byte for byte against a numpy model (odd block sizes, block strides
wider than a block, unaligned destinations, streaming stores, several threads, ids out of
range); the ops against the expected blocks, with every other block bit-identical, through
the compiled copy and with it turned off (PREFIXKV_DISABLE_CPU_FFI), which must agree.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.kernels.cpu import block_copy  # noqa: E402
from prefixkv.torch_frontend import _native  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

pytestmark = pytest.mark.skipif(not block_copy.available(),
                                reason=f"CPU block copy: {block_copy.status()}")


def _off(monkeypatch) -> None:
    """The compiled copy turned off for the rest of the test: the torch path runs."""
    monkeypatch.setenv("PREFIXKV_DISABLE_CPU_FFI", "1")
    monkeypatch.setattr(block_copy, "_state", {})
    assert not block_copy.available() and "disabled" in block_copy.status()


def _spy(monkeypatch) -> list:
    calls = []
    real = block_copy.copy_blocks

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)
    monkeypatch.setattr(block_copy, "copy_blocks", spy)
    return calls


# ------------------------------------------------------------------------- the raw copy

#: (block bytes, src block stride, dst block stride, dst offset in bytes): odd sizes around
#: the 16- and 128-byte steps of the streaming loops, strides wider than a block (a half of a
#: stacked cache), destinations 1, 3 and 8 bytes past an alignment.
RAW_CASES = [(1, 1, 1, 0), (7, 9, 7, 1), (16, 16, 48, 0), (127, 130, 127, 3),
             (128, 256, 128, 8), (1000, 1000, 1013, 5), (4096, 8192, 4096, 0),
             (32768 + 24, 32768 + 40, 32768 + 24, 1)]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("case", RAW_CASES, ids=str)
def test_raw_copy_matches_numpy(case, streaming, threads):
    """Two caches (the second's blocks 3 bytes shorter), ids with a repeat-free destination
    set, a source past the end (clamped to the last block) and a destination past the end and
    one negative (skipped): the named blocks copied, every other byte as it was."""
    block, s_stride, d_stride, offset = case
    rng = np.random.default_rng(block)
    src_blocks, dst_blocks, n = 6, 7, 5
    src_ids = np.array([5, 0, 9, 3, 2], np.int64)  # 9 -> 5
    dst_ids = np.array([6, 1, 0, 7, -1], np.int64)  # 7, -1 skipped
    sizes = [block, max(0, block - 3)]
    srcs = [rng.integers(0, 256, src_blocks * s_stride, dtype=np.uint8) for _ in sizes]
    dsts = [rng.integers(0, 256, offset + dst_blocks * d_stride, dtype=np.uint8)
            for _ in sizes]
    want = [d.copy() for d in dsts]
    for w, s, size in zip(want, srcs, sizes, strict=True):
        for a, b in zip(src_ids, dst_ids, strict=True):
            if 0 <= b < dst_blocks:
                a = min(a, src_blocks - 1)
                w[offset + b * d_stride:offset + b * d_stride + size] = \
                    s[a * s_stride:a * s_stride + size]
    block_copy.copy_blocks([s.ctypes.data for s in srcs], [d.ctypes.data + offset for d in dsts],
                           [s_stride] * 2, [d_stride] * 2, sizes, n, src_ids.ctypes.data,
                           dst_ids.ctypes.data, src_blocks, dst_blocks, streaming=streaming,
                           threads=threads)
    for got, w in zip(dsts, want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_raw_copy_identity_ids_and_argument_checks():
    """None ids stand for 0..n-1 (a gather's output, a scatter's input); mismatched lists and
    negative sizes are refused with nothing copied."""
    src = np.arange(4 * 8, dtype=np.uint8)
    dst = np.zeros(3 * 8, np.uint8)
    block_copy.copy_blocks([src.ctypes.data], [dst.ctypes.data], [8], [8], [8], 3, None, None,
                           4, 3)
    np.testing.assert_array_equal(dst, src[:24])
    dst[:] = 0
    with pytest.raises(ValueError, match="one entry per cache"):
        block_copy.copy_blocks([src.ctypes.data], [dst.ctypes.data], [8], [8], [8, 8], 3, None,
                               None, 4, 3)
    with pytest.raises(ValueError, match="out of range"):
        block_copy.copy_blocks([src.ctypes.data], [dst.ctypes.data], [8], [8], [-8], 3, None,
                               None, 4, 3)
    with pytest.raises(ValueError, match="out of range"):
        block_copy.copy_blocks([src.ctypes.data], [dst.ctypes.data], [8], [8], [8], 3, None,
                               None, 0, 3)
    assert not dst.any()


# -------------------------------------------------------------------------- the ops

DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn]
#: how the caches are laid out: a tensor each; K and V halves of one stacked [blocks, 2, ...]
#: cache; every cache a view of one block-major buffer [blocks, caches, ...].
LAYOUTS = ["tensors", "stacked", "one_buffer"]


def _draw(shape, dtype, g):
    x = torch.randn(shape, generator=g)
    return x.to(dtype)


def _caches(layout, num_blocks, dtype, g, count=4, block=(4, 2, 8)):
    if layout == "tensors":
        return [_draw((num_blocks, *block), dtype, g) for _ in range(count)]
    if layout == "stacked":
        return [half for _ in range(count // 2)
                for half in _draw((num_blocks, 2, *block), dtype, g).unbind(1)]
    buf = _draw((num_blocks, count, *block), dtype, g)
    return list(buf.unbind(1))


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _same(a, b) -> bool:
    return torch.equal(_bits(a), _bits(b))


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    """Each op test runs through the compiled copy (which must be called) and with it off."""
    if request.param == "torch":
        _off(monkeypatch)
        return None
    return _spy(monkeypatch)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swap_blocks(path, layout, dtype):
    g = torch.Generator().manual_seed(1)
    src, dst = _caches(layout, 9, dtype, g), _caches(layout, 7, dtype, g)
    before = [d.clone() for d in dst]
    mapping = torch.tensor([[8, 3], [0, 6], [4, 0], [2, 2]])  # columns: strided int64 ids
    tf.swap_blocks(src, dst, mapping[:, 0], mapping[:, 1].to(torch.int32))
    for a, b, old in zip(src, dst, before, strict=True):
        want = old.clone()
        want[mapping[:, 1]] = a[mapping[:, 0]]
        assert _same(b, want)
    assert path is None or len(path) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_then_scatter_blocks(path, layout, dtype):
    g = torch.Generator().manual_seed(2)
    caches = _caches(layout, 9, dtype, g)
    ids = torch.tensor([7, 0, 3, 7, 5], dtype=torch.int32)  # a gather may repeat an id
    got = tf.gather_blocks(caches, ids)
    assert _same(got, torch.stack([c[ids.long()] for c in caches], 1))
    others = _caches(layout, 9, dtype, g)
    before = [c.clone() for c in others]
    dst = torch.tensor([8, 1, 4, 2, 0])
    tf.scatter_blocks(others, got, dst)
    for i, (c, old) in enumerate(zip(others, before, strict=True)):
        want = old.clone()
        want[dst] = got[:, i]
        assert _same(c, want)
    assert path is None or len(path) == 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_blocks(path, layout, dtype):
    """Disjoint sources and destinations, and a block copied onto itself: one pass."""
    g = torch.Generator().manual_seed(3)
    caches = _caches(layout, 9, dtype, g)
    before = [c.clone() for c in caches]
    mapping = torch.tensor([[1, 5], [2, 6], [4, 4], [0, 8]])
    tf.copy_blocks(caches, mapping[:, 0], mapping[:, 1])
    for c, old in zip(caches, before, strict=True):
        want = old.clone()
        want[mapping[:, 1]] = old[mapping[:, 0]]
        assert _same(c, want)
    assert path is None or len(path) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_blocks_reading_a_written_block_stages(monkeypatch, layout):
    """A block both read and written by different pairs (1 -> 2, 2 -> 3, 3 -> 1): every read
    before any write, so not the one-pass copy."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(4)
    caches = _caches(layout, 5, torch.bfloat16, g)
    before = [c.clone() for c in caches]
    src, dst = torch.tensor([1, 2, 3]), torch.tensor([2, 3, 1])
    tf.copy_blocks(caches, src, dst)
    for c, old in zip(caches, before, strict=True):
        want = old.clone()
        want[dst] = old[src]
        assert torch.equal(c, want)
    assert not calls


def test_sources_written():
    t = torch.tensor
    assert not _native._sources_written(t([1, 2]), t([3, 4]))
    assert not _native._sources_written(t([1, 2]), t([1, 4]))  # 1 onto itself
    assert not _native._sources_written(t([1, 1]), t([1, 4]))  # 1 read twice, "written" as it is
    assert _native._sources_written(t([1, 2]), t([2, 4]))
    assert _native._sources_written(t([1, 2]), t([3, 1]))


def test_blocks_not_contiguous_take_the_torch_path(monkeypatch):
    """Caches whose blocks are not one run of bytes (an HND cache's NHD view) are copied by
    torch, exactly."""
    calls = _spy(monkeypatch)
    g = torch.Generator().manual_seed(5)
    src = [torch.randn(6, 2, 4, 8, generator=g).transpose(1, 2) for _ in range(2)]
    dst = [torch.zeros(6, 2, 4, 8).transpose(1, 2) for _ in range(2)]
    si, di = torch.tensor([5, 1]), torch.tensor([0, 3])
    tf.swap_blocks(src, dst, si, di)
    for a, b in zip(src, dst, strict=True):
        assert torch.equal(b[di], a[si]) and not b[[1, 2, 4, 5]].any()
    assert _native._block_layout(src[0]) is None and not calls


def test_large_copies_stream_and_split_over_threads(monkeypatch):
    """Past STREAM_MIN_BYTES the copy streams, past THREAD_MIN_BYTES per thread it splits
    over torch's threads; the bytes are the same."""
    calls = _spy(monkeypatch)
    monkeypatch.setattr(_native, "STREAM_MIN_BYTES", 4096)
    monkeypatch.setattr(_native, "THREAD_MIN_BYTES", 4096)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(6)
        src = _caches("one_buffer", 40, torch.bfloat16, g, count=6, block=(16, 2, 33))
        dst = [torch.zeros(50, 16, 2, 33, dtype=torch.bfloat16) for _ in range(6)]
        si = torch.randperm(40, generator=g)[:30]
        di = torch.randperm(50, generator=g)[:30]
        tf.swap_blocks(src, dst, si, di)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(src, dst, strict=True):
        want = torch.zeros_like(b)
        want[di] = a[si]
        assert torch.equal(b, want)
    assert calls[0][1] == {"streaming": True, "threads": 2}


def test_threads_keep_the_last_of_caches_sharing_memory(monkeypatch):
    """scatter_blocks into one cache listed twice (layers sharing a KV cache) leaves the last
    part's bytes, as one thread does: threads split the blocks, not the caches (split by
    cache, two threads raced over every block)."""
    calls = _spy(monkeypatch)
    monkeypatch.setattr(_native, "THREAD_MIN_BYTES", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(8)
        cache = torch.zeros(512, 64, 8, 16)
        buffer = torch.randn(400, 2, 64, 8, 16, generator=g)
        ids = torch.randperm(512, generator=g)[:400]
        for _ in range(3):
            tf.scatter_blocks([cache, cache], buffer, ids)
            assert torch.equal(cache[ids], buffer[:, 1])
            cache.zero_()
    finally:
        torch.set_num_threads(threads)
    assert all(kwargs["threads"] == 2 for _, kwargs in calls) and len(calls) == 3


def test_gather_advises_huge_pages_on_its_new_output(monkeypatch):
    """gather_blocks asks for huge pages over its new buffer (the other ops write into the
    caller's memory and do not)."""
    seen = []
    real = block_copy.advise_new_output
    monkeypatch.setattr(block_copy, "advise_new_output",
                        lambda address, nbytes: (seen.append((address, nbytes)),
                                                 real(address, nbytes)))
    g = torch.Generator().manual_seed(7)
    caches = _caches("tensors", 9, torch.float32, g)
    ids = torch.tensor([3, 1])
    got = tf.gather_blocks(caches, ids)
    assert seen == [(got.data_ptr(), got.numel() * 4)]
    tf.scatter_blocks(caches, got.clone(), torch.tensor([4, 5]))
    tf.swap_blocks(caches[:1], caches[1:2], ids, torch.tensor([0, 2]))
    assert len(seen) == 1


# ----------------------------------------------- tensors whose bytes are not just their values
# (found by fuzzing the compiled copy against the torch path)


def test_conjugate_and_negative_views_keep_their_values():
    """A lazily conjugated (or negated) view's bytes are not its values: such sources and
    destinations take the torch path, which resolves the bit."""
    z = torch.tensor([[1 + 1j, 2 + 2j], [3 + 3j, 4 + 4j], [5 + 5j, 6 + 6j]], dtype=torch.complex64)
    src = z.conj()
    dst = torch.zeros(3, 2, dtype=torch.complex64)
    tf.swap_blocks([src], [dst], torch.tensor([0, 2]), torch.tensor([1, 0]))
    assert torch.equal(dst, torch.stack([src[2], src[0], torch.zeros(2)]).resolve_conj())
    assert torch.equal(tf.gather_blocks([src], torch.tensor([1]))[:, 0], src[1:2].resolve_conj())
    target = torch.zeros(3, 2, dtype=torch.complex64)
    view = target.conj()
    tf.scatter_blocks([view], z[:1, None], torch.tensor([2]))
    assert torch.equal(view[2].resolve_conj(), z[0])
    neg = z.conj().imag  # a negative-bit view
    assert neg.is_neg()
    out = torch.zeros(3, 2)
    tf.swap_blocks([neg], [out], torch.tensor([1]), torch.tensor([0]))
    assert torch.equal(out[0], neg[1].resolve_neg())


def test_inference_tensors_written_only_in_inference_mode():
    """Writing an inference tensor outside inference mode raises a RuntimeError (torch's type
    for it) naming the cache, before any write (torch's own error came after the write, the
    compiled copy wrote silently); inside inference mode it is written."""
    with torch.inference_mode():
        c = torch.arange(12.0).view(4, 3)
    before = c.clone()
    for call in (lambda: tf.copy_blocks([c], torch.tensor([0]), torch.tensor([1])),
                 lambda: tf.swap_blocks([torch.ones(4, 3)], [c], torch.tensor([0]),
                                        torch.tensor([2])),
                 lambda: tf.scatter_blocks([c], torch.full((1, 1, 3), 7.0), torch.tensor([3])),
                 lambda: tf.write_kv(torch.ones(1, 1, 3), torch.ones(1, 1, 3), c.view(4, 1, 1, 3),
                                     c.view(4, 1, 1, 3).clone(), torch.tensor([2]))):
        with pytest.raises(RuntimeError,
                           match=r"^(dst_caches|caches|k_cache)(\[0\])?: an inference tensor"):
            call()
        assert torch.equal(c, before)
    with torch.inference_mode():
        tf.copy_blocks([c], torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(c[1], before[0])


def test_blocks_that_overlap_each_other_are_refused():
    """A cache whose block stride is under a block's size (block i = base[2i:2i+4]) reaches
    one memory location from two indices: refused by name before anything is written, as a
    stride-0 cache is (it had been copied with every read first, and the destinations that
    overlap written in order, the last one winning)."""
    base = torch.arange(20, dtype=torch.float32)
    c = base.as_strided((4, 4), (2, 1))
    with pytest.raises(ValueError, match=r"^caches\[0\]: its blocks share memory \(an "
                                         r"overlapping view"):
        tf.copy_blocks([c], torch.tensor([3, 0]), torch.tensor([1, 2]))
    assert base.tolist() == list(range(20))


def test_ids_that_are_a_view_of_the_written_cache():
    """dst ids read from the cache being written: the blocks named when the call began are
    written (the one-pass copy re-read the ids as it overwrote them)."""
    c = torch.arange(32, dtype=torch.int64).view(8, 4) + 100
    c[5] = torch.tensor([5, 6, 7, 3])
    c[0] = 0
    before = c.clone()
    tf.copy_blocks([c], torch.tensor([0, 1, 2, 1]), c[5])
    want = before.clone()
    want[[5, 6, 7, 3]] = before[[0, 1, 2, 1]]
    assert torch.equal(c, want)


@pytest.mark.parametrize("threads", [1, 2])
def test_views_shifted_by_a_block_do_not_chain(monkeypatch, threads):
    """copy_blocks over base[0:7] and base[1:8] (B's block i is A's block i + 1): no id is both
    a source and a destination, yet B's source is A's destination; every read comes first
    (both paths had chained: base[3] got A's new block)."""
    monkeypatch.setattr(_native, "THREAD_MIN_BYTES", 1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = torch.arange(8, dtype=torch.float32).repeat_interleave(64).view(8, 64)
        tf.copy_blocks([base[0:7], base[1:8]], torch.tensor([1]), torch.tensor([2]))
    finally:
        torch.set_num_threads(old)
    assert base[:, 0].tolist() == [0, 1, 1, 2, 4, 5, 6, 7]
