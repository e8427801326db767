"""End-to-end serving with the tiny Llama models: prefix caching on vs off (the baseline).

Each test serves the same request stream (a shared system prompt, multi-turn chats of two
tenants, unique prompts; about 90% of prompt tokens in shared prefixes) through one
framework's model and the ``paged/`` PrefixCache, and benchmarks the whole run. The group is
the framework; caching off is the baseline in the same group. extra_info: TTFT p50/p95 (ms),
prefix-hit rate, prompt tokens, computed (prefilled) tokens, blocks offloaded/onboarded,
GFLOP/s of the model's matmuls and the roofline fraction against the machine's matmul rate.
Sampling is greedy, so caching on must generate exactly the tokens of caching off: each
caching-on run is checked against the caching-off run's tokens (served once per framework,
untimed, when the caching-off test has not already), so a prefix cache that reuses wrong KV
fails here.

    .venv/bin/pytest bench/bench_models.py --benchmark-only
"""

from __future__ import annotations

import importlib.util

import pytest

from bench.conftest import record
from prefixkv.models import (
    Engine,
    EngineConfig,
    LlamaConfig,
    WorkloadConfig,
    init_weights,
    make_adapter,
    make_workload,
)

MODEL = LlamaConfig()
WORK = WorkloadConfig(chats_per_tenant=4, turns=2, num_unique=2)
ENGINE = EngineConfig()

#: framework -> {request id: generated tokens} of the caching-off run (greedy: the reference)
_OFF_OUTPUTS: dict[str, dict[int, list[int]]] = {}

FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    importlib.util.find_spec(fw) is None, reason=f"{fw} not installed"))
    for fw in ("jax", "torch")]


def _engine(framework: str, caching: bool) -> Engine:
    adapter = make_adapter(framework, MODEL, init_weights(MODEL, 0),
                           num_blocks=ENGINE.num_blocks, block_size=ENGINE.block_size)
    engine = Engine(adapter, ENGINE.replace(enable_caching=caching))
    engine.warmup()
    return engine


def _caching_off_outputs(framework: str, requests) -> dict[int, list[int]]:
    """The caching-off run's tokens per request, served once per framework (untimed)."""
    if framework not in _OFF_OUTPUTS:
        _OFF_OUTPUTS[framework] = _engine(framework, False).run(requests).outputs()
    return _OFF_OUTPUTS[framework]


@pytest.mark.parametrize("caching", [False, True], ids=["caching_off", "caching_on"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_serve_shared_prefix_stream(benchmark, machine_limits, framework, caching):
    benchmark.group = f"serve-{framework}"
    requests = make_workload(WORK, MODEL.vocab_size)
    engine = _engine(framework, caching)
    results = []

    def serve():
        results.append(engine.run(requests))

    benchmark.pedantic(serve, rounds=3, iterations=1, warmup_rounds=0)
    res = results[-1]
    computed = res.prompt_tokens - res.hit_tokens + sum(
        len(r.output_tokens) - 1 for r in res.requests)
    record(benchmark, machine_limits, flops=computed * MODEL.flops_per_token(),
           caching=caching, baseline=not caching,
           ttft_p50_ms=round(1e3 * res.ttft(50), 2), ttft_p95_ms=round(1e3 * res.ttft(95), 2),
           prefix_hit_rate=round(res.hit_rate, 4), prompt_tokens=res.prompt_tokens,
           computed_tokens=computed, blocks_offloaded=res.blocks_offloaded,
           blocks_onboarded=res.blocks_onboarded, requests=len(res.requests))
    assert res.requests and all(len(r.output_tokens) == WORK.max_new_tokens
                                for r in res.requests)
    if not caching:
        _OFF_OUTPUTS.setdefault(framework, res.outputs())
    else:  # greedy: every round the same tokens as caching off, request by request
        want = _caching_off_outputs(framework, requests)
        for n, r in enumerate(results):
            got = r.outputs()
            assert got.keys() == want.keys(), (n, sorted(got), sorted(want))
            wrong = [i for i in want if got[i] != want[i]]
            assert not wrong, (f"round {n}: caching on generated other tokens than caching "
                               f"off for requests {wrong}")
