"""Torch wrapper bugs a review found (reproducers of /tmp/review_torch), each pinned here:

- copy_blocks under torch.compile over two views of one cache (layers sharing a KV cache): the
  wrapper deduplicated by object while tracing and the op copied the shared cache twice, the
  second pass reading blocks the first had written; the op now settles it on the tensors it
  runs on, so compiled equals eager and the numpy reference.
- scatter_blocks with a buffer that is a view of a destination cache: refused by name.
- copy_blocks / scatter_blocks / write_kv into a stride-0 (expand()ed) cache: refused by name
  before anything is written (copy and scatter wrote the caches before it, write_kv wrote
  silently over itself).
- gather_blocks_to_host / scatter_blocks_from_host with an empty list of ids (numpy: float64).
- hash_blocks under torch.compile(fullgraph=True): it value-checked traced tensors and hashed
  the salt's key in traced Python.
The numpy reference is the oracle; compiled calls use the aot_eager backend (no C++ build)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged.reference.hashing import hash_blocks_reference  # noqa: E402
from prefixkv.paged.validate import value_checks  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


# ------------------------------------------------------------------ copy_blocks, compiled


@pytest.mark.parametrize("layout", ["stacked_kv_shared_by_two_layers", "two_views"])
def test_compiled_copy_blocks_over_views_of_one_cache_equals_the_reference(layout):
    """A chain (block 1 both a destination and a source) over caches listed twice as different
    view objects of one memory: eager copied each memory once; compiled copied it twice."""
    torch.manual_seed(0)
    kv0 = torch.randn(5, 2, 2, 1, 4)  # [blocks, k/v, block_size, heads, head_dim]
    src, dst = torch.tensor([0, 1]), torch.tensor([1, 2])
    want = ref.copy_blocks_reference([kv0[:, 0].numpy().copy(), kv0[:, 1].numpy().copy()],
                                     src.numpy(), dst.numpy())

    if layout == "two_views":
        def step(kv):
            tf.copy_blocks([kv[:, 0], kv[:, 1], kv[:, 0][:], kv.view(5, 2, -1)[:, 1]], src, dst)
    else:
        def step(kv):
            tf.copy_blocks([c for layer in (kv, kv) for c in (layer[:, 0], layer[:, 1])],
                           src, dst)

    for run in (step, _compiled(step)):
        kv = kv0.clone()
        run(kv)
        for i in range(2):
            np.testing.assert_array_equal(kv[:, i].numpy(), want[i])


def test_copy_blocks_op_called_directly_settles_shared_memory():
    """torch.ops.prefixkv.copy_blocks without the wrapper (the path torch.compile takes): the
    op drops a cache listed again as another view and copies each memory once."""
    kv = torch.randn(4, 2, 3)
    src, dst = torch.tensor([0, 1]), torch.tensor([1, 2])
    want = ref.copy_blocks_reference([kv.numpy().copy()], src.numpy(), dst.numpy())[0]
    torch.ops.prefixkv.copy_blocks([kv, kv[:], kv.view(4, 6)], src, dst, None)
    np.testing.assert_array_equal(kv.numpy(), want)


# ------------------------------------------------------------------ scatter_blocks aliasing


def test_scatter_blocks_refuses_a_buffer_that_is_a_view_of_a_cache():
    kv = torch.randn(8, 2, 4, 2, 8)  # a FlashInfer stacked cache: caches are its K and V
    caches = [kv[:, 0], kv[:, 1]]
    before = kv.clone()
    with pytest.raises(ValueError, match=r"^buffer: shares memory with caches\[0\]; pass a copy"):
        tf.scatter_blocks(caches, kv[2:4], torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"^buffer: shares memory with caches\[1\]"):
        tf.scatter_blocks([torch.randn(8, 4, 2, 8), kv[:, 1]], kv[2:4], torch.tensor([3, 4]))
    assert torch.equal(kv, before)
    # its copy, and a buffer elsewhere in the same storage, are fine
    arena = torch.randn(20, 4, 2, 8)
    tf.scatter_blocks([arena[:8]], arena[10:12].unsqueeze(1), torch.tensor([3, 4]))
    np.testing.assert_array_equal(arena[3:5].numpy(), arena[10:12].numpy())
    want = ref.scatter_blocks_reference([c.numpy().copy() for c in caches],
                                        kv[2:4].numpy().copy(), np.array([3, 4]))
    tf.scatter_blocks(caches, kv[2:4].clone(), torch.tensor([3, 4]))
    for c, w in zip(caches, want, strict=True):
        np.testing.assert_array_equal(c.numpy(), w)


# ------------------------------------------------------------------ stride-0 caches


def _expanded(nb=6, bs=4, h=2, d=8):
    return torch.randn(nb, bs, h, d), torch.randn(1, bs, h, d).expand(nb, bs, h, d)


def test_copy_and_scatter_refuse_a_stride0_cache_before_writing():
    k, e = _expanded()
    before = k.clone()
    msg = r"^caches\[1\]: its blocks share memory \(a stride-0 view, e.g. from expand\(\)\)"
    with pytest.raises(ValueError, match=msg):
        tf.copy_blocks([k, e], torch.tensor([0, 1]), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=msg):
        tf.scatter_blocks([k, e], torch.randn(2, 2, 4, 2, 8), torch.tensor([2, 3]))
    assert torch.equal(k, before)  # caches[0] was written before torch refused caches[1]
    one = torch.randn(1, 1, 2, 8).expand(1, 4, 2, 8)  # one block whose rows share memory
    with pytest.raises(ValueError, match=r"^caches\[0\]: its elements share memory"):
        tf.scatter_blocks([one], torch.randn(1, 1, 4, 2, 8), torch.tensor([0]))


@pytest.mark.parametrize("rows", [3, 100])
def test_write_kv_refuses_a_stride0_cache(rows):
    """Silently corrupting before: every block's slots are one memory."""
    nb = 32
    k, v = torch.randn(nb, 4, 2, 8), torch.randn(1, 4, 2, 8).expand(nb, 4, 2, 8)
    before = k.clone()
    key, val = torch.randn(rows, 2, 8), torch.randn(rows, 2, 8)
    slots = torch.arange(rows) * (nb * 4 // rows)
    with pytest.raises(ValueError, match=r"^v_cache: its blocks share memory \(a stride-0"):
        tf.write_kv(key, val, k, v, slots)
    with pytest.raises(ValueError, match=r"^k_cache: its blocks share memory"):
        tf.write_kv(key, val, v, k, slots)
    assert torch.equal(k, before)


# ------------------------------------------------------------------ host copies, empty ids


@pytest.mark.parametrize("ids", [[], ()], ids=["list", "tuple"])
def test_host_copies_take_an_empty_list_of_ids(ids):
    k, v = torch.randn(4, 2, 2, 8), torch.randn(4, 2, 2, 8)
    before = [k.clone(), v.clone()]
    assert tf.gather_blocks_to_host([k, v], ids).shape == (0, 2, 2, 2, 8)
    tf.scatter_blocks_from_host([k, v], np.zeros((0, 2, 2, 2, 8), np.float32), ids)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    with pytest.raises(TypeError, match="block_ids: expected int32 or int64, got float64"):
        tf.gather_blocks_to_host([k, v], np.zeros(0))  # an explicit float array stays refused


# ------------------------------------------------------------------ hash_blocks, compiled


def test_compiled_hash_blocks_equals_eager_and_the_reference():
    """torch.compile(fullgraph=True) of the wrapper: it value-checked the traced tokens and
    cu_lens (data-dependent guards) and derived the salt's key in traced Python."""
    tokens = torch.randint(0, 1000, (40,), dtype=torch.int32)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    extra = torch.randint(0, 2**31 - 1, (4, 4), dtype=torch.int32).view(torch.uint32)
    parent = [bytes(range(32)), None]

    def step(tokens, cu, extra):
        return tf.hash_blocks(tokens, 8, cu_lens=cu, salt=b"tenant", extra=extra,
                              parent=parent)

    def one(tokens):
        return tf.hash_blocks(tokens, 8, salt="s")

    want = hash_blocks_reference(tokens.numpy(), 8, cu_lens=cu.numpy(), salt=b"tenant",
                                 extra=extra.numpy(), parent=parent)
    with value_checks():  # checked mode: still nothing traced is value-checked
        got = _compiled(step)(tokens, cu, extra)
        got_one = _compiled(one)(tokens)
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(got_one.numpy(), one(tokens).numpy())


def test_compiled_hash_blocks_still_checks_cu_lens_when_it_runs():
    """The op reads cu_lens on the host anyway: it checks it there (a kernel must never read
    past the tokens), compiled or not."""
    tokens = torch.randint(0, 1000, (40,), dtype=torch.int32)
    f = _compiled(lambda t, c: tf.hash_blocks(t, 8, cu_lens=c))
    with pytest.raises(ValueError, match=r"cu_lens: expected cu_lens\[-1\] == num_tokens"):
        f(tokens, torch.tensor([0, 17, 41], dtype=torch.int32))
