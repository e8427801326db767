"""The models issue: a JAX and a PyTorch decoder serving a request stream through prefixkv.

- generations and final logits with prefix caching on equal those with caching off, in each
  framework (offload/onboard and shared_prefix_attention exercised on the way);
- the JAX, torch and numpy-reference models with the same weights agree;
- preemption under a tight pool, salt isolation, the workload's shape, the demo's main();
- requests admitted in one step hit the prefix blocks an earlier one's chunk writes in the
  same forward, and no read slot is ever unwritten or rewritten (preemption, free);
- open-loop (Poisson) arrivals: seeded, no admission before arrival, TTFT from arrival, the
  closed loop's generations, the closed loop by default (a fake clock: no sleeping).
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefixkv.models import (
    Engine,
    EngineConfig,
    LlamaConfig,
    WorkloadConfig,
    init_weights,
    make_adapter,
    make_workload,
)
from prefixkv.models.workload import Request, shared_prefix_fraction

CFG = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2,
                  head_dim=32, intermediate_size=96, max_model_len=256)
WORK = WorkloadConfig(system_prompt_len=48, chats_per_tenant=3, turns=3, user_len=8,
                      assistant_len=8, num_unique=3, unique_len=20, max_new_tokens=3)
# one token bucket (32) keeps the JAX compiles to two (paged and shared-prefix variants)
ENGINE = EngineConfig(block_size=8, num_blocks=30, max_num_seqs=3, max_num_batched_tokens=32,
                      max_model_len=256, host_blocks=64, min_token_bucket=32)
# float32 model, f32 attention tolerance of the op contract, widened for 2 layers + lm_head
LOGIT_TOL = 1e-4


def _frontend_ready(framework: str) -> bool:
    if framework == "numpy":
        return True
    try:
        mod = importlib.import_module(f"prefixkv.{framework}_frontend")
    except ImportError:
        return False
    return all(hasattr(mod, op) for op in ("paged_attention", "shared_prefix_attention",
                                            "write_kv", "gather_blocks", "scatter_blocks"))


FRAMEWORKS = [
    pytest.param("numpy", id="numpy"),
    pytest.param("jax", id="jax", marks=pytest.mark.skipif(
        importlib.util.find_spec("jax") is None or not _frontend_ready("jax"),
        reason="jax or prefixkv.jax_frontend not available")),
    pytest.param("torch", id="torch", marks=pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or not _frontend_ready("torch"),
        reason="torch or prefixkv.torch_frontend not available")),
]

_RUNS: dict = {}


def serve(framework: str, caching: bool, engine: EngineConfig = ENGINE, requests=None):
    """Run (memoized per argument set) the tiny workload; returns the RunResult."""
    key = (framework, caching, engine, None if requests is None else id(requests))
    if key not in _RUNS:
        weights = init_weights(CFG, seed=0)
        adapter = make_adapter(framework, CFG, weights, num_blocks=engine.num_blocks,
                               block_size=engine.block_size)
        eng = Engine(adapter, engine.replace(enable_caching=caching))
        eng.warmup()
        reqs = requests if requests is not None else make_workload(WORK, CFG.vocab_size)
        _RUNS[key] = eng.run(reqs)
    return _RUNS[key]


def _max_logit_diff(a, b) -> float:
    return max(float(np.max(np.abs(x.final_logits - y.final_logits)))
               for x, y in zip(a.requests, b.requests, strict=True))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_caching_on_equals_caching_off(framework):
    off, on = serve(framework, False), serve(framework, True)
    assert [r.request_id for r in off.requests] == list(range(len(off.requests)))
    assert on.outputs() == off.outputs()
    assert _max_logit_diff(off, on) <= LOGIT_TOL
    for r in off.requests + on.requests:
        assert np.isfinite(r.final_logits).all()
        assert len(r.output_tokens) == WORK.max_new_tokens
    # caching did something: hits, shared-prefix steps, evictions offloaded and onboarded
    assert off.hit_rate == 0 and off.blocks_offloaded == off.blocks_onboarded == 0
    assert on.hit_rate > 0.5
    assert on.shared_prefix_steps > 0
    assert on.blocks_evicted > 0 and on.blocks_offloaded > 0 and on.blocks_onboarded > 0
    assert on.steps < off.steps


@pytest.mark.parametrize("framework", [p for p in FRAMEWORKS if p.id != "numpy"])
def test_framework_matches_numpy_reference_model(framework):
    ref, got = serve("numpy", False), serve(framework, False)
    assert got.outputs() == ref.outputs()
    assert _max_logit_diff(ref, got) <= LOGIT_TOL


def test_jax_and_torch_agree():
    for fw in ("jax", "torch"):
        if importlib.util.find_spec(fw) is None or not _frontend_ready(fw):
            pytest.skip(f"{fw} frontend not available")
    for caching in (False, True):
        j, t = serve("jax", caching), serve("torch", caching)
        assert j.outputs() == t.outputs()
        assert _max_logit_diff(j, t) <= LOGIT_TOL
        assert (j.hit_rate, j.steps, j.blocks_onboarded) == (t.hit_rate, t.steps,
                                                             t.blocks_onboarded)


def test_preemption_under_a_tight_pool_keeps_generations():
    tight = ENGINE.replace(num_blocks=14)
    base = serve("numpy", False)
    for caching in (False, True):
        res = serve("numpy", caching, tight)
        assert res.preemptions > 0
        assert res.outputs() == base.outputs()
        assert _max_logit_diff(base, res) <= LOGIT_TOL


def test_running_sequences_compare_by_identity():
    """The scheduler tests membership in its running list and removes sequences from it: a
    test is an identity check, and two sequences with equal fields are different sequences
    (a field-wise dataclass __eq__ made each step O(running^2): 512 running, 0.25 s a step)."""
    from prefixkv.models.engine import _Seq

    req = Request(0, (1, 2, 3), 4, "t", None, "unique")
    a, b = _Seq(req=req, rid=0, tokens=[1, 2, 3]), _Seq(req=req, rid=0, tokens=[1, 2, 3])
    running = [a]
    assert a != b and b not in running and len({a, b}) == 2
    running.remove(a)
    assert not running


def test_salts_isolate_tenants():
    rng = np.random.default_rng(1)
    prompt = tuple(rng.integers(1, CFG.vocab_size, 40).tolist())
    reqs = [Request(0, prompt, 2, "a", b"tenant-a", "chat"),
            Request(1, prompt, 2, "b", b"tenant-b", "chat"),
            Request(2, prompt, 2, "a", b"tenant-a", "chat")]
    res = serve("numpy", True, ENGINE.replace(max_num_seqs=1), requests=reqs)
    cached = [r.cached_tokens + r.onboarded_tokens for r in res.requests]
    assert cached == [0, 0, 32]  # (40 - 1) // 8 = 4 full blocks hit, only within tenant a
    assert len({tuple(r.output_tokens) for r in res.requests}) == 1


def test_workload_is_deterministic_and_mostly_shared():
    a = make_workload(WorkloadConfig(), 512)
    assert a == make_workload(WorkloadConfig(), 512)
    assert a != make_workload(WorkloadConfig(seed=1), 512)
    assert 0.88 <= shared_prefix_fraction(a) <= 0.95
    assert {r.salt for r in a} == {b"tenant-acme", b"tenant-globex"}
    assert {r.kind for r in a} == {"chat", "unique"}
    # turn k of a chat extends turn k - 1
    by_chat = {}
    for r in a:
        if r.kind == "chat":
            by_chat.setdefault(r.chat, []).append(r.prompt)
    for turns in by_chat.values():
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt[:len(prev)] == prev and len(nxt) > len(prev)
    assert len(make_workload(WorkloadConfig(), 512, num_requests=5)) == 5


def test_config_checks():
    with pytest.raises(ValueError, match="num_q_heads=6 must be divisible by num_kv_heads=4"):
        LlamaConfig(num_q_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="head_dim: expected an even value"):
        LlamaConfig(head_dim=33)
    with pytest.raises(ValueError, match="dtype: expected"):
        LlamaConfig(dtype="float64")
    w1, w2 = init_weights(CFG, 3), init_weights(CFG, 3)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    assert not np.array_equal(w1["embed"], init_weights(CFG, 4)["embed"])


def test_engine_rejects_too_long_requests():
    adapter = make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=ENGINE.num_blocks,
                           block_size=ENGINE.block_size)
    req = Request(0, tuple(range(1, 255)), 8, "a", None, "unique")
    with pytest.raises(ValueError, match="requests: request 0 needs 262 tokens"):
        Engine(adapter, ENGINE).run([req])
    req = Request(0, tuple(range(1, 240)), 8, "a", None, "unique")
    with pytest.raises(ValueError, match="requests: request 0 needs 31 blocks, the pool has 29"):
        Engine(adapter, ENGINE).run([req])


def test_engine_rejects_a_model_that_cannot_serve_its_requests():
    """Positions past the model's RoPE table and token ids past its vocabulary: JAX clamps
    such gathers (wrong tokens, no error), so the engine refuses them up front."""
    small = CFG.replace(max_model_len=64)
    adapter = make_adapter("numpy", small, init_weights(small, 0),
                           num_blocks=ENGINE.num_blocks, block_size=ENGINE.block_size)
    with pytest.raises(ValueError, match="config: max_model_len 256 is past the model's 64"):
        Engine(adapter, ENGINE)
    adapter = make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=ENGINE.num_blocks,
                           block_size=ENGINE.block_size)
    req = Request(7, (5, 200, 9), 2, "a", None, "unique")
    with pytest.raises(ValueError, match=r"requests: request 7 has token ids outside \[0, "
                                         r"128\) \(the model's vocabulary\): min 5 max 200"):
        Engine(adapter, ENGINE).run([req])


def test_engine_request_checks():
    """Duplicate request ids are refused (arrivals and results are keyed by them); a numpy
    array prompt is fine; the JAX adapter checks onboarded block ids (its scatter is jitted:
    the frontend sees traced ids and cannot)."""
    adapter = make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=ENGINE.num_blocks,
                           block_size=ENGINE.block_size)
    reqs = [Request(0, (5, 6, 7), 2, "a", None, "unique"), Request(0, (5, 6), 2, "a", None,
                                                                  "unique")]
    with pytest.raises(ValueError, match="requests: request id 0 appears more than once"):
        Engine(adapter, ENGINE).run(reqs)
    res = Engine(adapter, ENGINE).run([Request(3, np.arange(5, 12), 2, "a", None, "unique")])
    assert len(res.requests[0].output_tokens) == 2
    if importlib.util.find_spec("jax") is None or not _frontend_ready("jax"):
        return
    jax_adapter = make_adapter("jax", CFG, init_weights(CFG, 0), num_blocks=20, block_size=8)
    buf = np.zeros((2, len(jax_adapter.caches), *jax_adapter.caches[0].shape[1:]), np.float32)
    for ids, match in (([7, 7], "expected distinct"), ([7, 25], r"expected values in \[0, 20\)")):
        with pytest.raises(ValueError, match=f"block_ids: {match}"):
            jax_adapter.scatter_blocks(np.array(ids, np.int32), buf)


def test_padding_sequence_fits_its_block_table():
    """A token bucket past max_model_len: the padding sequence (kv_len = the padding count)
    gets a table wide enough, so the ops' checks pass (the reference model runs them)."""
    engine = ENGINE.replace(max_model_len=64, max_num_batched_tokens=128, min_token_bucket=128)
    small = CFG.replace(max_model_len=64)
    adapter = make_adapter("numpy", small, init_weights(small, 0),
                           num_blocks=engine.num_blocks, block_size=engine.block_size)
    eng = Engine(adapter, engine)
    eng.static_shapes = True  # pad as for JAX, run on the checking numpy model
    reqs = make_workload(WORK, CFG.vocab_size, num_requests=3)
    eager = Engine(adapter, engine).run(reqs)
    assert eng.run(reqs).outputs() == eager.outputs()


def test_preempted_request_keeps_its_first_arrival(monkeypatch):
    """TTFT and latency of a preempted request count from its first admission (and its first
    token, when it had one before the preemption)."""
    from prefixkv.models import engine as engine_mod

    created = []

    class Seq(engine_mod._Seq):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(engine_mod, "_Seq", Seq)
    rng = np.random.default_rng(0)
    system = tuple(rng.integers(1, 128, 48).tolist())
    reqs = [Request(i, system + tuple(rng.integers(1, 128, 10 + 5 * i).tolist()), 10, "t", b"a",
                    "chat") for i in range(5)]
    cfg = ENGINE.replace(num_blocks=22, max_num_seqs=4, max_num_batched_tokens=16,
                         min_token_bucket=8, host_blocks=16, enable_caching=False)
    adapter = make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=22, block_size=8)
    res = Engine(adapter, cfg).run(reqs)
    assert res.preemptions
    again = 0
    for r in res.requests:
        seqs = [s for s in created if s.rid == r.request_id]
        again += len(seqs) > 1
        assert {s.arrival for s in seqs} == {seqs[0].arrival}
        assert r.latency_s == seqs[-1].finish - seqs[0].arrival
        firsts = [s.first_token for s in seqs if s.first_token is not None]
        assert r.ttft_s == firsts[0] - seqs[0].arrival
    assert again


def _same_step_requests(salts=(b"a", b"a", b"a", b"b"), new_tokens=4, seed=7):
    """One 48-token system prompt (6 blocks of 8) + a short own suffix per request."""
    rng = np.random.default_rng(seed)
    system = tuple(rng.integers(1, CFG.vocab_size, 48).tolist())
    own = (5, 9, 3, 6)[:len(salts)]
    return [Request(i, system + tuple(rng.integers(1, CFG.vocab_size, n).tolist()), new_tokens,
                    "t", salt, "chat") for i, (n, salt) in enumerate(zip(own, salts, strict=True))]


# slots and tokens for the four requests in one step (214 prompt tokens); one token bucket
SAME_STEP = ENGINE.replace(num_blocks=40, max_num_seqs=4, max_num_batched_tokens=256,
                           min_token_bucket=256)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_requests_admitted_together_hit_the_prefix_the_first_one_writes(framework):
    """Four requests with one system prompt, all admitted and prefilled in the first step: the
    first computes the prompt, the second and third (same salt) hit its 6 blocks in the same
    step, their attention reading the KV the first one's chunk writes in the same forward
    (every adapter writes the batch's KV before its attention reads it), the second and third
    through shared_prefix_attention over those blocks; the fourth (other salt) hits nothing.
    Matched once at admission before the chunks were cached, the hits were [0, 0, 0, 0].
    Same generations and final logits as with caching off, in the same number of steps (no
    request waits for another's prefill)."""
    reqs = _same_step_requests()
    on = serve(framework, True, SAME_STEP, requests=reqs)
    off = serve(framework, False, SAME_STEP, requests=reqs)
    assert [r.cached_tokens for r in on.requests] == [0, 48, 48, 0]
    assert on.outputs() == off.outputs()
    assert _max_logit_diff(on, off) <= LOGIT_TOL
    assert on.steps == off.steps == 4  # one prefill step (every first token), three decodes
    assert on.shared_prefix_steps >= 1


class _CheckedReads:
    """A numpy model that checks, before each forward, that every cache slot the batch's
    attention reads holds the KV of that position, written by this forward or an earlier one
    (a block served before the forward that writes it, or freed and rewritten by another
    request at another position, fails); onboarding is not tracked (use host_blocks=0)."""

    def __init__(self, inner) -> None:
        self.inner, self.position_of = inner, {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.inner.reset()
        self.position_of = {}

    def forward(self, batch):
        bs = self.inner.block_size
        for slot, pos in zip(batch.slot_mapping.tolist(), batch.positions.tolist(), strict=True):
            if slot >= 0:
                self.position_of[slot] = pos
        for s in range(batch.num_real_seqs):
            kv = int(batch.kv_lens[s])
            pos = np.arange(kv)
            slots = batch.block_tables[s, pos // bs].astype(np.int64) * bs + pos % bs
            got = [self.position_of.get(x, -1) for x in slots.tolist()]
            assert got == pos.tolist(), f"sequence {s} reads slots not written at its positions"
        return self.inner.forward(batch)


def test_same_step_hits_survive_preemption_and_free(monkeypatch):
    """A pool too small for the three decodes: one of the requests that hit, in the step that
    wrote them, the blocks the first one computes is preempted and re-admitted, and the first
    one finishes first (freed) while the others still read its blocks; every read slot holds
    its position's KV (refcounts keep matched blocks from being freed or rewritten), and
    generations and final logits equal the roomy run's with caching off."""
    from prefixkv.models import engine as engine_mod

    admitted = []

    class Seq(engine_mod._Seq):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            admitted.append(self)

    reqs = _same_step_requests(salts=(b"a",) * 3, new_tokens=24)
    reqs[0] = Request(0, reqs[0].prompt, 12, "t", b"a", "chat")
    roomy = serve("numpy", False, SAME_STEP, requests=reqs)
    monkeypatch.setattr(engine_mod, "_Seq", Seq)
    tight = SAME_STEP.replace(num_blocks=14, max_num_seqs=3, host_blocks=0)
    adapter = _CheckedReads(make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=14,
                                         block_size=8))
    res = Engine(adapter, tight).run(reqs)
    assert [(s.rid, s.cached_tokens) for s in admitted[:3]] == [(0, 0), (1, 48), (2, 48)]
    assert res.preemptions > 0 and len(admitted) > 3  # a request that hit, admitted again
    assert res.outputs() == roomy.outputs()
    assert _max_logit_diff(res, roomy) <= LOGIT_TOL


def test_jax_onboard_updates_the_caches_in_place():
    """The JAX adapter's scatter_blocks donates the caches (an eager scatter copied every
    layer's whole cache per onboarded piece: 1.6 s for 2 blocks into 1 GiB of caches)."""
    pytest.importorskip("jax")
    if not _frontend_ready("jax"):
        pytest.skip("prefixkv.jax_frontend not available")
    adapter = make_adapter("jax", CFG, init_weights(CFG, 0), num_blocks=20, block_size=8)
    ids = np.array([3, 11], np.int32)
    shape = (2, len(adapter.caches), *adapter.caches[0].shape[1:])
    buf = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = list(adapter.caches)
    adapter.scatter_blocks(ids, buf)
    assert all(c.is_deleted() for c in before)
    np.testing.assert_array_equal(adapter.gather_blocks(ids), buf)
    np.testing.assert_array_equal(adapter.gather_blocks(np.array([2, 4], np.int32)), 0.0)


def test_demo_main_tiny_run(tmp_path, capsys):
    from prefixkv import demo

    frameworks = [fw for fw in ("jax", "torch")
                  if importlib.util.find_spec(fw) is not None and _frontend_ready(fw)]
    frontend = "both" if len(frameworks) == 2 else (frameworks or ["numpy"])[0]
    plot = tmp_path / "ttft.png"
    results = demo.main([
        "--frontend", frontend, "--layers", "1", "--hidden", "64", "--intermediate", "64",
        "--q-heads", "2", "--kv-heads", "1", "--head-dim", "32", "--vocab", "128",
        "--system-prompt-len", "32", "--chats", "1", "--turns", "2", "--unique", "1",
        "--max-new-tokens", "2", "--block-size", "8", "--num-blocks", "64",
        "--max-batched-tokens", "32", "--min-token-bucket", "32", "--plot", str(plot),
        "--threads", "0", "--compile-cache", "", "--max-model-len", "256"])
    out = capsys.readouterr().out
    assert "prefix-hit rate" in out and "TTFT p50 (ms)" in out and "caching speedup" in out
    assert "generations identical with caching on and off: yes" in out
    for off, on in results.values():
        assert off.outputs() == on.outputs() and len(off.requests) == 5
    assert plot.stat().st_size > 1000
    with pytest.raises(SystemExit):  # an empty stream has no TTFT percentiles to print
        demo.parse_args(["--requests", "0"])
    assert "--requests: expected >= 1, got 0" in capsys.readouterr().err


def test_bench_report_markdown_and_plot(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "report.py"
    spec = importlib.util.spec_from_file_location("prefixkv_bench_report", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    limits = {"read_gbps": 10.0, "copy_gbps": 16.0, "matmul_gflops": 50.0}

    def bench(name, mean, **info):
        return {"group": "g", "name": name, "stats": {"mean": mean, "median": mean},
                "extra_info": {**limits, **info}}

    data = {"benchmarks": [
        bench("test_fast", 0.5, gbps=4.0, bytes=2e9, gflops=8.0, roofline_fraction=0.4),
        bench("test_slow", 2.0, baseline=True, gbps=1.0, bytes=2e9, gflops=2.0, impl="numpy")]}
    src = tmp_path / "b.json"
    src.write_text(json.dumps(data))
    md_path, png = tmp_path / "r.md", tmp_path / "roof.png"
    md = report.main([str(src), "--markdown", str(md_path), "--plot", str(png)])
    assert md_path.read_text().strip() == md.strip()
    assert "| `test_fast` | 500 ms | 500 ms | 4.00x | 4 | 8 | 0.4 |" in md
    assert ("| `test_slow` (baseline) | 2 s | 2 s | 1.00x | 1 | 2 |  | baseline=True, "
            "impl=numpy |") in md
    assert "read 10.0 GB/s" in md
    assert png.stat().st_size > 1000
    src.write_text("{}")
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON file"):
        report.main([str(src)])


def test_adapters_call_the_frontends():
    for fw in ("jax", "torch"):
        if importlib.util.find_spec(fw) is None or not _frontend_ready(fw):
            continue
        adapter = make_adapter(fw, CFG, init_weights(CFG, 0), num_blocks=4, block_size=8)
        assert adapter.ops is importlib.import_module(f"prefixkv.{fw}_frontend")


@settings(max_examples=8, deadline=None)
@given(num_blocks=st.integers(13, 40),  # the longest request needs 12 blocks
       max_num_seqs=st.integers(1, 4),
       budget=st.sampled_from([8, 16, 24, 32]), host_blocks=st.sampled_from([0, 4, 64]),
       shared_prefix=st.booleans())
def test_engine_schedules_never_change_generations(num_blocks, max_num_seqs, budget,
                                                   host_blocks, shared_prefix):
    """Any pool size, concurrency, token budget and host tier: same tokens as the roomy run."""
    base = serve("numpy", False)
    cfg = ENGINE.replace(num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                         max_num_batched_tokens=budget, host_blocks=host_blocks,
                         shared_prefix=shared_prefix, min_token_bucket=8)
    res = serve("numpy", True, cfg)
    assert res.outputs() == base.outputs()
    assert _max_logit_diff(base, res) <= LOGIT_TOL
    if not host_blocks:
        assert res.blocks_offloaded == res.blocks_onboarded == 0


# ---------------------------------------------------------------- open-loop arrivals

class _FakeClock:
    """A clock that moves only when the engine sleeps or, through :class:`_TimedModel`, runs
    a forward: runs are exact and instant."""

    def __init__(self) -> None:
        self.t, self.slept = 100.0, []

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        assert dt > 0
        self.slept.append(dt)
        self.t += dt


class _TimedModel:
    """The numpy model; each forward takes ``step_s`` of the fake clock."""

    def __init__(self, inner, clock: _FakeClock, step_s: float) -> None:
        self.inner, self.clock, self.step_s = inner, clock, step_s

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, batch):
        self.clock.t += self.step_s
        return self.inner.forward(batch)


def _timed_engine(engine: EngineConfig, step_s: float):
    clock = _FakeClock()
    adapter = _TimedModel(make_adapter("numpy", CFG, init_weights(CFG, 0),
                                       num_blocks=engine.num_blocks,
                                       block_size=engine.block_size), clock, step_s)
    return Engine(adapter, engine), clock


def _record_admissions(monkeypatch, clock: _FakeClock) -> list:
    """(request id, fake-clock time) of every admission (a _Seq is made only there)."""
    from prefixkv.models import engine as engine_mod

    admitted = []

    class Seq(engine_mod._Seq):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            admitted.append((self.rid, clock.t))

    monkeypatch.setattr(engine_mod, "_Seq", Seq)
    return admitted


def test_arrival_times_are_seeded_poisson_and_increasing():
    from prefixkv.models import arrival_times

    a = arrival_times(2000, 4.0, seed=3)
    assert a.shape == (2000,) and a.dtype == np.float64
    np.testing.assert_array_equal(a, arrival_times(2000, 4.0, seed=3))
    np.testing.assert_array_equal(a[:50], arrival_times(50, 4.0, seed=3))
    assert not np.array_equal(a[1:], arrival_times(2000, 4.0, seed=4)[1:])
    assert a[0] == 0 and (np.diff(a) > 0).all()
    gaps = np.diff(a)  # exponential of mean 1/4 s: mean and std 0.25 (2000 gaps: +-3% is 5 sd)
    assert abs(gaps.mean() - 0.25) < 0.02 and abs(gaps.std() - 0.25) < 0.02
    np.testing.assert_allclose(arrival_times(2000, 8.0, seed=3), a / 2)  # rate scales time
    np.testing.assert_array_equal(arrival_times(3, float("inf")), [0.0, 0.0, 0.0])
    assert arrival_times(0, 1.0).shape == (0,) and arrival_times(1, 1.0).tolist() == [0.0]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"request_rate: expected > 0 requests/s"):
            arrival_times(3, bad)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_arrival_times_burstiness_is_vllms_gamma(burstiness):
    """Gaps Gamma(B, 1 / (rate B)) as vLLM's --burstiness: the rate's mean gap, a coefficient
    of variation 1 / sqrt(B) (20000 gaps: the bounds are ~5 sd), non-decreasing, seeded; B = 1
    is the Poisson schedule itself."""
    from prefixkv.models import arrival_times

    a = arrival_times(20001, 4.0, seed=3, burstiness=burstiness)
    gaps = np.diff(a)
    assert a[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 0.25) < 0.25 * 5 * (burstiness * 20000) ** -0.5
    assert abs(gaps.std() / gaps.mean() - burstiness ** -0.5) < 0.1 * burstiness ** -0.5
    np.testing.assert_array_equal(a, arrival_times(20001, 4.0, seed=3, burstiness=burstiness))
    np.testing.assert_array_equal(arrival_times(50, 4.0, seed=3, burstiness=1.0),
                                  arrival_times(50, 4.0, seed=3))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"burstiness: expected a finite value > 0"):
            arrival_times(3, 4.0, burstiness=bad)


def _three_requests():
    rng = np.random.default_rng(5)
    return [Request(i, tuple(rng.integers(1, CFG.vocab_size, 10).tolist()), 3, "t", b"a",
                    "unique") for i in range(3)]


# one sequence at a time; a 10-token prompt is one chunk, so a request takes 3 steps (prefill
# with the first token, two decodes)
ONE_SLOT = ENGINE.replace(max_num_seqs=1)


def test_open_loop_ttft_counts_from_arrival(monkeypatch):
    """Three requests arriving at 0, 0.5 and 10 s, each forward taking 1 s, one slot. Request 0
    is admitted at 0, first token at 1, done at 3; request 1 (arrived 0.5) queues until 3,
    first token at 4, done at 6: TTFT 4 - 0.5 = 3.5, latency 5.5 (from admission it would be
    1 and 3); nothing runs from 6 to 10 (the engine sleeps 4 s), request 2 is admitted at 10,
    first token at 11, done at 13. Times are from the run's start (the fake clock's 100)."""
    eng, clock = _timed_engine(ONE_SLOT, step_s=1.0)
    admitted = _record_admissions(monkeypatch, clock)
    res = eng.run(_three_requests(), arrivals=[0.0, 0.5, 10.0], clock=clock, sleep=clock.sleep)
    assert [(rid, t - 100) for rid, t in admitted] == [(0, 0.0), (1, 3.0), (2, 10.0)]
    assert [r.ttft_s for r in res.requests] == [1.0, 3.5, 1.0]
    assert [r.latency_s for r in res.requests] == [3.0, 5.5, 3.0]
    assert clock.slept == [4.0] and res.idle_s == 4.0
    assert res.wall_s == 13.0 and res.open_loop and res.steps == 9


def test_closed_loop_is_the_default(monkeypatch):
    """No arrivals: today's closed loop, TTFT and latency from admission (the schedule of
    test_open_loop_ttft_counts_from_arrival without the 4 s idle: admitted at 0, 3, 6, each
    TTFT 1 and latency 3), never sleeping. All arrivals at 0 (rate inf) admit at the same
    steps, with TTFT from 0: 1, 4, 7. The demo's default is the closed loop."""
    from prefixkv import demo

    reqs = _three_requests()
    eng, clock = _timed_engine(ONE_SLOT, step_s=1.0)
    admitted = _record_admissions(monkeypatch, clock)
    closed = eng.run(reqs, clock=clock, sleep=clock.sleep)
    assert [t - 100 for _, t in admitted] == [0.0, 3.0, 6.0]
    assert [r.ttft_s for r in closed.requests] == [1.0, 1.0, 1.0]
    assert [r.latency_s for r in closed.requests] == [3.0, 3.0, 3.0]
    assert clock.slept == [] and closed.idle_s == 0 and not closed.open_loop
    assert closed.wall_s == 9.0
    eng, clock = _timed_engine(ONE_SLOT, step_s=1.0)
    at_once = eng.run(reqs, arrivals=[0.0] * 3, clock=clock, sleep=clock.sleep)
    assert [r.ttft_s for r in at_once.requests] == [1.0, 4.0, 7.0]
    assert at_once.steps == closed.steps and at_once.outputs() == closed.outputs()
    assert demo.parse_args([]).request_rate is None


def test_open_loop_admits_no_request_before_its_arrival(monkeypatch):
    """The test workload (21 requests, 3 slots) at 40 requests/s, each forward 10 ms: every
    admission is at or after its request's arrival, some requests queue (admitted later than
    they arrived), the engine idles between bursts, and it never sleeps while a sequence
    runs (sleeps end at an arrival, where the next admission happens)."""
    from prefixkv.models import arrival_times

    reqs = make_workload(WORK, CFG.vocab_size)
    arrivals = arrival_times(len(reqs), 40.0, seed=0)
    eng, clock = _timed_engine(ENGINE, step_s=0.01)
    admitted = _record_admissions(monkeypatch, clock)
    res = eng.run(reqs, arrivals=arrivals, clock=clock, sleep=clock.sleep)
    assert all(t >= 100 + arrivals[rid] for rid, t in admitted)  # the engine's sums
    waits = [t - 100 - arrivals[rid] for rid, t in admitted]
    assert sum(w > 0.005 for w in waits) >= 3  # queued for at least one step
    assert clock.slept and res.idle_s == pytest.approx(sum(clock.slept))
    assert res.wall_s >= arrivals[-1]
    first_admission = {}
    for rid, t in admitted:
        first_admission.setdefault(rid, t - 100)
    ttft = {r.request_id: r.ttft_s for r in res.requests}
    for rid, t in first_admission.items():  # TTFT from arrival: the queueing counts
        assert ttft[rid] >= t - arrivals[rid] + 0.01 - 1e-9


@pytest.mark.parametrize("caching", [False, True], ids=["caching_off", "caching_on"])
def test_open_loop_generations_equal_the_closed_loop(caching):
    """Poisson arrivals (fake clock, and the real one at a high rate: sleeps of a few ms) give
    every request the tokens and final logits of the closed loop; caching on hits a shared
    prefix as in the closed loop."""
    from prefixkv.models import arrival_times

    base = serve("numpy", False)
    reqs = make_workload(WORK, CFG.vocab_size)
    eng, clock = _timed_engine(ENGINE.replace(enable_caching=caching), step_s=0.01)
    fake = eng.run(reqs, arrivals=arrival_times(len(reqs), 40.0, seed=1), clock=clock,
                   sleep=clock.sleep)
    arrivals = arrival_times(len(reqs), 400.0, seed=2)
    real = eng.run(reqs, arrivals=arrivals)
    for res in (fake, real):
        assert res.open_loop and res.outputs() == base.outputs()
        assert _max_logit_diff(base, res) <= LOGIT_TOL
        assert (res.hit_rate > 0.5) == caching
    assert real.wall_s >= arrivals[-1]
    assert all(r.ttft_s > 0 for r in real.requests)


def test_engine_arrival_checks():
    adapter = make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=ENGINE.num_blocks,
                           block_size=ENGINE.block_size)
    reqs = _three_requests()
    for arrivals, match in (
            ([0.0, 1.0], r"arrivals: expected shape \(3,\) \(one per request\), got \(2,\)"),
            ([0.0, float("inf"), 1.0], r"arrivals: expected finite seconds >= 0, got \[inf\]"),
            ([-1.0, 0.0, 1.0], r"arrivals: expected finite seconds >= 0, got \[-1.\]"),
            ([0.0, 2.0, 1.0], r"arrivals: expected nondecreasing, got 2.0 then 1.0 "
                              r"\(requests 1, 2\)")):
        with pytest.raises(ValueError, match=match):
            Engine(adapter, ENGINE).run(reqs, arrivals=arrivals)


def test_demo_request_rate(capsys):
    """--request-rate on the numpy model: the open loop's line in the header, the idle row, the
    same generations with caching on and off; a rate <= 0 is refused."""
    from prefixkv import demo

    results = demo.main([
        "--frontend", "numpy", "--layers", "1", "--hidden", "32", "--intermediate", "32",
        "--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--vocab", "64",
        "--system-prompt-len", "32", "--chats", "1", "--turns", "2", "--unique", "1",
        "--max-new-tokens", "2", "--block-size", "8", "--num-blocks", "64",
        "--max-batched-tokens", "32", "--min-token-bucket", "32", "--threads", "0",
        "--compile-cache", "", "--max-model-len", "256", "--request-rate", "200"])
    out = capsys.readouterr().out
    assert "arrivals: open loop, Poisson at 200 requests/s (seed 0; last at" in out
    assert "idle, none running (s)" in out and "TTFT p50 (ms)" in out
    assert "generations identical with caching on and off: yes" in out
    off, on = results["numpy"]
    assert off.open_loop and on.open_loop and on.hit_rate > 0
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            demo.parse_args(["--request-rate", bad])
        assert f"--request-rate: expected > 0 requests/s (inf: all at once), got {float(bad)}" \
            in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--request-rate", "2", "--burstiness", "0"])
    assert "--burstiness: expected a finite value > 0 (1: Poisson), got 0.0" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--burstiness", "0.5"])
    assert "--burstiness: shapes the open loop's arrivals; give --request-rate too" \
        in capsys.readouterr().err
    assert demo.parse_args(["--request-rate", "2", "--burstiness", "0.5"]).burstiness == 0.5


def test_demo_progress_bar_only_on_a_terminal(monkeypatch):
    """The demo's progress bar redraws a terminal line; into a log or a pipe it writes nothing
    (every redraw would stay there as text)."""
    from prefixkv import demo

    class Tty:
        def __init__(self, tty):
            self.tty, self.text = tty, []

        def isatty(self):
            return self.tty

        def write(self, s):
            self.text.append(s)

        def flush(self):
            pass

    for tty in (False, True):
        err = Tty(tty)
        monkeypatch.setattr(demo.sys, "stderr", err)
        update, close = demo._progress(4, "run")
        update(2)
        update(4)
        close()
        assert bool("".join(err.text)) == tty
