"""End-to-end serving with the tiny Llama models: prefix caching on vs off (the baseline).

Each test serves the same request stream (a shared system prompt, multi-turn chats of two
tenants, unique prompts; about 90% of prompt tokens in shared prefixes) through one
framework's model and the ``paged/`` PrefixCache, and benchmarks the whole run. The group is
the framework; caching off is the baseline in the same group. extra_info: TTFT p50/p95 (ms),
prefix-hit rate, prompt tokens, computed (prefilled) tokens, blocks offloaded/onboarded,
GFLOP/s of the model's matmuls and the roofline fraction against the machine's matmul rate.

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

FRAMEWORKS = [pytest.param(fw, marks=pytest.mark.skipif(
    importlib.util.find_spec(fw) is None, reason=f"{fw} not installed"))
    for fw in ("jax", "torch")]


@pytest.mark.parametrize("caching", [False, True], ids=["caching_off", "caching_on"])
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_serve_shared_prefix_stream(benchmark, machine_limits, framework, caching):
    benchmark.group = f"serve-{framework}"
    requests = make_workload(WORK, MODEL.vocab_size)
    adapter = make_adapter(framework, MODEL, init_weights(MODEL, 0),
                           num_blocks=ENGINE.num_blocks, block_size=ENGINE.block_size)
    engine = Engine(adapter, ENGINE.replace(enable_caching=caching))
    engine.warmup()
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
