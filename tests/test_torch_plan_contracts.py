"""Contracts of the torch frontend's attention plans (torch_frontend._plan and the torch
backend's ``shared_prefix_attention.plan_groups`` hook) that tests/test_torch_plan.py leaves
open, found by mutation testing: the op gets the wrapper's arguments exactly (options,
clipped unchecked lengths, backend), each planned property of q and the caches is held on
the fast path too, per-layer fp8 scales and sinks are checked as in the wrapper, int64
metadata at int32's limits, shared-prefix plans own their metadata on every route, and the
CPU's prefix groups are settled as the backend settles them (group size, element size,
partly dissolved batches, no fused kernel)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from prefixkv.paged import testing, validate  # noqa: E402
from prefixkv.paged.registry import BackendError  # noqa: E402
from prefixkv.torch_frontend import _native, _ops  # noqa: E402
from torch_convert import T  # noqa: E402

from prefixkv import torch_frontend as tf  # noqa: E402


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)


def _same_results(got, want):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _same(g, w)
    else:
        _same(got, want)


class _Stop(Exception):
    """Raised by the spy instead of running the op."""


def _op_calls(monkeypatch):
    """Record (op name, arguments) of every attention op call, without running it."""
    calls = []

    def spy(name, args, direct=False):
        calls.append((name, args))
        raise _Stop

    monkeypatch.setattr(_ops, "_invoke", spy)
    return calls


def _call_of(calls, fn, *args, **kwargs):
    calls.clear()
    with pytest.raises(_Stop):
        fn(*args, **kwargs)
    assert len(calls) == 1
    return calls[0]


def _same_call(got, want):
    """Two op calls with the same op and equal arguments (tensors: dtype, shape, values)."""
    assert got[0] == want[0]
    assert len(got[1]) == len(want[1])
    for i, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
        if isinstance(w, torch.Tensor):
            assert isinstance(g, torch.Tensor), i
            assert g.dtype == w.dtype and g.shape == w.shape, i
            assert g.device == w.device, i
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=str(i))
        else:
            assert type(g) is type(w) and g == w, (i, g, w)


def _ragged(seed=0, grid="mixed", bs=16, **kw):
    rng = np.random.default_rng(seed)
    b = testing.make_ragged_batch(rng, testing.seq_grid(grid, bs), block_size=bs, **kw)
    meta = [T(a) for a in b.args()[3:]]
    return b, T(b.q), T(b.k_cache), T(b.v_cache), meta


def _shared(seed=0, decode=False, dtype="float32"):
    rng = np.random.default_rng(seed)
    sp = testing.small_shared_prefix_batch(rng, decode)
    q, k, v = (T(x) for x in (sp.q, sp.k_cache, sp.v_cache))
    if dtype != "float32":
        q, k, v = (x.to(getattr(torch, dtype)) for x in (q, k, v))
    return sp, q, k, v, [T(a) for a in sp.args()[3:]]


# ------------------------------------------------------- the op gets the wrapper's arguments


@pytest.mark.parametrize("opts", [
    {"backend": "torch"},
    {"causal": False, "scale": 0.3, "backend": "torch"},
    {"sliding_window": 5, "logits_soft_cap": 3.0},
], ids=lambda o: ",".join(o))
@pytest.mark.parametrize("grid", ["mixed", "decode"])
def test_paged_plan_hands_the_op_the_wrappers_arguments(monkeypatch, grid, opts):
    """The same custom op as the wrapper, with the same arguments: the backend choice
    included (on the CPU None and "torch" give the same kernel, so only the arguments tell)."""
    _, q, k, v, meta = _ragged(1, grid)
    calls = _op_calls(monkeypatch)
    plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1], **opts)
    want = _call_of(calls, tf.paged_attention, q, k, v, *meta, **opts)
    _same_call(_call_of(calls, plan.run, q, k, v), want)


def test_unchecked_plans_clip_lengths_as_the_wrapper(monkeypatch):
    """Value checks off: kv_lens (and a shared plan's prefix_lens) past the tables' capacity
    reach the op clipped to it, as from the wrapper (the op is not run here)."""
    _, q, k, v, meta = _ragged(2)
    meta[1][0] = 10_000  # past max_blocks_per_seq * block_size
    calls = _op_calls(monkeypatch)
    with validate.value_checks(False):
        plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
        want = _call_of(calls, tf.paged_attention, q, k, v, *meta)
    assert int(want[1][4][0]) < 10_000
    _same_call(_call_of(calls, plan.run, q, k, v), want)

    sp, q, k, v, smeta = _shared(3)
    # prefix tables 3 blocks wide, the own ones 1 (each own kv_len fits a block): each
    # length clipped to its own table's capacity
    smeta[3] = smeta[3][:, :1].contiguous()
    assert smeta[0].shape[1] == 3
    smeta[1][1] = 5_000
    smeta[4][0] = 7_000
    for opts in ({"logits_soft_cap": 2.0}, {"sliding_window": 4}):  # the wrapper's own routes
        with validate.value_checks(False):
            plan = tf.plan_shared_prefix_attention(*smeta, k_cache=k, num_q_heads=q.shape[1],
                                                   **opts)
            want = _call_of(calls, tf.shared_prefix_attention, q, k, v, *smeta, **opts)
        _same_call(_call_of(calls, plan.run, q, k, v), want)


@pytest.mark.parametrize("opts", [
    {"sliding_window": 6, "logits_soft_cap": 2.0, "backend": "torch"},
    {"logits_soft_cap": 2.0, "backend": "torch", "scale": 0.2},
], ids=["window,soft_cap", "cascade,soft_cap"])
def test_shared_prefix_plan_hands_the_op_the_wrappers_arguments(monkeypatch, opts):
    """The routes the plan shares with the wrapper (a window: paged attention over the joined
    tables; a soft cap: the cascade op as given): the same op, the same arguments, the soft
    cap and the backend with the window too."""
    _, q, k, v, meta = _shared(4)
    calls = _op_calls(monkeypatch)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1], **opts)
    want = _call_of(calls, tf.shared_prefix_attention, q, k, v, *meta, **opts)
    _same_call(_call_of(calls, plan.run, q, k, v), want)


def test_dissolved_shared_prefix_plan_keeps_the_backend(monkeypatch):
    """A CPU plan whose groups all dissolve runs paged attention with the backend it was
    given (and the wrapper's scale, causal, no window)."""
    _, q, k, v, meta = _shared(5, decode=True)
    calls = _op_calls(monkeypatch)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1],
                                           backend="torch", scale=0.25)
    assert plan.op == "paged_attention"
    name, args = _call_of(calls, plan.run, q, k, v)
    assert name == "paged_attention"
    assert args[6:] == (0.25, True, None, None, "torch")


def test_shared_prefix_plan_without_prefixes_keeps_the_soft_cap():
    """No prefix at all and a soft cap: the plan runs paged attention with the cap, the
    wrapper's result bit for bit."""
    rng = np.random.default_rng(6)
    sp = testing.make_shared_prefix_batch(rng, [], [(-1, 1, 3), (-1, 2, 9), (-1, 1, 5)],
                                          num_q_heads=4, num_kv_heads=2, head_dim=32,
                                          block_size=8)
    meta = [T(a) for a in sp.args()[3:]]
    q, k, v = T(sp.q), T(sp.k_cache), T(sp.v_cache)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=4, logits_soft_cap=1.5)
    want = tf.shared_prefix_attention(q, k, v, *meta, logits_soft_cap=1.5, return_lse=True)
    _same_results(plan.run(q, k, v, return_lse=True), want)


# ---------------------------------------------------------------------------- making a plan


def test_plan_refuses_a_bool_num_q_heads():
    _, _, k, _, meta = _ragged(7)
    with pytest.raises(TypeError, match="num_q_heads: expected an int, got bool"):
        tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=True)
    with pytest.raises(TypeError, match="num_q_heads: expected an int, got bool"):
        tf.plan_shared_prefix_attention(*_shared(7)[4], k_cache=_shared(7)[2], num_q_heads=True)


def test_plan_names_a_negative_num_q_heads():
    _, _, k, _, meta = _ragged(7)
    with pytest.raises(ValueError, match="num_q_heads"):
        tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=-2)


def test_plan_names_a_malformed_cu_q_lens_as_the_wrapper():
    """A cu_q_lens of another rank, or empty, gets the static check's error (naming it), not
    an indexing error from reading its last entry."""
    _, q, k, v, (tables, lens, cu) = _ragged(8)
    for bad in (cu[None], cu[:0], cu[:, None]):
        with pytest.raises(ValueError, match="cu_q_lens: expected") as want:
            tf.paged_attention(q, k, v, tables, lens, bad)
        with pytest.raises(ValueError, match="cu_q_lens: expected") as got:
            tf.plan_paged_attention(tables, lens, bad, k_cache=k, num_q_heads=q.shape[1])
        assert str(got.value) == str(want.value)


def test_unchecked_plan_builds_from_a_negative_token_count():
    """Value checks off, garbage cu_q_lens (its last entry negative) is taken as the wrapper
    takes it: the plan is made (q's token count is then free), no error from torch."""
    _, q, k, _, (tables, lens, cu) = _ragged(9)
    cu = cu.clone()
    cu[-1] = -3
    with validate.value_checks(False):
        plan = tf.plan_paged_attention(tables, lens, cu, k_cache=k, num_q_heads=q.shape[1])
    assert plan.op == "paged_attention"


def test_shared_prefix_plan_refuses_a_backend_when_made_with_a_window():
    _, q, k, _, meta = _shared(10)
    for opts in ({"sliding_window": 4}, {}):
        with pytest.raises(BackendError, match="triton"):
            tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1],
                                            backend="triton", **opts)


# ------------------------------------------------------------------------------ int64 metadata


def test_int64_metadata_at_int32s_limits():
    """Values at int32's bounds fit (an unused table entry may hold any); empty int64 tensors
    (no prefix) are cast; with value checks off values outside int32 are cast as given."""
    _, q, k, v, meta32 = _ragged(11)
    want = tf.paged_attention(q, k, v, *meta32)
    # sequence 4 (q 1, kv 1) uses one block of its 4: its last entries are never read
    for edge in (2**31 - 1, -(2**31)):
        meta64 = [t.long() for t in meta32]
        meta64[0][4, 3] = edge
        plan = tf.plan_paged_attention(*meta64, k_cache=k, num_q_heads=q.shape[1])
        _same(plan.run(q, k, v), want)
    meta64 = [t.long() for t in meta32]
    meta64[0][4, 3] = 2**32 + 1  # unused entry, wraps to 1
    with validate.value_checks(False):
        plan = tf.plan_paged_attention(*meta64, k_cache=k, num_q_heads=q.shape[1])
    _same(plan.run(q, k, v), want)

    rng = np.random.default_rng(12)
    sp = testing.make_shared_prefix_batch(rng, [], [(-1, 1, 3), (-1, 1, 9)], num_q_heads=4,
                                          num_kv_heads=2, head_dim=32, block_size=8)
    smeta = [T(a) for a in sp.args()[3:]]
    sq, sk, sv = T(sp.q), T(sp.k_cache), T(sp.v_cache)
    splan = tf.plan_shared_prefix_attention(*(None if t is None else t.long() for t in smeta),
                                            k_cache=sk, num_q_heads=4)
    _same(splan.run(sq, sk, sv), tf.shared_prefix_attention(sq, sk, sv, *smeta))


# ---------------------------------------------------------------- what run holds to the plan


@pytest.mark.parametrize("what", ["v_cache shape", "k_cache dtype", "v_cache dtype", "q device",
                                  "v_cache device", "q heads", "k_cache duck", "v_cache duck"])
def test_plan_run_refuses_what_differs_from_the_plan(what):
    """Each planned property of q and the caches is held, by name; the mismatches here would
    read only memory in range if let through (more blocks, another 16-bit dtype)."""
    _, q, k, v, meta = _ragged(13, dtype="bfloat16")
    plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1])

    class Duck:  # a planned tensor's shape, dtype and device, but no tensor
        def __init__(self, t):
            self.shape, self.dtype, self.device = t.shape, t.dtype, t.device

    args = {"q": q, "k_cache": k, "v_cache": v}
    name, kind = what.split()
    t = args[name]
    err, pattern = {
        "shape": (ValueError, f"{name}: expected the planned shape"),
        "heads": (ValueError, f"{name}: expected the planned shape"),
        "dtype": (TypeError, f"{name}: expected the planned bfloat16"),
        "device": (ValueError, "device"),
        "duck": (TypeError, f"{name}: expected a torch.Tensor"),
    }[kind]
    args[name] = {
        "shape": lambda: torch.cat([t, t[:1]]),
        "heads": lambda: torch.cat([t, t], dim=1),
        "dtype": lambda: t.view(torch.float16),
        "device": lambda: t.to("meta"),
        "duck": lambda: Duck(t),
    }[kind]()
    with pytest.raises(err, match=pattern):
        plan.run(args["q"], args["k_cache"], args["v_cache"])


def test_plan_run_refuses_inputs_all_on_another_device():
    """q and both caches together on a device other than the planned one (so that they agree
    with each other): the planned device is held, not only their agreement."""
    _, q, k, v, meta = _ragged(24)
    plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    with pytest.raises(ValueError, match="k_cache: expected it on the planned device cpu"):
        plan.run(q.to("meta"), k.to("meta"), v.to("meta"))


def test_unchecked_plan_still_holds_q_heads():
    """Value checks off, q's token count is free, its heads and head_dim are not."""
    _, q, k, v, meta = _ragged(14)
    with validate.value_checks(False):
        plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        plan.run(torch.cat([q, q], dim=1), k, v)


def test_unchecked_shared_prefix_plans_hold_the_token_count_as_the_wrapper():
    """Value checks off: a decode plan holds q to num_seqs, a ragged one takes any count (as
    the paged plans)."""
    _, q, k, v, meta = _shared(15, decode=True)
    with validate.value_checks(False):
        plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    with pytest.raises(ValueError, match="q: expected the planned shape"):
        plan.run(q[1:], k, v)
    _, q, k, v, meta = _shared(15, decode=False)
    with validate.value_checks(False):
        plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
        longer = torch.cat([q, q[:1]])
        _same(plan.run(longer, k, v), tf.shared_prefix_attention(longer, k, v, *meta))


# ------------------------------------------------------------------------ per-layer arguments


def test_plan_run_checks_fp8_scales_as_the_wrapper():
    """A Python float scale is checked statically (the value checks see only tensors): the
    plan names each bad one as the wrapper does."""
    b, _, _, _, meta = _ragged(16, nan_fill=False)
    q = T(b.q).to(torch.bfloat16)
    k8, v8 = (T(x).to(torch.float8_e4m3fn) for x in (b.k_cache, b.v_cache))
    plan = tf.plan_paged_attention(*meta, k_cache=k8, num_q_heads=q.shape[1],
                                   dtype=torch.bfloat16)
    for name in ("k_scale", "v_scale"):
        for bad, err in ((-1.0, ValueError), (0.0, ValueError), (float("inf"), ValueError),
                         (True, TypeError)):
            with pytest.raises(err, match=name) as want:
                tf.paged_attention(q, k8, v8, *meta, **{name: bad})
            with pytest.raises(err, match=name) as got:
                plan.run(q, k8, v8, **{name: bad})
            assert str(got.value) == str(want.value)


def test_plan_run_takes_a_numpy_bool_return_lse():
    _, q, k, v, meta = _ragged(17)
    plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    _same_results(plan.run(q, k, v, return_lse=np.True_),
                  tf.paged_attention(q, k, v, *meta, return_lse=np.True_))


def test_plan_run_refuses_sinks_on_another_device():
    _, q, k, v, meta = _ragged(18)
    plan = tf.plan_paged_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    with pytest.raises(ValueError, match="sinks: expected it on q's device"):
        plan.run(q, k, v, sinks=torch.zeros(q.shape[1], device="meta"))


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_shared_prefix_plan_equals_the_wrapper(decode, dtype):
    """fp8 caches: the plan leaves the prefix groups to the backend, which settles them per
    call (dequantizing the blocks it reads); the wrapper's result bit for bit."""
    sp, _, _, _, meta = _shared(25, decode=decode)
    q = T(sp.q).to(dtype)
    k8, v8 = (T(x).nan_to_num().to(torch.float8_e4m3fn) for x in (sp.k_cache, sp.v_cache))
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k8, num_q_heads=q.shape[1],
                                           dtype=dtype)
    assert plan.op == "shared_prefix_attention"
    for ks, vs in ((None, None), (0.5, 2.0)):
        _same_results(plan.run(q, k8, v8, k_scale=ks, v_scale=vs, return_lse=True),
                      tf.shared_prefix_attention(q, k8, v8, *meta, k_scale=ks, v_scale=vs,
                                                 return_lse=True))


# ------------------------------------------------------------------- shared-prefix plans' metadata


@pytest.mark.parametrize("route", ["dissolved", "kept", "window"])
def test_shared_prefix_plan_keeps_its_own_metadata(monkeypatch, route):
    """The caller's buffers refilled after planning (with other valid ids) change nothing,
    on each of the plan's routes."""
    if route == "kept":
        monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", 0)
        monkeypatch.setattr(_native, "CASCADE_MIN_SEQS", 1)
        monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", 0)
    opts = {"sliding_window": 5} if route == "window" else {}
    _, q, k, v, meta = _shared(19)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1], **opts)
    assert plan.op == ("shared_prefix_attention" if route == "kept" else "paged_attention")
    want = tf.shared_prefix_attention(q, k, v, *meta, **opts)
    ptab, plens, pids, tables, lens, cu = meta
    ptab.fill_(0)
    tables.fill_(0)
    pids.fill_(-1)
    cu[1:-1] = cu[-1]  # every token to the first sequence: a valid split, another result
    lens[0] = lens.max()
    _same(plan.run(q, k, v), want)


# ----------------------------------------------------------------- CPU prefix groups (plan_groups)


def _thresholds(monkeypatch, rows, scores=0):
    monkeypatch.setattr(_native, "CASCADE_MIN_ROWS", rows)
    monkeypatch.setattr(_native, "CASCADE_MIN_SCORES", scores)


@pytest.mark.parametrize("decode", [True, False])
def test_partly_dissolved_groups_equal_the_wrapper(monkeypatch, decode):
    """Thresholds between the two groups' rows (tokens x q heads per kv head): the larger
    group stays, the other is read through its sequences' tables, renumbered; the plan runs
    the cascade over that metadata, the wrapper's result bit for bit. Counting rows without
    the group size (2) would dissolve both."""
    _thresholds(monkeypatch, 4)
    _, q, k, v, meta = _shared(20, decode=decode)  # prefix 0: 2 sequences; prefix 1: 1
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    assert plan.op == "shared_prefix_attention"
    _same_results(plan.run(q, k, v, return_lse=True),
                  tf.shared_prefix_attention(q, k, v, *meta, return_lse=True))


@pytest.mark.parametrize(("min_rows", "op"), [(4, "shared_prefix_attention"),
                                             (5, "paged_attention")])
def test_groups_count_rows_per_kv_head(monkeypatch, min_rows, op):
    """A group's rows are its tokens times the q heads of a kv head (4 / 2): prefix 0's two
    decode tokens make 4 rows, so it stays at CASCADE_MIN_ROWS 4 and dissolves at 5 (then
    with prefix 1's 2 rows every group has: paged attention), as in the backend."""
    _thresholds(monkeypatch, min_rows)
    _, q, k, v, meta = _shared(26, decode=True)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    assert plan.op == op
    _same_results(plan.run(q, k, v, return_lse=True),
                  tf.shared_prefix_attention(q, k, v, *meta, return_lse=True))


def test_16bit_caches_count_groups_with_the_factor(monkeypatch):
    """bfloat16 caches need CASCADE_16BIT_FACTOR times the rows: a group that a float32
    cache keeps dissolves, and the plan runs paged attention as the backend does."""
    _thresholds(monkeypatch, 4)
    for dtype, op in (("float32", "shared_prefix_attention"), ("bfloat16", "paged_attention")):
        _, q, k, v, meta = _shared(21, decode=True, dtype=dtype)
        plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
        assert plan.op == op, dtype
        _same_results(plan.run(q, k, v, return_lse=True),
                      tf.shared_prefix_attention(q, k, v, *meta, return_lse=True))


def test_no_fused_cpu_kernel_keeps_the_groups(monkeypatch):
    """Without torch's fused CPU kernel the backend dissolves no group: neither does the
    plan (the cascade op, the wrapper's result)."""
    monkeypatch.setattr(_native, "_flash_cpu", lambda: None)
    _, q, k, v, meta = _shared(22, decode=True)
    plan = tf.plan_shared_prefix_attention(*meta, k_cache=k, num_q_heads=q.shape[1])
    assert plan.op == "shared_prefix_attention"
    _same_results(plan.run(q, k, v, return_lse=True),
                  tf.shared_prefix_attention(q, k, v, *meta, return_lse=True))


def test_plan_groups_leaves_other_devices_metadata_alone():
    """The hook changes metadata only for a CPU cache with metadata on the host (elsewhere
    the backend runs the groups as given): a cache or metadata on another device ("meta"
    here) gets the inputs back as they are."""
    _, q, k, _, meta = _shared(23, decode=False)
    hook = _native.shared_prefix_attention.plan_groups
    hq = q.shape[1]
    host = hook(hq, k, None, *meta)
    assert host[0].shape[0] == 0  # on the CPU this small batch dissolves
    got = hook(hq, k.to("meta"), None, *meta)
    assert all(g is m for g, m in zip(got, meta[:5], strict=True))
    dev = [m.to("meta") for m in meta[:5]]
    got = hook(hq, k, None, *dev, meta[5])
    assert all(g is m for g, m in zip(got, dev, strict=True))
    got = hook(hq, k, None, *meta[:5], meta[5].to("meta"))
    assert all(g is m for g, m in zip(got, meta[:5], strict=True))
