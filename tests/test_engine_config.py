"""The serving engine's configuration and requests are checked up front, and the numpy model
runs in half precision (a fuzzer's finds):

- EngineConfig refuses each bad field when made, naming it: min_token_bucket < 1 or
  bucket_growth < 2 had hung Engine() (its token buckets never reached the token budget),
  max_num_seqs / max_num_batched_tokens < 1 had failed as "num_blocks: the pool cannot hold one
  sequence", host_blocks < 0 as the host tier's budget_bytes, a float size as num_new_tokens;
- an empty prompt is refused naming requests (it too was blamed on num_blocks);
- the demo reports such values as usage errors under their flags (--min-token-bucket 0 hung);
- the numpy model keeps bfloat16 / float16 through its norms and matmuls (its float32 K and V
  were refused by write_kv against the half-precision caches) and gives torch's tokens.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

from prefixkv.models import (
    Engine,
    EngineConfig,
    LlamaConfig,
    WorkloadConfig,
    init_weights,
    make_adapter,
    make_workload,
)
from prefixkv.models.workload import Request

CFG = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_q_heads=4, num_kv_heads=2,
                  head_dim=32, intermediate_size=96, max_model_len=256)
ENGINE = EngineConfig(block_size=8, num_blocks=30, max_num_seqs=3, max_num_batched_tokens=32,
                      max_model_len=256, host_blocks=64, min_token_bucket=32)
WORK = WorkloadConfig(system_prompt_len=24, chats_per_tenant=1, turns=2, user_len=8,
                      assistant_len=8, num_unique=1, unique_len=12, max_new_tokens=3)

# (field, value, error, what the message says after the field's name)
BAD_FIELDS = [
    pytest.param("min_token_bucket", 0, ValueError, "expected an int >= 1", id="min_bucket_0"),
    pytest.param("min_token_bucket", -1, ValueError, "expected an int >= 1", id="min_bucket_-1"),
    pytest.param("bucket_growth", 1, ValueError, "expected an int >= 2", id="growth_1"),
    pytest.param("bucket_growth", 0, ValueError, "expected an int >= 2", id="growth_0"),
    pytest.param("bucket_growth", 1.5, TypeError, "expected an int", id="growth_float"),
    pytest.param("max_num_seqs", 0, ValueError, "expected an int >= 1", id="seqs_0"),
    pytest.param("max_num_seqs", -1, ValueError, "expected an int >= 1", id="seqs_-1"),
    pytest.param("max_num_batched_tokens", 0, ValueError, "expected an int >= 1", id="tokens_0"),
    pytest.param("max_num_batched_tokens", -5, ValueError, "expected an int >= 1",
                 id="tokens_-5"),
    pytest.param("max_num_batched_tokens", 2.5, TypeError, "expected an int", id="tokens_float"),
    pytest.param("host_blocks", -1, ValueError, "expected an int >= 0", id="host_-1"),
    pytest.param("block_size", -8, ValueError, "expected an int >= 1", id="block_size_-8"),
    pytest.param("block_size", 8.0, TypeError, "expected an int", id="block_size_float"),
    pytest.param("num_blocks", 1, ValueError, r"expected an int >= 2 \(block 0 is the null",
                 id="num_blocks_1"),
    pytest.param("max_model_len", 0, ValueError, "expected an int >= 1", id="max_model_len_0"),
    pytest.param("enable_caching", "no", TypeError, "expected a bool", id="caching_str"),
    pytest.param("shared_prefix", None, TypeError, "expected a bool", id="shared_none"),
]


@pytest.mark.parametrize(("field", "value", "error", "match"), BAD_FIELDS)
def test_engine_config_refuses_bad_fields(field, value, error, match):
    """Refused when made and by replace(), before an Engine can loop over them."""
    with pytest.raises(error, match=f"^{field}: {match}"):
        EngineConfig(**{field: value})
    with pytest.raises(error, match=f"^{field}: {match}"):
        ENGINE.replace(**{field: value})


def test_engine_config_stores_numpy_ints_as_ints():
    """Sizes computed with numpy are accepted and kept as Python ints (equal configs hash
    alike; a bool is not a size)."""
    cfg = ENGINE.replace(block_size=np.int64(8), num_blocks=np.int32(30),
                         enable_caching=np.bool_(True))
    assert cfg == ENGINE and hash(cfg) == hash(ENGINE)
    assert type(cfg.block_size) is int and type(cfg.num_blocks) is int
    assert type(cfg.enable_caching) is bool
    with pytest.raises(TypeError, match="^max_num_seqs: expected an int, got True"):
        ENGINE.replace(max_num_seqs=True)


def _serve(engine: EngineConfig, requests, model: LlamaConfig = CFG, framework: str = "numpy"):
    adapter = make_adapter(framework, model, init_weights(model, 0),
                           num_blocks=engine.num_blocks, block_size=engine.block_size)
    return Engine(adapter, engine).run(requests)


def test_edge_values_still_serve():
    """Valid edge values keep working (a guard for the checks above): a token budget below
    one block, no host tier, the smallest growth, a smallest bucket past the budget, one
    sequence; eager and padded as for JAX, with the roomy run's tokens."""
    reqs = make_workload(WORK, CFG.vocab_size)
    base = _serve(ENGINE, reqs).outputs()
    for edge in (dict(max_num_batched_tokens=4, min_token_bucket=1, bucket_growth=2),
                 dict(max_num_batched_tokens=5, min_token_bucket=64, host_blocks=0),
                 dict(max_num_seqs=1, max_num_batched_tokens=1, min_token_bucket=1)):
        cfg = ENGINE.replace(**edge)
        assert cfg.token_buckets()[-1] == cfg.max_num_batched_tokens
        adapter = make_adapter("numpy", CFG, init_weights(CFG, 0), num_blocks=cfg.num_blocks,
                               block_size=cfg.block_size)
        for static in (False, True):
            eng = Engine(adapter, cfg)
            eng.static_shapes = static  # pad as for JAX, run on the checking numpy model
            assert eng.run(reqs).outputs() == base, (edge, static)


def test_engine_refuses_an_empty_prompt():
    """The first token is sampled at the last prompt token: an empty prompt has nothing to
    run. Refused before anything is served, naming requests (it was blamed on num_blocks)."""
    reqs = [Request(0, (5, 6, 7), 2, "a", None, "unique"), Request(5, (), 2, "a", None, "unique")]
    with pytest.raises(ValueError, match="^requests: request 5 has an empty prompt"):
        _serve(ENGINE, reqs)
    with pytest.raises(ValueError, match="^requests: request 5 has an empty prompt"):
        _serve(ENGINE, reqs[1:])


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["--min-token-bucket", "0"],
                 "--min-token-bucket: expected an int >= 1 (the smallest padded step), got 0",
                 id="min_bucket"),
    pytest.param(["--max-batched-tokens", "-5"], "--max-batched-tokens: expected an int >= 1",
                 id="batched_tokens"),
    pytest.param(["--max-num-seqs", "0"], "--max-num-seqs: expected an int >= 1", id="seqs"),
    pytest.param(["--host-blocks", "-1"], "--host-blocks: expected an int >= 0", id="host"),
    pytest.param(["--block-size", "-8"], "--block-size: expected an int >= 1", id="block_size"),
])
def test_demo_reports_bad_engine_flags(argv, message, capsys):
    """A value EngineConfig refuses is a usage error under its flag (the demo had hung on
    --min-token-bucket 0, or failed deep in a run under another name)."""
    from prefixkv import demo

    with pytest.raises(SystemExit):
        demo.parse_args(["--frontend", "numpy", *argv])
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- half precision

HALF = ["bfloat16", "float16"]
# final logits of the numpy model against torch's (values about 4): a few units in the last
# place of the dtype (bf16 has 8 bits of mantissa, f16 11)
HALF_LOGIT_TOL = {"bfloat16": 6e-2, "float16": 1e-2}


def _torch_ready() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    try:
        mod = importlib.import_module("prefixkv.torch_frontend")
    except ImportError:
        return False
    return all(hasattr(mod, op) for op in ("paged_attention", "shared_prefix_attention",
                                            "write_kv", "gather_blocks", "scatter_blocks"))


@pytest.mark.parametrize("dtype", HALF)
def test_numpy_model_keeps_half_precision(dtype):
    """Norm and SiLU return the model's dtype (as do the matmuls: ml_dtypes gives float32 for
    a bf16 matmul and for 1.0 + bf16), so K and V reach write_kv in the caches' dtype; the
    engine serves the workload with caching off and on to the same tokens."""
    from prefixkv.models.numpy_llama import rms_norm, silu

    model = CFG.replace(dtype=dtype)
    w = init_weights(model, 0)
    dt = w["embed"].dtype
    x = w["embed"][:5]
    h = rms_norm(x, w["layers.0.attn_norm"], model.rms_norm_eps)
    assert h.dtype == dt
    xf = x.astype(np.float32)  # normalized in float32, rounded once, then scaled
    expect = (xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + model.rms_norm_eps)).astype(dt)
    np.testing.assert_array_equal(h, expect * w["layers.0.attn_norm"])
    assert silu(h).dtype == dt
    reqs = make_workload(WORK, model.vocab_size)
    off = _serve(ENGINE.replace(enable_caching=False), reqs, model)
    on = _serve(ENGINE, reqs, model)
    assert on.hit_tokens > 0 and on.outputs() == off.outputs()
    assert all(len(r.output_tokens) == WORK.max_new_tokens for r in on.requests)


@pytest.mark.parametrize("dtype", HALF)
def test_numpy_model_matches_torch_in_half_precision(dtype):
    """The same weights in bf16 / f16: the numpy model's greedy tokens equal torch's, its
    final logits within a few units in the last place."""
    if not _torch_ready():  # checked here, not at collection: importing torch takes seconds
        pytest.skip("torch or prefixkv.torch_frontend not available")
    model = CFG.replace(dtype=dtype)
    reqs = make_workload(WORK, model.vocab_size)
    ref = _serve(ENGINE, reqs, model, "numpy")
    got = _serve(ENGINE, reqs, model, "torch")
    assert got.outputs() == ref.outputs()
    diff = max(float(np.max(np.abs(a.final_logits - b.final_logits)))
               for a, b in zip(ref.requests, got.requests, strict=True))
    assert diff <= HALF_LOGIT_TOL[dtype]
