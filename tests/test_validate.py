"""One pytest.raises per input check of paged/validate.py, through the numpy reference."""

import numpy as np
import pytest
from prefixkv.paged import testing, validate
from prefixkv.paged.reference import (
    copy_blocks_reference,
    gather_blocks_reference,
    merge_attention_states_reference,
    paged_attention_reference,
    scatter_blocks_reference,
    shared_prefix_attention_reference,
    write_kv_reference,
)


def batch(seqs=((2, 5), (1, 9)), **kw):
    kw.setdefault("block_size", 4)
    return testing.make_ragged_batch(np.random.default_rng(0), list(seqs), **kw)


def attention_call(**changes):
    rb = batch()
    args = dict(q=rb.q, k_cache=rb.k_cache, v_cache=rb.v_cache, block_tables=rb.block_tables,
                kv_lens=rb.kv_lens, cu_q_lens=rb.cu_q_lens)
    args.update(changes)
    return lambda **kw: paged_attention_reference(**args, **kw)


RB = batch()
I32 = np.int32

ATTENTION_CASES = [
    # (argument changes, keyword options, exception, message pattern)
    ({"q": RB.q[0]}, {}, ValueError, r"q: expected 3 dimensions"),
    ({"q": RB.q.astype(np.float64)}, {}, TypeError, r"q: expected float32 or float16 or bfloat16, got float64"),
    ({"q": RB.q.astype(np.float16)}, {}, TypeError, r"k_cache: expected the dtype of q \(float16\), got float32"),
    ({"q": RB.q[:, :, :32]}, {}, ValueError, r"q: expected head_dim 64 \(from k_cache\), got 32"),
    ({"q": RB.q[:, :3]}, {}, ValueError, r"q: num_q_heads=3 must be divisible by num_kv_heads=2 .*NHD; an HND cache .* cache\.permute\(0, 2, 1, 3\) in torch, or with kv_layout='HND' in JAX"),
    ({"k_cache": RB.k_cache[0]}, {}, ValueError, r"k_cache: expected 4 dimensions"),
    ({"k_cache": np.zeros(RB.k_cache.shape, np.int32)}, {}, TypeError, r"k_cache: expected float32"),
    ({"v_cache": RB.v_cache[:, :2]}, {}, ValueError, r"v_cache: expected the shape of k_cache"),
    ({"v_cache": RB.v_cache.astype(np.float16)}, {}, TypeError, r"v_cache: expected the dtype of k_cache"),
    ({"k_cache": RB.k_cache[:0], "v_cache": RB.v_cache[:0]}, {}, ValueError, r"k_cache: expected non-empty"),
    ({"block_tables": RB.block_tables.astype(np.int64)}, {}, TypeError, r"block_tables: expected int32, got int64 \(indices are int32 in prefixkv: cast with \.astype\(np\.int32\) or, in torch, \.to\(torch\.int32\); the plans take int64 and cast once\)"),
    ({"k_cache": np.stack([RB.k_cache, RB.v_cache], 1)}, {}, ValueError, r"k_cache: expected 4 dimensions, got shape \(\d+, 2, 4, 2, 64\): a stacked K/V cache\? pass its halves, k_cache, v_cache = kv\[:, 0\], kv\[:, 1\] \(torch views: no copy\)"),
    ({"k_cache": np.stack([RB.k_cache, RB.v_cache])}, {}, ValueError, r"k_cache: expected 4 dimensions, got shape \(2, \d+, 4, 2, 64\): a stacked K/V cache\? pass its halves, k_cache, v_cache = kv\[0\], kv\[1\]"),
    ({"block_tables": RB.block_tables[0]}, {}, ValueError, r"block_tables: expected 2 dimensions"),
    ({"kv_lens": RB.kv_lens.astype(np.int64)}, {}, TypeError, r"kv_lens: expected int32, got int64"),
    ({"kv_lens": RB.kv_lens[:1]}, {}, ValueError, r"kv_lens: expected shape \(2,\)"),
    ({"cu_q_lens": RB.cu_q_lens[:2]}, {}, ValueError, r"cu_q_lens: expected shape \(3,\)"),
    ({"cu_q_lens": RB.cu_q_lens.astype(np.float32)}, {}, TypeError, r"cu_q_lens: expected int32"),
    ({"cu_q_lens": None}, {}, ValueError, r"q: with cu_q_lens=None \(decode\) expected one token per sequence"),
    ({"cu_q_lens": np.array([1, 2, 3], I32)}, {}, ValueError, r"cu_q_lens: expected cu_q_lens\[0\] == 0"),
    ({"cu_q_lens": np.array([0, 3, 2], I32)}, {}, ValueError, r"cu_q_lens: expected non-decreasing"),
    ({"cu_q_lens": np.array([0, 1, 2], I32)}, {}, ValueError, r"cu_q_lens: expected cu_q_lens\[-1\] == num_tokens \(3\)"),
    ({"kv_lens": np.array([-1, 9], I32)}, {}, ValueError, r"kv_lens: expected values >= 0"),
    ({"kv_lens": np.array([1, 9], I32)}, {}, ValueError, r"kv_lens: expected kv_lens\[s\] >= q_len"),
    ({"kv_lens": np.array([5, 13], I32)}, {}, ValueError, r"kv_lens: expected values <= max_blocks_per_seq \* block_size \(12\)"),
    ({"block_tables": np.array([[0, 99, 0], [1, 2, 3]], I32)}, {}, ValueError, r"block_tables: expected block ids in \[0, 8\) for the blocks in use, got 99 at \[0, 1\]"),
    ({"block_tables": np.array([[0, -1, 0], [1, 2, 3]], I32)}, {}, ValueError, r"block_tables: expected block ids in \[0, 8\)"),
    ({}, {"scale": -1.0}, ValueError, r"scale: expected a finite value > 0"),
    ({}, {"scale": "big"}, TypeError, r"scale: expected a float or None"),
    ({}, {"sliding_window": 0}, ValueError, r"sliding_window: expected >= 1"),
    ({}, {"sliding_window": -1}, ValueError, r"sliding_window: expected >= 1, got -1 \(None turns it off, where others pass -1\)"),
    ({}, {"logits_soft_cap": 0.0}, ValueError, r"logits_soft_cap: expected a finite value > 0, got 0.0 \(None turns it off, where others pass 0\)"),
    ({}, {"sliding_window": 2.5}, TypeError, r"sliding_window: expected an int or None"),
    ({}, {"sliding_window": 4, "causal": False}, ValueError, r"sliding_window: only defined for causal=True"),
    ({}, {"logits_soft_cap": float("inf")}, ValueError, r"logits_soft_cap: expected a finite value > 0"),
    # float32 kernels: a larger cap rounds to inf (inf * tanh(0) is NaN in every row)
    ({}, {"logits_soft_cap": 1e39}, ValueError, r"logits_soft_cap: expected at most 3.4028235e\+38 \(float32's largest"),
    ({}, {"logits_soft_cap": 1e37}, ValueError, r"logits_soft_cap: expected at most 2\*\*100 \(1.2676506e\+30: logits divided"),
    ({}, {"scale": 1e39}, ValueError, r"scale: expected at most 3.4028235e\+38"),
    # XLA:CPU flushes subnormals to zero: the CPU decode kernel saw such a cap as 0 (none)
    ({}, {"logits_soft_cap": 1e-39}, ValueError, r"logits_soft_cap: expected at least 1.1754944e-38 \(float32's smallest normal"),
    # int32 positions: a larger window overflowed when passed into a jitted computation
    ({}, {"sliding_window": 2**31}, ValueError, r"sliding_window: expected at most 2\*\*31 - 1 \(int32 positions\), got 2147483648"),
    ({}, {"causal": 1}, TypeError, r"causal: expected a bool"),
    ({}, {"return_lse": "yes"}, TypeError, r"return_lse: expected a bool"),
    ({"q": [[[1.0]]]}, {}, TypeError, r"q: expected an array, got list"),
]


@pytest.mark.parametrize("changes,options,exc,match", ATTENTION_CASES,
                         ids=[c[3][:40] for c in ATTENTION_CASES])
def test_paged_attention_checks(changes, options, exc, match):
    with pytest.raises(exc, match=match):
        attention_call(**changes)(**options)


def test_unused_block_table_entries_are_not_checked():
    # padding entries past a sequence's used blocks may hold anything (e.g. -1)
    rb = batch(seqs=((1, 1), (1, 9)))
    rb.block_tables[0, 1:] = -1
    paged_attention_reference(*rb.args())


SB = testing.make_shared_prefix_batch(np.random.default_rng(1), [2, 1], [(0, 1, 3), (1, 2, 2)],
                                      block_size=4)

SHARED_CASES = [
    ({"prefix_block_tables": SB.prefix_block_tables.astype(np.int64)}, TypeError, r"prefix_block_tables: expected int32"),
    ({"prefix_lens": SB.prefix_lens[:1]}, ValueError, r"prefix_lens: expected shape \(2,\)"),
    ({"prefix_ids": SB.prefix_ids[:1]}, ValueError, r"prefix_ids: expected shape \(2,\)"),
    ({"prefix_lens": np.array([6, 4], I32)}, ValueError, r"prefix_lens: expected non-negative multiples of block_size \(4\)"),
    ({"prefix_lens": np.array([12, 4], I32)}, ValueError, r"prefix_lens: expected values <= max_prefix_blocks \* block_size \(8\)"),
    ({"prefix_ids": np.array([0, 2], I32)}, ValueError, r"prefix_ids: expected values in \[-1, 2\)"),
    ({"prefix_ids": np.array([-2, 0], I32)}, ValueError, r"prefix_ids: expected values in \[-1, 2\)"),
    ({"prefix_block_tables": np.array([[0, 50], [1, 1]], I32)}, ValueError, r"prefix_block_tables: expected block ids in \[0, \d+\)"),
]


@pytest.mark.parametrize("changes,exc,match", SHARED_CASES, ids=[c[2][:40] for c in SHARED_CASES])
def test_shared_prefix_checks(changes, exc, match):
    args = dict(q=SB.q, k_cache=SB.k_cache, v_cache=SB.v_cache,
                prefix_block_tables=SB.prefix_block_tables, prefix_lens=SB.prefix_lens,
                prefix_ids=SB.prefix_ids, block_tables=SB.block_tables, kv_lens=SB.kv_lens,
                cu_q_lens=SB.cu_q_lens)
    args.update(changes)
    with pytest.raises(exc, match=match):
        shared_prefix_attention_reference(**args)


def test_small_prefix_fast_path_gives_the_numpy_verdict(monkeypatch):
    """The list checks of a small cascade's prefix metadata (validate._small_prefixes_ok) pass
    exactly the batches the numpy checks pass: a valid batch with one or two entries changed
    to values at and past each bound (prefix lengths negative, not whole blocks, at and past
    the table; prefix ids -2, -1, the last and past it; block ids -1, 0, the last and past it,
    in the used entries and past them)."""
    rng = np.random.default_rng(5)
    dims = validate.check_shared_prefix_attention(
        SB.q, SB.k_cache, SB.v_cache, SB.prefix_block_tables, SB.prefix_lens, SB.prefix_ids,
        SB.block_tables, SB.kv_lens, SB.cu_q_lens)
    bs, num_blocks = dims.attention.block_size, dims.attention.num_blocks
    capacity = dims.max_prefix_blocks * bs
    fast_path = validate._small_prefixes_ok
    verdicts = []
    for _ in range(300):
        table, plens, pids = (SB.prefix_block_tables.copy(), SB.prefix_lens.copy(),
                              SB.prefix_ids.copy())
        for _ in range(int(rng.integers(1, 3))):
            kind = rng.integers(3)
            if kind == 0:
                plens[rng.integers(plens.size)] = rng.choice(
                    [-bs, 0, bs - 1, bs, capacity, capacity + bs])
            elif kind == 1:
                pids[rng.integers(pids.size)] = rng.choice(
                    [-2, -1, dims.num_prefixes - 1, dims.num_prefixes])
            else:
                table[rng.integers(table.shape[0]), rng.integers(table.shape[1])] = rng.choice(
                    [-1, 0, num_blocks - 1, num_blocks])
        fast = fast_path(plens.astype(np.int64), pids.astype(np.int64), table, dims)
        try:  # the numpy checks alone
            with monkeypatch.context() as m:
                m.setattr(validate, "_small_prefixes_ok", lambda *a: False)
                validate.check_shared_prefix_attention_values(dims, table, plens, pids,
                                                              SB.block_tables, SB.kv_lens,
                                                              SB.cu_q_lens)
            passed = True
        except ValueError:
            passed = False
        assert fast == passed, (table, plens, pids)
        verdicts.append(passed)
    assert 0.2 < np.mean(verdicts) < 0.8


OUT = np.zeros((3, 2, 4), np.float32)
LSE = np.zeros((3, 2), np.float32)
MERGE_CASES = [
    ((OUT, LSE, OUT[:2], LSE), ValueError, r"out_b: expected the shape of out_a"),
    ((OUT, LSE, OUT.astype(np.float16), LSE), TypeError, r"out_b: expected the dtype of out_a"),
    ((OUT, LSE.astype(np.float16), OUT, LSE), TypeError, r"lse_a: expected float32, got float16"),
    ((OUT, LSE, OUT, LSE[:, :1]), ValueError, r"lse_b: expected shape \(3, 2\)"),
    ((OUT[0], LSE, OUT[0], LSE), ValueError, r"out_a: expected 3 dimensions"),
]


@pytest.mark.parametrize("args,exc,match", MERGE_CASES, ids=[c[2][:30] for c in MERGE_CASES])
def test_merge_checks(args, exc, match):
    with pytest.raises(exc, match=match):
        merge_attention_states_reference(*args)


KC = np.zeros((4, 2, 2, 8), np.float32)
KEY = np.zeros((3, 2, 8), np.float32)
SLOTS = np.array([0, 1, 2], I32)
WRITE_CASES = [
    ((KEY[:, :1], KEY[:, :1], KC, KC, SLOTS), ValueError, r"key: expected \[num_tokens, 2, 8\]"),
    ((KEY, KEY[:2], KC, KC, SLOTS), ValueError, r"value: expected the shape of key"),
    ((KEY.astype(np.float16), KEY.astype(np.float16), KC, KC, SLOTS), TypeError, r"key: expected the dtype of k_cache \(float32\), got float16"),
    ((KEY, KEY, KC, KC, SLOTS.astype(np.uint32)), TypeError, r"slot_mapping: expected int32 or int64, got uint32"),
    ((KEY, KEY, KC, KC, np.zeros(4, I32)), ValueError, r"slot_mapping: expected at most num_tokens \(3\) entries"),
    ((KEY, KEY, KC, KC, np.array([0, 8, 1], I32)), ValueError, r"slot_mapping: expected slots < num_blocks \* block_size \(8\)"),
    ((KEY, KEY, KC, KC, np.array([3, -1, 3], I32)), ValueError, r"slot_mapping: expected distinct destinations, got 3 2 times \(give padding tokens slot -1: they are skipped\)"),
    ((KEY, KEY, KC, KC[:, :1], SLOTS), ValueError, r"v_cache: expected the shape of k_cache"),
]


@pytest.mark.parametrize("args,exc,match", WRITE_CASES, ids=[c[2][:30] for c in WRITE_CASES])
def test_write_kv_checks(args, exc, match):
    with pytest.raises(exc, match=match):
        write_kv_reference(*args)


def test_write_kv_failure_leaves_cache_untouched():
    kc = np.zeros((4, 2, 2, 8), np.float32)
    with pytest.raises(ValueError):
        write_kv_reference(np.ones_like(KEY), np.ones_like(KEY), kc, kc, np.array([0, 99, 1], I32))
    assert not kc.any()


CS = [np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float32)]
COPY_CASES = [
    ((CS, np.array([0], I32), np.array([1, 2], I32)), ValueError, r"dst: expected shape \(1,\)"),
    ((CS, np.array([0], np.int16), np.array([1], I32)), TypeError, r"src: expected int32 or int64, got int16"),
    ((CS, np.array([0], I32), np.array([2**32 + 1], np.int64)), ValueError, r"dst: expected values in \[0, 4\), got 4294967297 at index 0"),
    ((CS, np.array([4], I32), np.array([1], I32)), ValueError, r"src: expected values in \[0, 4\), got 4 at index 0"),
    ((CS, np.array([0], I32), np.array([-1], I32)), ValueError, r"dst: expected values in \[0, 4\)"),
    ((CS, np.array([0, 1], I32), np.array([2, 2], I32)), ValueError, r"dst: expected distinct destinations"),
    (([], np.array([0], I32), np.array([1], I32)), ValueError, r"caches: expected at least one cache"),
    ((CS[0], np.array([0], I32), np.array([1], I32)), TypeError, r"caches: expected a list or tuple of arrays, got ndarray"),
    (([CS[0], np.zeros((5, 3), np.float32)], np.array([0], I32), np.array([1], I32)), ValueError, r"caches\[1\]: expected 4 blocks"),
]


@pytest.mark.parametrize("args,exc,match", COPY_CASES, ids=[c[2][:30] for c in COPY_CASES])
def test_copy_blocks_checks(args, exc, match):
    with pytest.raises(exc, match=match):
        copy_blocks_reference(*args)


GATHER_CASES = [
    ((CS, np.array([9], I32)), ValueError, r"block_ids: expected values in \[0, 4\)"),
    (([CS[0], np.zeros((4, 2), np.float32)], np.array([0], I32)), ValueError, r"caches\[1\]: expected block shape \(3,\)"),
    (([CS[0], np.zeros((4, 3), np.float16)], np.array([0], I32)), TypeError, r"caches\[1\]: expected the dtype of caches\[0\]"),
    ((CS, np.array([[0]], I32)), ValueError, r"block_ids: expected 1 dimensions"),
]


@pytest.mark.parametrize("args,exc,match", GATHER_CASES, ids=[c[2][:30] for c in GATHER_CASES])
def test_gather_blocks_checks(args, exc, match):
    with pytest.raises(exc, match=match):
        gather_blocks_reference(*args)


BUF = np.zeros((2, 2, 3), np.float32)
SCATTER_CASES = [
    ((CS, BUF[:, :1], np.array([0, 1], I32)), ValueError, r"buffer: expected shape \(2, 2, 3\)"),
    ((CS, BUF.astype(np.float16), np.array([0, 1], I32)), TypeError, r"buffer: expected the dtype of caches\[0\]"),
    ((CS, BUF, np.array([1, 1], I32)), ValueError, r"block_ids: expected distinct destinations"),
    ((CS, BUF, np.array([0, 4], I32)), ValueError, r"block_ids: expected values in \[0, 4\)"),
]


@pytest.mark.parametrize("args,exc,match", SCATTER_CASES, ids=[c[2][:30] for c in SCATTER_CASES])
def test_scatter_blocks_checks(args, exc, match):
    with pytest.raises(exc, match=match):
        scatter_blocks_reference(*args)


SRC = [np.zeros((4, 3), np.float32), np.zeros((4, 2, 2), np.float16)]
HOST = [np.zeros((9, 3), np.float32), np.zeros((9, 2, 2), np.float16)]  # more blocks: fine
IDS = np.array([0, 1], I32)
SWAP_CASES = [
    ((SRC, [HOST[0], np.zeros((9, 2, 3), np.float16)], IDS, IDS), ValueError,
     r"dst_caches\[1\]: expected block shape \(2, 2\) \(from src_caches\[1\]\), got \(2, 3\)"),
    ((SRC, [HOST[0], HOST[1].astype(np.float32)], IDS, IDS), TypeError,
     r"dst_caches\[1\]: expected the dtype of src_caches\[1\]"),
    ((SRC, HOST, IDS, IDS[:1]), ValueError,
     r"dst_ids: expected shape \(2,\) \(the shape of src_ids\), got \(1,\)"),
    ((SRC, HOST[:1], IDS, IDS), ValueError, r"dst_caches: expected 2 caches \(as src_caches\)"),
    (([np.float32(1)], HOST[:1], IDS, IDS), ValueError,
     r"src_caches\[0\]: expected the block axis first, got a scalar"),
]


@pytest.mark.parametrize("args,exc,match", SWAP_CASES, ids=[c[2][:30] for c in SWAP_CASES])
def test_swap_blocks_checks(args, exc, match):
    assert validate.check_swap_blocks(SRC, HOST, IDS, IDS) == 2
    with pytest.raises(exc, match=match):
        validate.check_swap_blocks(*args)


def test_value_checks_mode(monkeypatch):
    monkeypatch.delenv(validate.ENV_VALUE_CHECKS, raising=False)
    assert validate.value_checks_enabled(host_inputs=True)
    assert not validate.value_checks_enabled(host_inputs=False)
    with validate.value_checks():
        assert validate.value_checks_enabled(host_inputs=False)
        with validate.value_checks(False):
            assert not validate.value_checks_enabled(host_inputs=True)
    monkeypatch.setenv(validate.ENV_VALUE_CHECKS, "1")
    assert validate.value_checks_enabled(host_inputs=False)
    monkeypatch.setenv(validate.ENV_VALUE_CHECKS, "0")
    assert not validate.value_checks_enabled(host_inputs=True)


def test_registry_names_missing_packages_and_asks_once(monkeypatch):
    """A backend whose package is missing is refused with its name and the next one runs;
    whether a package is installed is asked once per process (find_spec of a package not yet
    imported searches sys.path: tens of microseconds a call)."""
    import importlib.util

    from prefixkv.paged import registry

    reg = registry.Registry("probe_op")
    reg.register(registry.Backend("fast", ("cpu",), lambda: "fast", priority=10,
                                  requires=("prefixkv_no_such_package",)))
    reg.register(registry.Backend("plain", ("cpu",), lambda: "plain"))
    asked = []
    find_spec = importlib.util.find_spec
    registry.installed.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: asked.append(name) or
                        find_spec(name))
    for _ in range(3):
        assert reg.select("cpu").name == "plain"
    assert asked == ["prefixkv_no_such_package"]
    assert reg.explain("cpu")["fast"] == "needs the package(s) prefixkv_no_such_package"
    with pytest.raises(registry.BackendError, match="needs the package"):
        reg.select("cpu", "fast")
    registry.installed.cache_clear()



def test_registry_keeps_each_answer_and_still_follows_every_input(monkeypatch):
    """A selection is kept per (platform, requested backend, context) and asked of the
    backends once; another platform, context value, argument or environment variable, and a
    new registration, each get their own answer; a refusal is raised every time."""
    from prefixkv.paged import registry

    asked = []

    def small_only(*, tokens, **_):
        asked.append(tokens)
        return (tokens <= 8, "needs tokens <= 8")

    reg = registry.Registry("probe_op")
    reg.register(registry.Backend("fast", ("cpu",), lambda: "fast", priority=10,
                                  supports=small_only))
    reg.register(registry.Backend("plain", ("cpu", "cuda"), lambda: "plain"))
    for _ in range(3):
        assert reg.select("cpu", tokens=4).name == "fast"
    assert asked == [4]
    assert reg.select("cpu", tokens=64).name == "plain" and asked == [4, 64]
    assert reg.select("cuda", tokens=4).name == "plain"
    assert reg.select("cpu", "plain", tokens=4).name == "plain"
    monkeypatch.setenv("PREFIXKV_PROBE_OP_BACKEND", "plain")
    assert reg.select("cpu", tokens=4).name == "plain"
    monkeypatch.setenv("PREFIXKV_PROBE_OP_BACKEND", "fast")
    for _ in range(2):
        with pytest.raises(registry.BackendError, match="needs tokens <= 8"):
            reg.select("cpu", tokens=64)
    monkeypatch.delenv("PREFIXKV_PROBE_OP_BACKEND")
    assert reg.select("cpu", tokens=4).name == "fast"
    reg.register(registry.Backend("faster", ("cpu",), lambda: "faster", priority=20))
    assert reg.select("cpu", tokens=4).name == "faster"
    assert reg.select("cpu", tokens=64, note=[1]).name == "faster"  # unhashable: asked anew
    assert asked[-1] == 64

def test_global_backend_variable_applies_to_the_ops_that_have_that_backend(monkeypatch):
    """PREFIXKV_BACKEND names a backend for every op that has one of that name; an op without
    it keeps its own selection (a global pallas_interpret broke merge_attention_states and
    hash_blocks). The per-op variable and the argument stay strict, and a refused request
    says why in its first line."""
    from prefixkv.paged import registry

    reg = registry.Registry("probe_op")
    reg.register(registry.Backend("fast", ("cpu",), lambda: "fast", priority=10,
                                  supports=lambda tokens: (tokens <= 8, "needs tokens <= 8")))
    reg.register(registry.Backend("plain", ("cpu",), lambda: "plain"))
    monkeypatch.setenv("PREFIXKV_BACKEND", "elsewhere_only")
    assert reg.requested() is None and reg.select("cpu", tokens=4).name == "fast"
    monkeypatch.setenv("PREFIXKV_BACKEND", "plain")
    assert reg.requested() == "plain" and reg.select("cpu", tokens=4).name == "plain"
    monkeypatch.setenv("PREFIXKV_BACKEND", "fast")
    with pytest.raises(registry.BackendError,
                       match=r"^probe_op on platform 'cpu': backend 'fast' cannot run: needs "
                             r"tokens <= 8; backends:\n"):
        reg.select("cpu", tokens=64)
    monkeypatch.setenv("PREFIXKV_PROBE_OP_BACKEND", "elsewhere_only")
    with pytest.raises(registry.BackendError, match="unknown backend 'elsewhere_only'"):
        reg.select("cpu", tokens=4)
    monkeypatch.delenv("PREFIXKV_PROBE_OP_BACKEND")
    with pytest.raises(registry.BackendError, match="unknown backend 'elsewhere_only'"):
        reg.select("cpu", "elsewhere_only", tokens=4)


def test_dtype_names_are_cached_per_kind():
    """dtype_name caches by (type, dtype): a string that compares equal to a numpy dtype
    (np.dtype("float64") == "float") keeps its own name, in either order."""
    from prefixkv.paged.spec import dtype_name

    assert dtype_name("float") == "float" and dtype_name(np.dtype("float64")) == "float64"
    assert dtype_name(np.zeros(1)) == "float64" and dtype_name("float") == "float"
    import ml_dtypes

    assert dtype_name(np.zeros(1, ml_dtypes.bfloat16)) == "bfloat16"
    assert dtype_name(np.float16) == "float16" and dtype_name([1]) == "[1]"  # unhashable
