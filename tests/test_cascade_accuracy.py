"""Shared-prefix attention in 16 bits where the prefix and own parts' outputs are large and
cancel: value rows of mean +16 over a 512-token prefix and -16 over each sequence's 512 own
tokens, 256 decode sequences (enough query rows for the CPU paths' cascade). The own part was
rounded to q's dtype before the merge, one rounding of a partial output near 16: the result
passed ATTENTION_TOLERANCE (2x) where paged attention over the joined tables stays inside it.
Both frontends' CPU paths, against float64."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from prefixkv.paged import spec

SEQS, PREFIX, OWN, HQ, HKV, D, BS = 256, 512, 512, 8, 1, 64, 16


def _batch(dtype: str):
    rng = np.random.default_rng(7)
    pb, ob = PREFIX // BS, OWN // BS
    nb = pb + SEQS * ob
    ids = rng.permutation(nb).astype(np.int32)
    prefix_table, own = ids[:pb][None], ids[pb:].reshape(SEQS, ob)
    q = rng.standard_normal((SEQS, HQ, D))
    k = rng.standard_normal((nb, BS, HKV, D))
    v = rng.standard_normal((nb, BS, HKV, D))
    v[prefix_table[0]] += 16.0
    v[own.ravel()] -= 16.0
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    q, k, v = (x.astype(np_dtype) for x in (q, k, v))
    # float64 truth over the concatenation (prefix blocks, then own blocks)
    tables = np.concatenate([np.repeat(prefix_table, SEQS, 0), own], axis=1)
    keys = k.astype(np.float64)[tables].reshape(SEQS, -1, D)
    vals = v.astype(np.float64)[tables].reshape(SEQS, -1, D)
    s = np.einsum("shd,skd->shk", q.astype(np.float64), keys) * D ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("shk,skd->shd", p / p.sum(-1, keepdims=True), vals)
    meta = (prefix_table, np.array([PREFIX], np.int32), np.zeros(SEQS, np.int32), own,
            np.full(SEQS, OWN, np.int32))
    return (q, k, v, *meta), want


def _close(got, want, dtype):
    atol, rtol = spec.ATTENTION_TOLERANCE[dtype]
    err = np.abs(np.asarray(got, np.float64) - want) - rtol * np.abs(want)
    assert err.max() <= atol, f"{dtype}: error {err.max() + atol:.3g} over tolerance {atol}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_cascade_keeps_the_own_part_unrounded(dtype):
    torch = pytest.importorskip("torch")
    from prefixkv.torch_frontend._host import from_numpy

    from prefixkv import torch_frontend as tf

    args, want = _batch(dtype)
    got = tf.shared_prefix_attention(*(from_numpy(a) for a in args))
    _close(got.to(torch.float64).numpy(), want, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_jax_cascade_keeps_the_own_part_unrounded(dtype):
    jnp = pytest.importorskip("jax.numpy")
    from prefixkv import jax_frontend as jf

    args, want = _batch(dtype)
    got = jf.shared_prefix_attention(*(jnp.asarray(a) for a in args))
    _close(np.asarray(got.astype(jnp.float32)), want, dtype)
