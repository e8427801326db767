"""Each Triton launch of the backends, compiled for sm_90 the way the JIT compiles it on a GPU,
with no GPU: the real launchers run on CPU tensors (compiled mode, not the interpreter), and
every launch goes through Triton's own argument binder and specializer, then
``triton.compile``, instead of running. The JIT passes an int argument equal to 1 as the
constant 1 (and a multiple of 16 with a divisibility hint), so a kernel that treats such an
argument as a tensor fails only then: ``max_blocks.to(tl.int64)`` did for every launch with a
block table one block wide (a decode batch whose sequences fit in one block), which neither
the interpreter nor the variant compiles of test_triton_compile.py (every int an i32) saw.
The calls here are the launches with arguments of 1: table width, sequences, tokens, blocks,
rows, slots, window."""

from __future__ import annotations

import numpy as np
import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from triton.runtime import jit as triton_jit  # noqa: E402

if not hasattr(triton_jit, "create_function_from_signature"):  # Triton 3.6's binder
    pytest.skip("needs Triton's create_function_from_signature (3.6)", allow_module_level=True)

from prefixkv.kernels.triton import attention as tattn  # noqa: E402
from prefixkv.kernels.triton import cache as tcache  # noqa: E402
from prefixkv.kernels.triton import hashing as thash  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch compiled for sm_90 as ``JITFunction.run`` would compile it (not
    run): [(kernel name, arguments the JIT made the constant 1)]; a compile error raises."""
    backend = CUDABackend(TARGET)
    seen: list = []
    compiled: set = set()

    def run(self, *args, grid, warmup, **kwargs):
        binder = triton_jit.create_function_from_signature(self.signature, self.params,
                                                           backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec,
                                                                opts)
        ones = sorted(k for k, v in signature.items() if v == "constexpr" and k not in kwargs)
        seen.append((self.fn.__name__, ones))
        key = (self.fn.__name__, repr(signature), repr(sorted(map(repr, constexprs.items()))))
        if key not in compiled:
            triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET,
                           options=options.__dict__)
            compiled.add(key)

    monkeypatch.setattr(triton_jit.JITFunction, "run", run)
    return seen


def _attention(seqs, *, block_size=16, window=None, num_blocks=8, fp8=False, **options):
    """paged_attention of (q_len, kv_len) sequences (decode when every q_len is 1), 8 q / 2 kv
    heads x 64, float16 (fp8: float8_e4m3fn caches with scales), the table as wide as the
    longest sequence needs; ``options``: the backend's soft cap, sinks."""
    g = torch.Generator().manual_seed(0)
    width = max(-(-kv // block_size) for _, kv in seqs)
    q = torch.randn(sum(n for n, _ in seqs), 8, 64, generator=g).half()
    k = torch.randn(num_blocks, block_size, 2, 64, generator=g).half()
    if fp8:
        k = k.to(torch.float8_e4m3fn)
        options.update(k_scale=torch.tensor(0.5), v_scale=torch.tensor(2.0))
    tables = (torch.arange(len(seqs) * width, dtype=torch.int32) % num_blocks).view(-1, width)
    kv_lens = torch.tensor([kv for _, kv in seqs], dtype=torch.int32)
    cu = torch.tensor(np.cumsum([0] + [n for n, _ in seqs]), dtype=torch.int32)
    decode = all(n == 1 for n, _ in seqs)
    tattn.paged_attention(torch.empty_like(q), torch.empty(q.shape[:2]), q, k, k.clone(),
                          tables, kv_lens, None if decode else cu, scale=0.125, causal=True,
                          sliding_window=window, **{"logits_soft_cap": None, **options})


def _constant(launches, kernel: str, name: str) -> bool:
    return any(k == kernel and name in ones for k, ones in launches)


@pytest.mark.parametrize("seqs", [[(1, 9), (1, 16)], [(5, 12), (3, 3)]],
                         ids=["decode", "prefill"])
def test_a_table_one_block_wide_compiles(launches, seqs):
    _attention(seqs)
    assert _constant(launches, "_paged_attention_kernel", "max_blocks")


def test_one_sequence_one_block_cache_window_one_compiles(launches):
    _attention([(1, 9)], num_blocks=1, window=1)
    for name in ("num_seqs", "num_blocks", "window", "max_blocks"):
        assert _constant(launches, "_paged_attention_kernel", name), name


@pytest.mark.parametrize("split", [False, True], ids=["one-pass", "split"])
def test_fp8_sinks_soft_cap_window_compile(launches, split):
    seqs = [(1, 16 * 64)] if split else [(1, 9), (1, 16)]
    _attention(seqs, num_blocks=64, window=5, fp8=True, logits_soft_cap=30.0,
               sinks=torch.zeros(8).half())
    assert launches[0][0] == "_paged_attention_kernel"
    assert split == any(k == "_merge_states_kernel" for k, _ in launches)


def test_a_split_decode_and_its_merge_compile(launches):
    _attention([(1, 16 * 64)], num_blocks=64)
    assert [k for k, _ in launches] == ["_paged_attention_kernel", "_merge_states_kernel"]


def test_a_cascade_over_one_block_compiles(launches):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 8, 64, generator=g).half()
    k = torch.randn(8, 16, 2, 64, generator=g).half()
    i32 = dict(dtype=torch.int32)
    tattn.shared_prefix_attention(
        torch.empty_like(q), torch.empty(1, 8), q, k, k.clone(), torch.tensor([[0]], **i32),
        torch.tensor([16], **i32), torch.tensor([0], **i32), torch.tensor([[1]], **i32),
        torch.tensor([5], **i32), None, scale=0.125, logits_soft_cap=None)
    kernels = [k for k, _ in launches]
    assert "_cascade_order_kernel" in kernels and kernels.count("_paged_attention_kernel") == 2
    assert _constant(launches, "_paged_attention_kernel", "max_blocks")


def test_merge_of_one_row_compiles(launches):
    o, lse = torch.randn(1, 1, 64), torch.randn(1, 1)
    tattn.merge_attention_states(torch.empty_like(o), torch.empty_like(lse), o, lse, o.clone(),
                                 lse.clone())
    assert _constant(launches, "_merge_two_kernel", "num_heads")


def test_cache_ops_of_one_token_and_one_block_compile(launches):
    g = torch.Generator().manual_seed(2)
    kc = torch.randn(1, 1, 2, 64, generator=g).half()
    vc = torch.randn_like(kc)
    one = torch.tensor([0], dtype=torch.int32)
    row = torch.randn(1, 2, 64, generator=g).half()
    tcache.write_kv(row, row.clone(), kc, vc, one)
    buf = torch.empty(1, 2, 1, 2, 64).half()
    tcache.gather_blocks(buf, [kc, vc], one)
    tcache.scatter_blocks([kc, vc], buf, one)
    tcache.copy_blocks([kc, vc], one, one)
    k8 = torch.zeros(1, 1, 2, 64, dtype=torch.float8_e4m3fn)
    scale = torch.tensor(1.0)
    tcache.write_kv(row.bfloat16(), row.bfloat16(), k8, k8.clone(), one.long(), k_scale=scale,
                    v_scale=scale)
    assert _constant(launches, "_write_kv_kernel", "num_slots")
    assert _constant(launches, "_gather_blocks_kernel", "num_rows")


def test_hashing_one_sequence_of_one_block_compiles(launches):
    out = torch.zeros(1, 8, dtype=torch.int32)
    thash.hash_blocks_triton(torch.arange(16, dtype=torch.int32),
                             torch.tensor([0, 16], dtype=torch.int32),
                             torch.zeros(1, dtype=torch.int32),
                             torch.zeros(1, 8, dtype=torch.int32), None,
                             torch.zeros(8, dtype=torch.int32), out, block_size=16,
                             num_steps=1)
    assert _constant(launches, "_hash_blocks_kernel", "num_seqs")
