"""The custom ops called directly (``torch.ops.prefixkv.<op>``, as a vLLM-style engine or a
compiled graph calls them, bypassing the Python wrappers) run the wrappers' checks themselves
(``_ops._op``'s guards); a bad-input sweep (/tmp/badinput) found them checking nothing:

- caches of two block counts: a segfault in every block op (0 blocks), and scatter_blocks
  writing past a 2-block cache (8 blocks named);
- shared_prefix_attention with a garbage kv_len near 2**31 looping for minutes;
- write_kv / scatter_blocks / swap_blocks writing the first cache, then raising on the second;
- index tensors with no data (the meta device), NaN options, unknown backends.

And the wrappers' gaps the sweep found: a destination whose blocks overlap (an as_strided view
with a block stride under a block), write_kv with one tensor as both caches, ``backend=""``
taken as no request, meta tensors failing deep inside. The valid layouts next to those
(stacked halves, token-interleaved K/V, permuted and interleaved views that reach each element
once) still run, against the numpy reference.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged.registry import BackendError  # noqa: E402
from prefixkv.paged.validate import value_checks  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402

OPS = torch.ops.prefixkv


def i32(x):
    return torch.tensor(x, dtype=torch.int32)


def _caches(num_blocks=8, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(num_blocks, 4, 2, 16, generator=g) for _ in range(n)]


# --------------------------------------------------------------- block ops, called directly


def _direct_block_op(op, caches, other):
    """``op`` called directly over caches[0] (8 blocks) and ``other``."""
    ids = i32([7, 1])
    if op == "copy":
        OPS.copy_blocks([caches[0], other], ids, i32([2, 3]), None)
    elif op == "gather":
        OPS.gather_blocks([caches[0], other], ids, None)
    elif op == "scatter":
        OPS.scatter_blocks([caches[0], other], torch.zeros(2, 2, 4, 2, 16), ids, None)
    else:
        dst = [torch.zeros_like(caches[0]), torch.zeros_like(other)]
        OPS.swap_blocks([caches[0], other], dst, ids, i32([2, 3]), None)


@pytest.mark.parametrize("blocks", [0, 2])
@pytest.mark.parametrize("op", ["copy", "gather", "scatter", "swap"])
def test_direct_block_ops_refuse_caches_of_two_block_counts(op, blocks):
    """0 blocks crashed the process; 2 blocks let scatter write block 7 past the cache."""
    caches = _caches()
    backing = torch.zeros(8, 4, 2, 16)
    other = backing[:blocks]
    before = [c.clone() for c in caches]
    name = "src_caches" if op == "swap" else "caches"
    with pytest.raises(ValueError, match=rf"^{name}\[1\]: expected 8 blocks \(from {name}\[0\]\), "
                                         rf"got {blocks}"):
        _direct_block_op(op, caches, other)
    assert torch.equal(backing, torch.zeros_like(backing))
    assert all(torch.equal(a, b) for a, b in zip(caches, before, strict=True))


def test_direct_ops_leave_no_cache_half_written():
    """The first cache was written before torch refused the second."""
    k, v = _caches()
    key = torch.ones(1, 2, 16)
    k0 = k.clone()
    with pytest.raises(TypeError, match=r"^v_cache: expected the dtype of k_cache"):
        OPS.write_kv(key, key, k, v.half(), i32([5]), None)
    with pytest.raises(ValueError, match=r"^value: expected the shape of key"):
        OPS.write_kv(key, torch.ones(1, 2, 15), k, v, i32([5]), None)
    assert torch.equal(k, k0)
    with pytest.raises(TypeError, match=r"^caches\[1\]: expected the dtype of caches\[0\]"):
        OPS.scatter_blocks([k, v.half()], torch.ones(1, 2, 4, 2, 16), i32([3]), None)
    assert torch.equal(k, k0)
    dst = [torch.zeros_like(k), torch.zeros(8, 4, 2, 16, dtype=torch.half)]
    with pytest.raises(TypeError, match=r"^dst_caches\[1\]: expected the dtype of src_caches"):
        OPS.swap_blocks([k, v], dst, i32([1]), i32([2]), None)
    assert not dst[0].any()
    stride0 = torch.zeros(1, 4, 2, 16).expand(8, 4, 2, 16)
    with pytest.raises(ValueError, match=r"^caches\[1\]: its blocks share memory \(a stride-0"):
        OPS.copy_blocks([k, stride0], i32([1]), i32([2]), None)
    assert torch.equal(k, k0)


def test_direct_ops_check_ids_on_the_host():
    k, v = _caches()
    with pytest.raises(ValueError, match=r"^dst: "):
        OPS.copy_blocks([k, v], i32([1]), i32([8]), None)
    with pytest.raises(ValueError, match=r"^block_ids: "):
        OPS.scatter_blocks([k, v], torch.ones(1, 2, 4, 2, 16), i32([-1]), None)
    with pytest.raises(ValueError, match=r"^slot_mapping: "):
        OPS.write_kv(torch.ones(1, 2, 16), torch.ones(1, 2, 16), k, v, i32([32]), None)


# ---------------------------------------------------------------- attention, called directly


def _spa_args(kv_lens):
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(8, 4, 2, 16, generator=g) for _ in range(2))
    q = torch.randn(2, 4, 16, generator=g)
    return (q, k, v, i32([[0, 1]]), i32([8]), i32([0, 0]), i32([[2, 3], [4, 5]]),
            i32(kv_lens), None, 0.25, None, None)


def test_direct_shared_prefix_attention_checks_or_clips_garbage_lengths():
    """kv_len 2**31 - 1 looped for minutes: refused by name, or clipped with checks off."""
    with pytest.raises(ValueError, match=r"^kv_lens: expected values <= max_blocks_per_seq"):
        OPS.shared_prefix_attention(*_spa_args([3, 2**31 - 1]))
    with value_checks(False):
        out, _ = OPS.shared_prefix_attention(*_spa_args([3, 2**31 - 1]))
    args = _spa_args([3, 5])
    want = ref.shared_prefix_attention_reference(
        *(a.numpy() if isinstance(a, torch.Tensor) else a for a in args[:8]), scale=0.25)
    np.testing.assert_allclose(out[0].numpy(), want[0], rtol=1e-5, atol=1e-5)


def test_direct_attention_ops_check_options_and_shapes():
    q, k, v = torch.randn(2, 4, 16), *_caches()
    tables, lens = i32([[0, 1], [2, 3]]), i32([5, 6])
    with pytest.raises(ValueError, match=r"^scale: "):
        OPS.paged_attention(q, k, v, tables, lens, None, float("nan"), True, None, None, None)
    with pytest.raises(ValueError, match=r"^v_cache: "):
        OPS.paged_attention(q, k, v[:, :, :1], tables, lens, None, 0.25, True, None, None, None)
    with pytest.raises(ValueError, match=r"^kv_lens: "):
        OPS.paged_attention(q, k, v, tables, i32([5, 9]), None, 0.25, True, None, None, None)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match=r"^lse: expected shape"):
        OPS.paged_attention_out(q, k, v, tables, lens, None, 0.25, True, None, None, None, out,
                                torch.empty(3, 4), None)
    with pytest.raises(ValueError, match=r"^lse_b: "):
        OPS.merge_attention_states(q, torch.zeros(2, 4), q, torch.zeros(2, 3), None)
    got, _ = OPS.paged_attention(q, k, v, tables, lens, None, 0.25, True, None, None, None)
    want = ref.paged_attention_reference(q.numpy(), k.numpy(), v.numpy(), tables.numpy(),
                                         lens.numpy(), None, scale=0.25)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_direct_ops_refuse_index_tensors_with_no_data():
    q, (k, v) = torch.randn(2, 4, 16), _caches()
    meta = torch.empty(2, 2, dtype=torch.int32, device="meta")
    # one meta tensor among CPU ones: torch dispatches to the fake implementation, which
    # returned uninitialized outputs (or, for a cache op, wrote nothing) without an error
    with pytest.raises(ValueError, match=r"^block_tables: expected it on q's device cpu, got "
                                         r"meta"):
        OPS.paged_attention(q, k, v, meta, i32([5, 6]), None, 0.25, True, None, None, None)
    with pytest.raises(ValueError, match=r"^block_ids: expected it on caches\[0\]'s device"):
        OPS.gather_blocks([k, v], meta[0], None)
    with pytest.raises(ValueError, match=r"^slot_mapping: expected it on key's device"):
        OPS.write_kv(q[:1, :2], q[:1, :2], k, v, meta[0], None)


# -------------------------------------------------------------------------------- wrappers


@pytest.mark.parametrize("name", ["block_tables", "kv_lens", "q"])
def test_wrappers_refuse_meta_tensors_by_name(name):
    """Failing deep inside: "Cannot copy out of meta tensor", or a backend error naming the
    platform. Data on the meta device ("q": all of it) or an index tensor there."""
    args = {"q": torch.randn(2, 4, 16), "k_cache": _caches()[0], "v_cache": _caches()[1],
            "block_tables": i32([[0, 1], [2, 3]]), "kv_lens": i32([5, 6])}
    for n in ("q", "k_cache", "v_cache") if name == "q" else (name,):
        args[n] = torch.empty_like(args[n], device="meta")
    with pytest.raises(ValueError, match=rf"^{name}: a tensor on the meta device has no data"):
        tf.paged_attention(*args.values())


def test_wrappers_refuse_meta_index_tensors_of_every_cache_op():
    k, v = _caches()
    meta = torch.empty(1, dtype=torch.int32, device="meta")
    key = torch.ones(1, 2, 16)
    for call, name in ((lambda: tf.write_kv(key, key, k, v, meta), "slot_mapping"),
                       (lambda: tf.copy_blocks([k, v], meta, i32([1])), "src"),
                       (lambda: tf.swap_blocks([k], [v], i32([1]), meta), "dst_ids"),
                       (lambda: tf.hash_blocks(meta, 4), "tokens")):
        with pytest.raises(ValueError, match=rf"^{name}: a tensor on the meta device"):
            call()


def _overlapping_blocks():
    """8 blocks of 128 elements each starting 64 elements after the last: blocks overlap."""
    return torch.zeros(8 * 64 + 64).as_strided((8, 4, 2, 16), (64, 32, 16, 1))


@pytest.mark.parametrize("op", ["write_kv", "copy_blocks", "scatter_blocks", "swap_blocks"])
def test_destinations_whose_blocks_overlap_are_refused(op):
    """A write to block 1 landed in block 0 (only stride 0 was refused)."""
    bad, good = _overlapping_blocks(), _caches()[0]
    before = bad.clone()
    calls = {
        "write_kv": lambda: tf.write_kv(torch.ones(1, 2, 16), torch.ones(1, 2, 16), bad, good,
                                        i32([4])),
        "copy_blocks": lambda: tf.copy_blocks([good, bad], i32([0]), i32([1])),
        "scatter_blocks": lambda: tf.scatter_blocks([bad], torch.ones(1, 1, 4, 2, 16), i32([1])),
        "swap_blocks": lambda: tf.swap_blocks([good], [bad], i32([0]), i32([1])),
    }
    name = {"write_kv": "k_cache", "copy_blocks": r"caches\[1\]",
            "scatter_blocks": r"caches\[0\]", "swap_blocks": r"dst_caches\[0\]"}[op]
    with pytest.raises(ValueError, match=rf"^{name}: its blocks share memory \(an overlapping "
                                         rf"view, e\.g\. from as_strided\(\)\)"):
        calls[op]()
    assert torch.equal(bad, before)


def test_buffers_whose_elements_overlap_are_refused():
    q, (k, v) = torch.randn(2, 4, 16), _caches()
    out = torch.zeros(64).as_strided((2, 4, 16), (16, 8, 1))  # heads 8 apart, 16 wide
    with pytest.raises(ValueError, match=r"^out: its elements share memory \(an overlapping"):
        tf.paged_attention(q, k, v, i32([[0, 1], [2, 3]]), i32([5, 6]), out=out)


def _permuted(shape, order):
    """A tensor of ``shape`` laid out in memory as the axes ``order`` (a permuted view)."""
    base = torch.zeros([shape[i] for i in order])
    return base.permute([order.index(i) for i in range(len(shape))])


def test_layouts_that_reach_each_element_once_are_written():
    """Token-major caches (a permuted view), K and V interleaved by token in one buffer, and
    an interleaving no stride order proves (blocks 2 apart, 3-wide rows): each written and
    read as the numpy reference says, no element written twice."""
    key = torch.randn(3, 2, 16)
    val = torch.randn(3, 2, 16)
    slots = i32([0, 9, 31])
    token_major = _permuted((8, 4, 2, 16), [1, 0, 2, 3])
    kv = torch.zeros(8, 4, 2, 2, 16)  # [blocks, tokens, K/V, heads, dim]
    for k_cache, v_cache in ((token_major, _permuted((8, 4, 2, 16), [1, 0, 2, 3])),
                             (kv[:, :, 0], kv[:, :, 1])):
        tf.write_kv(key, val, k_cache, v_cache, slots)
        want_k, want_v = ref.write_kv_reference(key.numpy(), val.numpy(),
                                                np.zeros((8, 4, 2, 16), np.float32),
                                                np.zeros((8, 4, 2, 16), np.float32),
                                                slots.numpy())
        np.testing.assert_array_equal(k_cache.numpy(), want_k)
        np.testing.assert_array_equal(v_cache.numpy(), want_v)
    # 3 blocks of 2 elements, 3 apart, blocks 2 apart: {0, 3}, {2, 5}, {4, 7} never meet,
    # though the block stride is under a block's reach (the exact check, not the stride order)
    cache = torch.zeros(8).as_strided((3, 2), (2, 3))
    tf.scatter_blocks([cache], torch.arange(6.0).reshape(3, 1, 2), i32([0, 1, 2]))
    np.testing.assert_array_equal(cache.numpy(), np.arange(6.0).reshape(3, 2))


def test_write_kv_refuses_one_tensor_as_both_caches():
    """The values overwrote the keys."""
    kv = torch.zeros(8, 4, 2, 16)
    with pytest.raises(ValueError, match=r"^v_cache: shares memory with k_cache"):
        tf.write_kv(torch.ones(1, 2, 16), torch.full((1, 2, 16), 2.0), kv, kv, i32([5]))
    assert not kv.any()
    with pytest.raises(ValueError, match=r"^v_cache: shares memory with k_cache"):
        OPS.write_kv(torch.ones(1, 2, 16), torch.ones(1, 2, 16), kv, kv[:, :, :, :], i32([5]),
                     None)


@pytest.mark.parametrize("call", ["paged_attention", "write_kv"])
def test_an_empty_backend_name_is_an_unknown_backend(call):
    """backend="" was taken as no request."""
    q, (k, v) = torch.randn(2, 4, 16), _caches()
    with pytest.raises(BackendError, match=r"unknown backend ''"):
        if call == "paged_attention":
            tf.paged_attention(q, k, v, i32([[0, 1], [2, 3]]), i32([5, 6]), backend="")
        else:
            tf.write_kv(q[:1, :2], q[:1, :2], k, v, i32([3]), backend="")


def test_direct_ops_name_a_missing_tensor_and_an_empty_cache_list():
    """A second sweep's finds: q or k_cache None raised "'NoneType' object has no attribute
    'device'", an empty cache list an IndexError (the device checks ran before the static
    ones)."""
    q, (k, v) = torch.randn(2, 4, 16), _caches()
    with pytest.raises(TypeError, match=r"^q: expected an array, got NoneType"):
        OPS.paged_attention(None, k, v, i32([[0, 1], [2, 3]]), i32([5, 6]), None, 0.25, True,
                            None, None, None)
    with pytest.raises(TypeError, match=r"^k_cache: expected an array, got NoneType"):
        OPS.write_kv(q[:1, :2], q[:1, :2], None, v, i32([3]), None)
    for call in (lambda: OPS.copy_blocks([], i32([0]), i32([1]), None),
                 lambda: OPS.gather_blocks([], i32([0]), None),
                 lambda: OPS.scatter_blocks([], torch.zeros(1, 0), i32([0]), None)):
        with pytest.raises(ValueError, match=r"^caches: expected at least one cache"):
            call()


@pytest.mark.parametrize("where", ["src_ids", "dst_caches"])
def test_direct_swap_blocks_names_a_meta_tensor(where):
    """swap_blocks mixes devices, so its fake checks none: with one tensor on the meta device
    the op was dispatched to it and copied nothing, without an error."""
    src, dst = _caches(), [torch.zeros(8, 4, 2, 16) for _ in range(2)]
    src_ids = i32([1])
    label = where
    if where == "src_ids":
        src_ids = torch.empty(1, dtype=torch.int32, device="meta")
    else:
        dst[1], label = torch.empty_like(dst[1], device="meta"), r"dst_caches\[1\]"
    with pytest.raises(ValueError, match=rf"^{label}: a tensor on the meta device"):
        OPS.swap_blocks(src, dst, src_ids, i32([2]), None)
    assert not dst[0].any()


def test_direct_paged_attention_refuses_causal_none():
    """A bool schema turned causal=None into False: a non-causal call."""
    q, (k, v) = torch.randn(2, 4, 16), _caches()
    with pytest.raises(TypeError, match=r"^causal: expected a bool, got NoneType"):
        OPS.paged_attention(q, k, v, i32([[0, 1], [2, 3]]), i32([5, 6]), None, 0.25, None,
                            None, None, None)


def _attention_buffers_case():
    """(q, k, v, tables, kv_lens): a decode batch over float32 caches of 8 blocks, 4 q and 4
    kv heads (so q-shaped views of a cache exist)."""
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(8, 4, 4, 16, generator=g) for _ in range(2))
    q = torch.randn(2, 4, 16, generator=g)
    return q, k, v, i32([[0, 1], [2, 3]]), i32([5, 6])


@pytest.mark.parametrize("entry", ["wrapper", "op", "plan", "shared"])
def test_attention_buffers_sharing_memory_with_inputs_are_refused(entry):
    """out=, lse= and workspace= that share memory with q, a cache, sinks or each other: a
    ValueError naming both before anything is written (a kernel writing out while another of
    its programs reads q gave garbage; an out inside a cache overwrote the cache). Each
    refused again on a repeated call (the kept layouts hold the answer of a passed check
    only), and a buffer of its own still works after."""
    q, k, v, tables, kv = _attention_buffers_case()
    sinks_buf = torch.zeros(8)
    sinks = sinks_buf[4:]  # one logit per q head, lse's second row
    before = (q.clone(), k.clone(), v.clone())
    plan = tf.plan_paged_attention(tables, kv, k_cache=k, num_q_heads=4)
    empty = i32([[0], [0]])

    def call(**kw):
        if entry == "wrapper":
            return tf.paged_attention(q, k, v, tables, kv, **kw)
        if entry == "plan":
            return plan.run(q, k, v, **kw)
        if entry == "shared":
            return tf.shared_prefix_attention(q, k, v, tables[:1], i32([8]), i32([0, -1]),
                                              empty, i32([1, 1]), **kw)
        out = kw.get("out", torch.empty_like(q))
        lse = kw.get("lse", torch.empty(2, 4))
        return torch.ops.prefixkv.paged_attention_out(
            q, k, v, tables, kv, None, 0.25, True, None, None, None, out, lse,
            kw.get("workspace"), None, None, kw.get("sinks"))

    cache_view = k.view(-1, 4, 16)[:2]  # q's shape, inside k_cache
    ws = torch.empty(4096, dtype=torch.uint8)
    cases = [
        (dict(out=q), r"^out: shares memory with q"),
        (dict(out=cache_view), r"^out: shares memory with k_cache"),
        (dict(out=v.view(-1, 4, 16)[6:8]), r"^out: shares memory with v_cache"),
        (dict(lse=k.view(-1)[:8].view(2, 4), return_lse=True),
         r"^lse: shares memory with k_cache"),
        (dict(lse=sinks_buf.view(2, 4), sinks=sinks, return_lse=True),
         r"^lse: shares memory with sinks"),
        (dict(workspace=q.view(torch.uint8).view(-1)[:256]),
         r"^workspace: shares memory with q"),
    ]
    out_lse = torch.empty(2 * 4 * 16)
    cases.append((dict(out=out_lse.view(2, 4, 16), lse=out_lse[:8].view(2, 4),
                       return_lse=True), r"^lse: shares memory with out"))
    for kw, match in cases:
        if entry == "op":
            kw = {n: x for n, x in kw.items() if n != "return_lse"}
        for _ in range(2):
            with pytest.raises(ValueError, match=match):
                call(**kw)
        assert torch.equal(q, before[0]) and torch.equal(k, before[1])
        assert torch.equal(v, before[2])
    out = torch.empty_like(q)
    if entry == "op":
        call(out=out)
        want = torch.empty_like(q)
        call(out=want)
    else:
        assert call(out=out, workspace=ws).data_ptr() == out.data_ptr()
        want = call()
    torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_empty_buffers_with_zero_strides_are_taken():
    """A batch of no query token whose out= has zero strides (numpy's empty arrays, and
    empty_like of such a q, come with them) holds no element twice: taken, as a fresh empty
    tensor is; it had been refused as a stride-0 view (found by a differential fuzz)."""
    q, k, v, tables, kv = _attention_buffers_case()
    q0 = torch.from_numpy(np.zeros((0, 4, 16), np.float32))
    assert q0.stride() == (0, 0, 0)
    none = i32([0])
    for out in (torch.empty_like(q0), torch.from_numpy(np.zeros((0, 4, 16), np.float32))):
        got = tf.paged_attention(q0, k, v, tables[:0], kv[:0], none, out=out)
        assert got.shape == (0, 4, 16)
        got = tf.merge_attention_states(q0, torch.zeros(0, 4), q0, torch.zeros(0, 4), out=out)
        assert got[0].shape == (0, 4, 16)


def test_out_interleaved_with_q_in_one_buffer_is_taken():
    """q and out as the two halves of each row of one buffer reach no common element: taken
    (a comparison of byte spans had refused them), with the result of a buffer of its own
    (found by a differential fuzz);
    the other half of that buffer, q itself, is left as it was."""
    q, k, v, tables, kv = _attention_buffers_case()
    both = torch.cat([q, torch.full_like(q, float("nan"))], dim=-1)  # [2, 4, 32]
    qv, out = both[..., :16], both[..., 16:]
    got = tf.paged_attention(qv, k, v, tables, kv, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(both[..., :16], q)
    # a strided q may take another path than a contiguous one: rounding differs
    torch.testing.assert_close(out, tf.paged_attention(q, k, v, tables, kv))
