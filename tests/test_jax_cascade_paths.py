"""The decode fast paths of XLA cascade (shared-prefix) attention against the numpy reference.

The own part of a decode batch runs, on CPU when the compiled FFI kernels build, the decode
paged attention handler of ``kernels/cpu``; elsewhere (and with them off) with short own KV
:func:`_xla.short_decode_attention` (QK with the keys as rows, PV with the group's q heads as
rows, the small score tile transposed between them behind an optimization barrier), with
long own KV the generic ragged loop. These cases go through the public op on both CPU paths,
assert which was taken, and cover the edges: group sizes 1 and odd, own KV of one token, of
the whole table and longer than the short path takes, padding slots and padding table
entries holding NaN, tokens with no prefix, an empty prefix, a prefix shorter than its
table, soft cap, and float32 / bfloat16 / float16 caches.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from prefixkv.jax_frontend import _xla  # noqa: E402
from prefixkv.kernels.cpu import xla_ffi  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged import testing  # noqa: E402

from prefixkv import jax_frontend as jf  # noqa: E402

_close = testing.assert_attention_close
_close_lse = testing.assert_lse_close


def _nan_block(batch) -> int:
    """A pool block holding no token (all NaN)."""
    k = np.asarray(batch.k_cache, np.float32)
    return int(np.flatnonzero(np.isnan(k).all(axis=(1, 2, 3)))[0])


# (prefix blocks per prefix, seqs as (prefix id, q_len 1, own kv_len), heads (q, kv), kwargs)
# block_size 4: own kv_len 5, 9, 7 end inside a block whose later slots hold NaN.
CASES = {
    "one_prefix_softcap": ([3], [(0, 1, 5), (0, 1, 1), (-1, 1, 9), (0, 1, 12)], (8, 2),
                           dict(logits_soft_cap=3.0)),
    "group_1": ([2], [(0, 1, 7), (-1, 1, 2), (0, 1, 3)], (3, 3), {}),
    "group_5_odd": ([2], [(0, 1, 7), (0, 1, 4), (0, 1, 1)], (10, 2), {}),
    "empty_prefix": ([0], [(0, 1, 3), (-1, 1, 6), (0, 1, 9)], (8, 2), {}),
    "no_token_has_it": ([2], [(-1, 1, 5), (-1, 1, 1)], (8, 2), {}),
    "several_prefixes": ([2, 1, 3], [(2, 1, 5), (0, 1, 3), (-1, 1, 7), (2, 1, 1), (1, 1, 12)],
                         (8, 2), dict(logits_soft_cap=5.0)),
    # own KV past SHORT_DECODE_MAX_TOKENS: the generic loop when the FFI kernel is off
    "long_own_kv": ([2], [(0, 1, 4 * 130 + 3), (0, 1, 2), (-1, 1, 9)], (8, 2), {}),
}


def _always_cascade(monkeypatch):
    """The CPU runs the XLA cascade for any prefix group (the thresholds of
    _xla.CPU_CASCADE_MIN_SCORES send small ones through paged attention)."""
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", 0)


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


#: every case in float32 and bfloat16; float16 (the other 16-bit conversion) in two
OWN_PART_CASES = [(c, d) for c in CASES for d in ("float32", "bfloat16")] + [
    ("one_prefix_softcap", "float16"), ("several_prefixes", "float16")]


@pytest.mark.parametrize("case,dtype", OWN_PART_CASES, ids=[f"{c}-{d}" for c, d in OWN_PART_CASES])
@pytest.mark.parametrize("path", ["ffi", "xla"])
def test_decode_cascade_own_part(case, dtype, path, monkeypatch):
    if path == "ffi" and not xla_ffi.available():
        pytest.skip(f"CPU FFI kernels: {xla_ffi.cpu_cache_ops_path()}")
    if path == "xla":
        monkeypatch.setattr(xla_ffi, "use_for_attention", lambda *a: False)
    _always_cascade(monkeypatch)  # these small batches would run as paged attention on a CPU
    jax.clear_caches()  # the public op is jitted: trace again under the patches
    ffi_calls = _counting(monkeypatch, xla_ffi, "paged_attention_decode")
    short_calls = _counting(monkeypatch, _xla, "short_decode_attention")
    prefix_blocks, seqs, (hq, hkv), kw = CASES[case]
    rng = np.random.default_rng(31)
    batch = testing.make_shared_prefix_batch(rng, prefix_blocks, seqs, num_q_heads=hq,
                                             num_kv_heads=hkv, head_dim=32, block_size=4,
                                             dtype=dtype)
    nan = _nan_block(batch)
    # prefix tables wider than the prefixes (prefix_len shorter than the table) and own
    # tables with a spare column, both padded with the NaN block: never read as a key
    batch.prefix_block_tables = np.pad(batch.prefix_block_tables, ((0, 0), (0, 1)),
                                       constant_values=nan)
    batch.block_tables = np.ascontiguousarray(
        np.pad(batch.block_tables, ((0, 0), (0, 1)), constant_values=nan))
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), return_lse=True, **kw)
    out, lse = jf.shared_prefix_attention(*batch.args(), return_lse=True, **kw)
    short = case != "long_own_kv"
    if path == "ffi":
        assert ffi_calls, "the FFI decode kernel was not taken"
    else:
        assert not ffi_calls and bool(short_calls) == short
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    _close(out, want, dtype)
    _close_lse(lse, want_lse)


@pytest.mark.parametrize("seqs_per_step", [1, 2, 4])
@pytest.mark.parametrize("group", [1, 4])
def test_short_decode_attention_steps(seqs_per_step, group):
    """The own part alone: one token and the whole table per sequence, steps of 1, 2 and 4
    sequences (the last step padded with empty sequences), NaN in padding slots."""
    rng = np.random.default_rng(32)
    batch = testing.make_ragged_batch(rng, [(1, 1), (1, 12), (1, 7), (1, 3), (1, 10)],
                                      num_q_heads=2 * group, num_kv_heads=2, head_dim=32,
                                      block_size=4, max_blocks_per_seq=3)
    want, want_lse = ref.paged_attention_reference(*batch.args(), scale=0.3,
                                                   logits_soft_cap=2.0, return_lse=True)
    out, lse = jax.jit(lambda q, k, v, t, n: _xla.short_decode_attention(
        q, k, v, t, n, scale=0.3, logits_soft_cap=2.0, seqs_per_step=seqs_per_step))(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.kv_lens)
    _close(out, want, "float32")
    _close_lse(lse, want_lse)


@pytest.mark.parametrize("heads_in_sequence", [True, False], ids=["per_head", "batched"])
@pytest.mark.parametrize("dtype,kw", [("float32", dict(sliding_window=13)),
                                      ("bfloat16", dict(logits_soft_cap=3.0)),
                                      ("float16", dict(causal=False))])
def test_ragged_prefill_loop_layouts(heads_in_sequence, dtype, kw):
    """Both layouts of the prefill loop (one kv head per step, CPU's default; all heads per
    step, the accelerators') against the reference: many-row tiles, ragged lengths, several
    chunks per tile, NaN padding."""
    rng = np.random.default_rng(33)
    batch = testing.make_ragged_batch(rng, [(40, 90), (3, 3), (17, 60), (0, 5)],
                                      num_q_heads=8, num_kv_heads=2, head_dim=32, block_size=8,
                                      dtype=dtype, sliding_window=kw.get("sliding_window"))
    want, want_lse = ref.paged_attention_reference(*batch.args(), scale=0.2, return_lse=True,
                                                   **kw)
    out, lse = jax.jit(lambda *a: _xla.ragged_paged_attention(
        *a, scale=0.2, q_tile=16, chunk_tokens=16, heads_in_sequence=heads_in_sequence,
        **kw))(*batch.args())
    _close(out, want, dtype)
    _close_lse(lse, want_lse)


def _entry(hlo: str) -> str:
    start = hlo.index("\nENTRY ")
    return hlo[start:hlo.index("\n}", start)]


@pytest.mark.parametrize("prefix_blocks", [[4], [4, 2]], ids=["single", "multi"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_cache_not_copied_whole(prefix_blocks, dtype):
    """16-bit caches are read as uint16 bits inside the loops (fused into each step's gather):
    the compiled cascade op holds no whole-cache uint16 array outside them (the single-prefix
    kernel with one chunk once copied both caches whole on every call, 25 MB at 32 x 2048,
    1.4x the whole op's time in bf16, 1.8x in f16), and its result is unchanged."""
    rng = np.random.default_rng(33)
    seqs = [(p % len(prefix_blocks), 1, 3 + p) for p in range(6)]
    batch = testing.make_shared_prefix_batch(rng, prefix_blocks, seqs, num_q_heads=8,
                                             num_kv_heads=2, head_dim=32, block_size=4,
                                             dtype=dtype)
    args = [jnp.asarray(a) for a in batch.args()[:-1]]
    fn = jax.jit(lambda *a: jf.shared_prefix_attention(*a))
    whole = "u16[" + ",".join(map(str, batch.k_cache.shape)) + "]"
    assert whole not in _entry(fn.lower(*args).compile().as_text())
    _close(fn(*args), ref.shared_prefix_attention_reference(*batch.args()), dtype)


_SHARD_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
from prefixkv.paged import testing, reference as ref
from prefixkv.jax_frontend import _xla
from prefixkv.kernels.cpu import xla_ffi

rng = np.random.default_rng(34)
b = testing.make_shared_prefix_batch(rng, [3], [(0, 1, 5), (0, 1, 9), (-1, 1, 3), (0, 1, 12)],
                                     num_q_heads=8, num_kv_heads=4, head_dim=32, block_size=4)
want, want_lse = ref.shared_prefix_attention_reference(*b.args(), return_lse=True)
mesh = Mesh(np.array(jax.devices()), ("kv",))
args = [jnp.asarray(a) for a in b.args()[:-1]]
heads, rep = P(None, "kv"), P()
for check_vma in (True, False):
    fn = jax.jit(jax.shard_map(
        lambda *a: _xla.shared_prefix_attention(*a, None, scale=32 ** -0.5), mesh=mesh,
        in_specs=(heads, P(None, None, "kv"), P(None, None, "kv"), rep, rep, rep, rep, rep),
        out_specs=(heads, heads), check_vma=check_vma))
    out, lse = fn(*args)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-4, rtol=1e-5)
    hlo = fn.lower(*args).compile().as_text()
    assert ("prefixkv_cpu_paged_attention_decode" in hlo) == xla_ffi.available()
print("OK")
"""


def test_shard_map_kv_heads_both_vma_modes():
    """Cascade decode inside shard_map with the kv heads sharded over 4 host devices, with and
    without check_vma: the FFI own part's results are cast to the mesh axes the XLA branch
    varies over, so both platform branches agree (a subprocess: the device count is fixed
    when jax starts)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("dtype,tokens,prefix_len,pays", [
    ("float32", 8, 2048, True),     # 32 rows x 2048 keys = 2**16
    ("float32", 8, 1024, False),    # 2**15 score elements
    ("float32", 4, 8192, False),    # 16 rows, under CPU_CASCADE_MIN_ROWS
    ("bfloat16", 8, 4096, False),   # 16-bit caches need twice the rows
    ("bfloat16", 16, 2048, True),   # 64 rows x 2048 keys = 2**17
    ("bfloat16", 16, 1024, False),  # 2**16: half the score elements 16-bit caches need
], ids=lambda x: str(x))
def test_cpu_cascade_rule(dtype, tokens, prefix_len, pays):
    """The CPU's choice between the XLA cascade and paged attention: some prefix group must
    reach CPU_CASCADE_MIN_ROWS rows and CPU_CASCADE_MIN_SCORES score elements (twice both for
    16-bit caches); tokens of no prefix and a small second group do not count."""
    group = 4
    q = jnp.zeros((tokens + 3, 8 * group, 16), dtype)
    k = jnp.zeros((4, 16, 8, 16), dtype)
    # prefix 0 has `tokens` decode tokens, prefix 1 one token, two tokens have none
    ids = jnp.asarray([0] * tokens + [1, -1, -1], jnp.int32)
    lens = jnp.asarray([prefix_len, prefix_len], jnp.int32)
    cu = jnp.arange(tokens + 4, dtype=jnp.int32)
    assert bool(_xla._cascade_pays(q, k, lens, ids, cu)) == pays
    prefill = 2 * cu  # two tokens for every sequence: twice the rows per group
    assert bool(_xla._cascade_pays(q, k, lens, ids, prefill)) == (
        (2 * tokens) * group >= 32 * (2 if dtype == "bfloat16" else 1)
        and (2 * tokens) * group * prefix_len >= 2**16 * (2 if dtype == "bfloat16" else 1))


def test_prefix_then_own_tables():
    """Each sequence's prefix blocks then its own, kv_lens grown by the prefix; sequences of
    no prefix keep their table."""
    ptab = np.array([[7, 8, 9], [4, 0, 0]], np.int32)
    plens = np.array([3 * 4, 1 * 4], np.int32)
    pids = np.array([0, -1, 1, 0], np.int32)
    own = np.array([[1, 2], [3, 0], [5, 6], [10, 0]], np.int32)
    kv = np.array([6, 2, 8, 1], np.int32)
    tables, kv_all = _xla.prefix_then_own_tables(*map(jnp.asarray, (ptab, plens, pids, own, kv)),
                                                 4)
    tables = np.asarray(tables)
    np.testing.assert_array_equal(np.asarray(kv_all), [18, 2, 12, 13])
    for s, want in enumerate([[7, 8, 9, 1, 2], [3], [4, 5, 6], [7, 8, 9, 10]]):
        np.testing.assert_array_equal(tables[s, :len(want)], want)


@pytest.mark.parametrize("regime", ["cascade", "paged"])
@pytest.mark.parametrize("decode", [True, False])
def test_cpu_cascade_rule_both_ways_match_reference(monkeypatch, regime, decode):
    """The same batch through the cascade and through paged attention over prefix + own
    tables (thresholds 0 / out of reach): both equal the reference, tokens of no prefix and
    a prefix shorter than its table included."""
    least = 0 if regime == "cascade" else 10**9
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", least)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", least)
    jax.clear_caches()
    rng = np.random.default_rng(34)
    seqs = [(0, 1, 5), (1, 1, 3), (-1, 1, 9), (0, 1, 12), (1, 1, 1)]
    if not decode:
        seqs = [(p, q + 2, kv + 2) for p, q, kv in seqs]
    batch = testing.make_shared_prefix_batch(rng, [3, 2], seqs, num_q_heads=8, num_kv_heads=2,
                                             head_dim=32, block_size=4,
                                             decode=decode)
    batch.prefix_block_tables = np.pad(batch.prefix_block_tables, ((0, 0), (0, 1)),
                                       constant_values=_nan_block(batch))
    assert bool(_xla._cascade_pays(
        jnp.asarray(batch.q), jnp.asarray(batch.k_cache), jnp.asarray(batch.prefix_lens),
        jnp.asarray(batch.prefix_ids),
        jnp.arange(len(seqs) + 1) if decode else jnp.asarray(batch.cu_q_lens))) == (
            regime == "cascade")
    want, want_lse = ref.shared_prefix_attention_reference(*batch.args(), return_lse=True)
    out, lse = jf.shared_prefix_attention(*batch.args(), return_lse=True, backend="xla")
    _close(out, want, "float32")
    _close_lse(lse, want_lse)
    jax.clear_caches()


# ---------------------------------------------------- gaps found by mutation testing


@pytest.mark.parametrize("backend", ["xla"])
def test_merge_two_empty_states_ignore_their_out_values(backend):
    """Rows where both states are empty (lse -inf, or +inf: FlashAttention-2's empty rows)
    give out 0 whatever their out holds: a kernel's empty rows may hold NaN or garbage
    (here NaN, inf, 1e30). test_merge_attention_states uses finite outs there, where
    0 * out is 0 anyway (mutant x_merge_outmask: the final where(seen, out, 0) dropped)."""
    rng = np.random.default_rng(12)
    oa, ob = (rng.standard_normal((4, 3, 16)).astype(np.float32) for _ in range(2))
    la, lb = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(2))
    la[0], lb[0] = -np.inf, -np.inf
    la[1], lb[1] = np.inf, -np.inf
    la[2, 0], lb[2, 0] = np.inf, np.inf
    oa[0], ob[0] = np.nan, np.inf
    oa[1], ob[1] = 1e30, np.nan
    oa[2, 0], ob[2, 0] = -np.inf, np.nan
    want_o, want_l = ref.merge_attention_states_reference(oa, la, ob, lb)
    assert not np.isnan(want_o).any()
    got_o, got_l = jf.merge_attention_states(oa, la, ob, lb, backend=backend)
    np.testing.assert_array_equal(np.asarray(got_o)[:2], 0.0)
    np.testing.assert_array_equal(np.asarray(got_o)[2, 0], 0.0)
    np.testing.assert_allclose(np.asarray(got_o), want_o, atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(np.isneginf(np.asarray(got_l)), np.isneginf(want_l))


def test_cpu_cascade_rule_routes_each_way(monkeypatch):
    """On CPU the cascade runs only when _cascade_pays says so, else paged attention over
    prefix-then-own tables. Both give the reference's values, so the value tests cannot tell
    which ran: the cascade's prefix kernel is replaced by one returning NaN, which must spoil
    the result exactly when the cascade is meant to run (mutant x_cascade_cond_swap: the lax.cond
    branches swapped; test_cpu_cascade_rule checks the predicate alone)."""
    rng = np.random.default_rng(41)
    batch = testing.make_shared_prefix_batch(rng, [2], [(0, 1, 3), (0, 1, 5)], num_q_heads=4,
                                             num_kv_heads=2, head_dim=16, block_size=4)

    def poisoned(q, *a, **k):
        n, h, _ = q.shape
        return (jnp.full(q.shape, jnp.nan, jnp.float32),
                jnp.full((n, h), jnp.nan, jnp.float32))

    monkeypatch.setattr(_xla, "single_prefix_attention", poisoned)
    monkeypatch.setattr(_xla, "multi_prefix_attention", poisoned)
    args = [jnp.asarray(a) for a in batch.args()[:8]]
    want = ref.shared_prefix_attention_reference(*batch.args(), scale=0.25)

    def run():
        return jax.jit(lambda *a: _xla.shared_prefix_attention(*a, None, scale=0.25))(*args)

    out, _ = run()  # 2 tokens x 2 q heads per kv head: far below the rule -> paged attention
    testing.assert_attention_close(out, want, "float32")
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_ROWS", 0)
    monkeypatch.setattr(_xla, "CPU_CASCADE_MIN_SCORES", 0)
    out, _ = run()  # the rule now says the cascade pays: the poisoned prefix pass runs (its
    assert not np.allclose(np.asarray(out), want, atol=1e-2)  # NaN lse merges to out 0)
