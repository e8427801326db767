"""Contracts of the PyTorch wrappers (torch_frontend/_ops.py) that a mutation review of that
module found unpinned by the other tests: strided index views copied before a kernel reads them,
list items and unhashable options named in the errors, the workspace checks, the memory-sharing
refusals exact to one element (write_kv rows, swap_blocks blocks in either order, views at an
offset into one storage, empty rows), copy_blocks deduplicating a cache listed again as another
view object, fp8 scales given as ints or numpy scalars, the dispatcher routing of function
modes, tensor subclasses and grad-requiring caches inside lists, the sinks on an lse buffer made
under inference_mode, and the bound on the static-check cache. The numpy reference is the
oracle. copy_blocks over two different views of one memory (a dtype or shape view of a cache
listed beside it) reads every source before any write, as over the cache alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402
from prefixkv.paged.validate import value_checks  # noqa: E402
from torch_convert import N, T, close  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

I32 = dict(dtype=torch.int32)


def _batch(seed=1, seqs=((1, 9), (1, 20), (1, 5))):
    rng = np.random.default_rng(seed)
    return testing.make_ragged_batch(rng, list(seqs), num_q_heads=4, num_kv_heads=2,
                                     head_dim=16, block_size=4, decode=True)


# ----------------------------------------------------------------- index tensors and naming


@pytest.mark.parametrize("n", [2, 3])
def test_strided_index_views_are_copied_before_the_kernels_read_them(n):
    """Index tensors with a non-unit last stride (the columns of vLLM's [n, 2] block mapping,
    a strided kv_lens, a column-major block table) give the results of their contiguous
    copies: never read with the wrong strides (also at length 2)."""
    base = torch.arange(8 * 4, dtype=torch.float32).view(8, 4)
    mapping = torch.tensor([[0, 4], [1, 5], [2, 6]][:n], **I32)
    caches = [base.clone(), base.clone() * 2]
    want = ref.copy_blocks_reference([N(c) for c in caches], mapping[:, 0].numpy(),
                                     mapping[:, 1].numpy())
    tf.copy_blocks(caches, mapping[:, 0], mapping[:, 1])
    for c, w in zip(caches, want, strict=True):
        np.testing.assert_array_equal(N(c), w)
    ids = torch.tensor([[3, 0], [6, 0], [1, 0]][:n], **I32)[:, 0]
    got = tf.gather_blocks(caches, ids)
    np.testing.assert_array_equal(N(got[:, 0]), N(caches[0])[[3, 6, 1][:n]])

    b = _batch(seqs=((1, 9), (1, 20), (1, 5))[:n])
    want = ref.paged_attention_reference(*b.args()[:5])
    q, k, v, tables, kv_lens = (T(a) for a in b.args()[:5])
    lens2 = torch.stack([kv_lens, torch.zeros_like(kv_lens)], 1)[:, 0]  # stride 2
    tables_cm = tables.t().contiguous().t()  # column-major
    assert lens2.stride(-1) == 2 and tables_cm.stride(-1) == n
    close(tf.paged_attention(q, k, v, tables_cm, lens2), want, "float32")


def test_list_items_that_are_none_or_elsewhere_are_named():
    """A None inside a cache list is a TypeError naming the item (not skipped like a None
    argument); a cache on another device names the item and the first cache's label."""
    c = [torch.zeros(4, 3), torch.zeros(4, 3)]
    i, j = torch.tensor([0], **I32), torch.tensor([1], **I32)
    calls = {
        r"caches\[1\]": lambda: tf.copy_blocks([c[0], None], i, j),
        r"caches\[0\]": lambda: tf.gather_blocks([None, c[0]], i),
        r"dst_caches\[1\]": lambda: tf.swap_blocks(c, [c[1], None], i, j),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name}: expected a torch.Tensor, got NoneType"):
            call()
    with pytest.raises(ValueError, match=r"^caches\[1\]: expected it on caches\[0\]'s device cpu"):
        tf.copy_blocks([c[0], c[1].to("meta")], i, j)


def test_unhashable_options_are_named_every_time():
    """An option of an unhashable type (a list) skips the static-check cache but is still
    checked: a TypeError naming it, on every call."""
    b = _batch()
    args = [T(a) for a in b.args()[:5]]
    for _ in range(2):
        for kw, name in (({"scale": [0.5]}, "scale"), ({"sliding_window": [5]}, "sliding_window"),
                         ({"logits_soft_cap": [1.0]}, "logits_soft_cap")):
            with pytest.raises(TypeError, match=f"^{name}: expected"):
                tf.paged_attention(*args, **kw)


def test_static_check_cache_stays_bounded(monkeypatch):
    """The static checks that passed are kept at most _PASSED_MAX, then cleared."""
    from prefixkv.torch_frontend import _ops

    monkeypatch.setattr(_ops, "_PASSED", {})
    monkeypatch.setattr(_ops, "_PASSED_MAX", 2)
    b = _batch()
    args = [T(a) for a in b.args()[:5]]
    for window in (3, 4, 5, 6, 7):
        tf.paged_attention(*args, sliding_window=window)
        assert len(_ops._PASSED) <= 2


# ------------------------------------------------------------------------- out= and workspace


def test_out_and_workspace_checks():
    """out= of another type is named; a workspace must be a contiguous 1-D uint8 tensor
    starting 256-byte aligned (a slice at a multiple of 256 is fine, also given alone)."""
    b = _batch()
    args = [T(a) for a in b.args()[:5]]
    want = ref.paged_attention_reference(*b.args()[:5])
    with pytest.raises(TypeError, match="^out: expected a torch.Tensor, got ndarray"):
        tf.paged_attention(*args, out=np.zeros(args[0].shape, np.float32))
    for bad in (torch.zeros(4, 256, dtype=torch.uint8), torch.zeros(1024, dtype=torch.uint8)[::2]):
        with pytest.raises(ValueError, match="^workspace: expected a contiguous 1-D uint8"):
            tf.paged_attention(*args, workspace=bad)
    ws = torch.zeros(1024, dtype=torch.uint8)
    with pytest.raises(ValueError, match="^workspace: must start 256-byte aligned"):
        tf.paged_attention(*args, workspace=ws[128:])
    close(tf.paged_attention(*args, workspace=ws[256:]), want, "float32")
    out = torch.full(args[0].shape, float("nan"))
    assert tf.paged_attention(*args, out=out, workspace=ws[768:]) is out
    close(out, want, "float32")


# --------------------------------------------------------------------------- memory sharing


def test_write_kv_rows_sharing_one_element_or_an_offset_view_refused():
    """Key/value rows that share a single element with a cache (either order in one buffer),
    or are a view at an offset into the cache's storage, are refused and nothing is written;
    empty rows sliced from a cache share nothing and are accepted."""
    nb, bs, h, d = 4, 2, 1, 4
    cache_n, key_n = nb * bs * h * d, 2 * h * d
    slots = torch.tensor([0, 3], **I32)
    for layout in ("key_first", "cache_first"):
        buf = torch.arange(2 * cache_n + key_n, dtype=torch.float32)
        if layout == "key_first":  # the key's last element is the cache's first
            key = buf[:key_n].view(2, h, d)
            kc = buf[key_n - 1:key_n - 1 + cache_n].view(nb, bs, h, d)
        else:  # the cache's last element is the key's first
            kc = buf[:cache_n].view(nb, bs, h, d)
            key = buf[cache_n - 1:cache_n - 1 + key_n].view(2, h, d)
        vc, before = torch.zeros(nb, bs, h, d), buf.clone()
        with pytest.raises(ValueError, match="^key: shares memory with k_cache"):
            tf.write_kv(key, torch.ones(2, h, d), kc, vc, slots)
        assert torch.equal(buf, before) and not vc.any()
    kc, vc = torch.zeros(nb, bs, h, d), torch.zeros(nb, bs, h, d)
    with pytest.raises(ValueError, match="^value: shares memory with v_cache"):
        tf.write_kv(torch.ones(2, h, d), vc[1, :2], kc, vc, slots)  # offset 8 into v's storage
    assert not kc.any() and not vc.any()
    empty = kc.view(-1, h, d)[5:5]
    tf.write_kv(empty, empty, kc, vc, torch.zeros(0, **I32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_swap_blocks_overlap_is_exact_in_either_order(dtype):
    """swap_blocks refuses a destination sharing even one element with a source block (the
    source before or after it in one buffer, or an offset view) and accepts disjoint views:
    a destination earlier in an interleaved buffer than its source, or lying in the gaps
    between the source's blocks."""
    x = 6
    ids = torch.tensor([0, 2], **I32), torch.tensor([1, 3], **I32)
    buf = torch.arange(9 * x, dtype=dtype)  # one-byte elements: overlaps of one byte
    early = buf[:4 * x].view(4, x)
    late = buf[4 * x - 1:8 * x - 1].view(4, x)  # its block 0 starts on early's last element
    for src, dst in ((early, late), (late, early)):
        before = buf.clone()
        with pytest.raises(ValueError, match=r"^dst_caches\[0\]: shares memory with "
                                             r"src_caches\[0\]"):
            tf.swap_blocks([src], [dst], *ids)
        assert torch.equal(buf, before)
    cache, other = torch.randn(5, x), torch.randn(5, x)
    with pytest.raises(ValueError, match=r"^dst_caches\[0\]: shares memory with src_caches\[0\]"):
        tf.swap_blocks([cache], [cache[1:]], *ids)
    with pytest.raises(ValueError, match=r"^dst_caches\[1\]: shares memory with src_caches\[0\]"):
        tf.swap_blocks([cache, other], [torch.zeros(5, x), cache[:]], *ids)  # not pairwise
    layers = torch.randn(4, 3, 4, 3)  # [blocks, layer, ...]
    for src, dst in ((layers[:, 2], layers[:, 0]), (layers[:, 0], layers[1, 1:3])):
        src_ids, dst_ids = ((ids[0], ids[1]) if dst.shape[0] == 4
                            else (ids[0], torch.tensor([1, 0], **I32)))
        want = dst.clone()
        want[dst_ids.long()] = src[src_ids.long()]
        tf.swap_blocks([src], [dst], src_ids, dst_ids)
        assert torch.equal(dst, want)


def test_copy_blocks_dedup_of_views():
    """copy_blocks copies a cache listed again as another view object of the same memory,
    shape and strides once (a chain 0 -> 1 -> 2 stays all reads before writes), and copies
    each of two different views at one address (a narrower one first) in full."""
    k = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    src, dst = np.array([0, 1], np.int32), np.array([1, 2], np.int32)
    want = ref.copy_blocks_reference([k.numpy().copy()], src, dst)[0]
    tf.copy_blocks([k, k[:]], torch.from_numpy(src), torch.from_numpy(dst))
    np.testing.assert_array_equal(k.numpy(), want)
    k = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    want = k.clone()
    want[4] = want[3]
    tf.copy_blocks([k[:, :3], k], torch.tensor([3], **I32), torch.tensor([4], **I32))
    assert torch.equal(k, want)


@pytest.mark.parametrize("view", ["dtype", "shape"])
def test_copy_blocks_two_views_of_one_memory_copy_as_one(view):
    """A cache listed beside another view of its memory (another dtype or block shape)
    copies src -> dst with all reads before any write, as the cache alone does."""
    k = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    src, dst = np.array([0, 1], np.int32), np.array([1, 2], np.int32)
    want = ref.copy_blocks_reference([k.numpy().copy()], src, dst)[0]
    other = k.view(torch.int32) if view == "dtype" else k.view(6, 2, 4)
    tf.copy_blocks([k, other], torch.from_numpy(src), torch.from_numpy(dst))
    np.testing.assert_array_equal(k.numpy(), want)


# ------------------------------------------------------------------------------- fp8 scales


def test_fp8_scales_as_ints_and_numpy_scalars():
    """k_scale / v_scale may be a Python int or a numpy scalar: the same bytes as the float."""
    rng = np.random.default_rng(3)
    key = T(testing.random_values(rng, (2, 2, 16), "float32", scale=3.0))
    slots = torch.tensor([0, 5], **I32)
    want = None
    for s in (2.0, 2, np.float32(2.0), np.int64(2)):
        kc = torch.zeros(4, 4, 2, 16, dtype=torch.float8_e4m3fn)
        vc = torch.zeros_like(kc)
        tf.write_kv(key, key, kc, vc, slots, k_scale=s, v_scale=s)
        got = (kc.view(torch.uint8).clone(), vc.view(torch.uint8).clone())
        if want is None:
            want = got
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), type(s)


# -------------------------------------------------------------------------- dispatch routing


def test_function_modes_subclasses_and_grad_in_lists_go_through_the_custom_op(monkeypatch):
    """Under a TorchFunctionMode, with a tensor subclass, or with a cache needing grad inside
    a cache list, the wrappers call torch.ops.prefixkv.<op> (the registered implementation),
    never the eager shortcut, and the results are exact."""
    from prefixkv.torch_frontend import _ops
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    class Sub(torch.Tensor):
        pass

    spied = []
    for name in ("write_kv", "copy_blocks", "paged_attention"):
        monkeypatch.setitem(_ops._IMPL, name, lambda *a: spied.append(a))
    b = _batch()
    args = [T(a) for a in b.args()[:5]]
    with Seen() as seen:
        close(tf.paged_attention(*args), ref.paged_attention_reference(*b.args()[:5]), "float32")
    assert "prefixkv.paged_attention" in seen.ops
    rng = np.random.default_rng(4)
    key = T(testing.random_values(rng, (2, 2, 16), "float32"))
    kc, vc = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    tf.write_kv(key, key, kc.as_subclass(Sub), vc, torch.tensor([0, 5], **I32))
    assert torch.equal(kc[0, 0], key[0]) and torch.equal(vc[1, 1], key[1])
    for sub in (False, True):
        caches = [torch.zeros(4, 3), torch.arange(12.0).view(4, 3)]
        given = ([caches[0].as_subclass(Sub), caches[1]] if sub
                 else [caches[0].requires_grad_(), caches[1]])
        with torch.no_grad():
            tf.copy_blocks(given, torch.tensor([2], **I32), torch.tensor([0], **I32))
        assert torch.equal(caches[1][0], caches[1][2])
    assert spied == []


# -------------------------------------------------------------------------------- sinks


@pytest.mark.parametrize("made", ["lse", "out"])
def test_sinks_with_one_buffer_made_under_inference_mode(made):
    """out= or lse= alone made under torch.inference_mode (the other one outside it) with
    sinks: the sinks are applied to both, as the reference."""
    rng = np.random.default_rng(9)
    b = testing.make_ragged_batch(rng, testing.seq_grid("decode", 4), num_q_heads=4,
                                  num_kv_heads=2, head_dim=16, block_size=4)
    sinks = rng.standard_normal(4).astype(np.float32)
    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, sinks=sinks)
    args = [T(a) for a in b.args()[:5]]
    out, lse = torch.empty_like(args[0]), torch.empty(args[0].shape[:2])
    with torch.inference_mode():
        if made == "lse":
            lse = torch.empty(args[0].shape[:2])
        else:
            out = torch.empty_like(args[0])
    tf.paged_attention(*args, sinks=T(sinks), out=out, lse=lse)
    np.testing.assert_allclose(N(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(N(lse), want_lse, atol=1e-4, rtol=1e-5)


def test_copy_blocks_chain_over_a_part_of_a_cache_and_the_cache():
    """A cache listed beside a part of it (its first 3 of 8 elements a block) with a chain
    (block 1 a destination and a source): every source read before any write, the cache equal
    to the reference's copy of it alone; ids past the end named before anything is written,
    also with value checks off."""
    k = torch.arange(6 * 8, dtype=torch.float32).reshape(6, 8)
    src, dst = np.array([0, 1], np.int32), np.array([1, 2], np.int32)
    want = ref.copy_blocks_reference([k.numpy().copy()], src, dst)[0]
    tf.copy_blocks([k[:, :3], k], torch.from_numpy(src), torch.from_numpy(dst))
    np.testing.assert_array_equal(k.numpy(), want)
    before = k.clone()
    with value_checks(False):
        for name, s, d in (("src", [1, 6], [2, 1]), ("dst", [0, 1], [1, 6])):
            with pytest.raises(ValueError, match=rf"^{name}: expected values in \[0, 6\)"):
                tf.copy_blocks([k, k.view(6, 2, 4)], torch.tensor(s, **I32),
                               torch.tensor(d, **I32))
            assert torch.equal(k, before)


@pytest.mark.parametrize("layout", ["block_major", "layer_major", "one_each"])
def test_copy_blocks_chain_over_layers_of_one_buffer(layout, monkeypatch):
    """A chain copy over every layer's K and V of one buffer (block-major [blocks, layers, 2,
    ...], layer-major [layers, 2, blocks, ...]) or a tensor each: equal to the reference per
    cache, and the caches are told apart from their layout alone (no check of every pair:
    64 caches in one buffer took 13-67 ms that way)."""
    from prefixkv.torch_frontend import _ops

    pairs = []
    real = _ops._blocks_overlap
    monkeypatch.setattr(_ops, "_blocks_overlap", lambda a, b: pairs.append(1) or real(a, b))
    layers, nb = 4, 6
    if layout == "block_major":
        buf = torch.randn(nb, layers, 2, 2, 3)
        caches = [buf[:, i, j] for i in range(layers) for j in range(2)]
    elif layout == "layer_major":
        buf = torch.randn(layers, 2, nb, 2, 3)
        caches = [buf[i, j] for i in range(layers) for j in range(2)]
    else:
        caches = [torch.randn(nb, 2, 3) for _ in range(2 * layers)]
    src, dst = np.array([0, 1, 4], np.int32), np.array([1, 2, 0], np.int32)
    want = ref.copy_blocks_reference([c.numpy().copy() for c in caches], src, dst)
    tf.copy_blocks(caches, torch.from_numpy(src), torch.from_numpy(dst))
    for c, w in zip(caches, want, strict=True):
        np.testing.assert_array_equal(c.numpy(), w)
    assert not pairs


@pytest.mark.parametrize("seqs,prefix_blocks,own_blocks", [(1, 512, 512), (1, 1024, 256),
                                                           (2, 256, 1024)])
def test_shared_prefix_workspace_covers_its_sliding_window_calls(seqs, prefix_blocks,
                                                                 own_blocks):
    """attention_workspace_size with prefix_block_tables (the triton backend, sized from meta
    tensors) covers the calls with a sliding window, which run paged attention over
    prefix-then-own tables: at least paged attention's size at the joined width (more than
    the cascade itself needs for one sequence with a 512-block prefix)."""
    pytest.importorskip("triton")

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta")

    q, k = meta(seqs, 32, 128), meta(65536, 16, 8, 128)
    tables, prefix = meta(seqs, own_blocks, **I32), meta(1, prefix_blocks, **I32)
    joined = meta(seqs, prefix_blocks + own_blocks, **I32)
    shared = tf.attention_workspace_size(q, k, tables, prefix_block_tables=prefix,
                                         backend="triton")
    assert shared >= tf.attention_workspace_size(q, k, joined, backend="triton") > 0
