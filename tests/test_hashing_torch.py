"""prefixkv.torch_frontend.hash_blocks against the BLAKE3 package: the vectorized torch path
and the host path on CPU (triton/cuda when a GPU is present), exact words on ragged batches,
the custom op (opcheck, torch.compile), and one pytest.raises per input check."""

from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hashing_cases import CASES, make_case, oracle
from prefixkv.paged.hashing import kernel_supports
from prefixkv.paged.registry import BackendError
from prefixkv.paged.validate import value_checks
from prefixkv.torch_frontend._hashing import HASH_BLOCKS_BACKENDS, hash_blocks

CPU_BACKENDS = [name for name, why in HASH_BLOCKS_BACKENDS.explain("cpu").items()
                if why == "ok"]
GPU_BACKENDS = (["triton", "cuda", "torch"] if torch.cuda.is_available() else [])


def _torch_case(case, device):
    def t(x):
        return None if x is None else torch.from_numpy(x).to(device)

    parent = case["parent"]
    return dict(tokens=t(case["tokens"]), cu_lens=t(case["cu_lens"]), extra=t(case["extra"]),
                parent=t(parent) if isinstance(parent, np.ndarray) else parent)


def _words(x: torch.Tensor) -> np.ndarray:
    assert x.dtype == torch.uint32
    return x.view(torch.int32).cpu().numpy().view(np.uint32)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_matches_blake3(name, backend):
    block_size, lens, salt, with_extra, parent = CASES[name]
    case = make_case(np.random.default_rng(zlib.crc32(name.encode())), block_size, lens,
                     salt=salt, with_extra=with_extra, parent=parent)
    args = _torch_case(case, "cpu")
    got = hash_blocks(args.pop("tokens"), block_size, salt=salt, backend=backend, **args)
    np.testing.assert_array_equal(_words(got), oracle(**case))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_matches_blake3(name, backend):
    """Every case on the torch path; on the one-chunk kernels (triton, cuda) the cases whose
    messages fit one BLAKE3 chunk, and a clear refusal for the others (b248 with extra: 1040
    bytes; b300)."""
    block_size, lens, salt, with_extra, parent = CASES[name]
    if backend == "cuda":
        pytest.importorskip("cupy")
    case = make_case(np.random.default_rng(zlib.crc32(name.encode())), block_size, lens,
                     salt=salt, with_extra=with_extra, parent=parent)
    args = _torch_case(case, "cuda")
    if backend != "torch" and not kernel_supports(block_size, with_extra)[0]:
        with pytest.raises(BackendError, match="over one BLAKE3 chunk"):
            hash_blocks(args.pop("tokens"), block_size, salt=salt, backend=backend, **args)
        return
    got = hash_blocks(args.pop("tokens"), block_size, salt=salt, backend=backend, **args)
    assert got.device.type == "cuda"
    np.testing.assert_array_equal(_words(got), oracle(**case))


def test_default_backend_on_cpu_and_parent_continues():
    tokens = torch.randint(0, 1000, (80,), dtype=torch.int32)
    whole = hash_blocks(tokens, 16, salt="p")
    np.testing.assert_array_equal(_words(whole), oracle(tokens.numpy(), 16, salt="p"))
    tail = hash_blocks(tokens[32:], 16, salt="p", parent=whole[1])
    np.testing.assert_array_equal(_words(tail), _words(whole)[2:])


def test_salts_isolate():
    tokens = torch.arange(64, dtype=torch.int32)
    rows = {s: {r.tobytes() for r in _words(hash_blocks(tokens, 16, salt=s))}
            for s in (None, "a", "b")}
    assert not rows[None] & rows["a"] and not rows["a"] & rows["b"] and not rows[None] & rows["b"]


def test_custom_op_opcheck_and_compile():
    from prefixkv.torch_frontend._hashing import _key_tensor

    tokens = torch.randint(0, 1000, (40,), dtype=torch.int32)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    parents = torch.zeros((2, 8), dtype=torch.int32)
    extra = torch.randint(0, 2**31 - 1, (4, 4), dtype=torch.int32)  # 2 + 2 blocks of 8
    for ex in (extra, None):  # without extra the output size depends on cu's values
        torch.library.opcheck(torch.ops.prefixkv.hash_blocks_v1,
                              (tokens, 8, cu, _key_tensor(b"k", True), parents, ex, "torch"))

    @torch.compile(fullgraph=True)
    def f(tokens, cu, extra):
        return torch.ops.prefixkv.hash_blocks_v1(tokens, 8, cu, _key, parents, extra, None)

    _key = _key_tensor(b"k", True)
    got = f(tokens, cu, extra).numpy().view(np.uint32)
    exp = oracle(tokens.numpy(), 8, cu.numpy(), salt=b"k", extra=extra.numpy().view(np.uint32))
    np.testing.assert_array_equal(got, exp)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_with_a_salt_over_any_number_of_sequences(dynamic):
    """hash_blocks with a salt, compiled with fullgraph, called for 2 then 3 sequences (a
    recompile with a symbolic sequence count, or dynamic=True at once): the same digests as
    eager (the salt's traced checks had taken the symbolic count as a constant's argument)."""
    def fn(tokens, cu_lens):
        return hash_blocks(tokens, 4, cu_lens=cu_lens, salt="x")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=dynamic)
    tokens = torch.arange(40, dtype=torch.int32)
    for cu in ([0, 9, 40], [0, 4, 12, 40]):
        cu = torch.tensor(cu, dtype=torch.int32)
        assert torch.equal(compiled(tokens, cu), fn(tokens, cu))


def test_host_constants_marked_as_torch_marks_them():
    """_constant_to_compile sets what torch.compiler.assume_constant_result sets (without
    importing torch._dynamo), and a compiled call with a salt and a host parent (the three
    functions it marks) gives eager's digests with fullgraph."""
    import torch._dynamo  # noqa: F401 - the public decorator imports it anyway
    from prefixkv.torch_frontend import _hashing

    def theirs():
        pass

    def ours():
        pass

    torch.compiler.assume_constant_result(theirs)
    _hashing._constant_to_compile(ours)
    assert vars(ours) == vars(theirs) and vars(ours)
    for fn in (_hashing._key_words, _hashing._checked_salt, _hashing._parent_rows):
        assert vars(fn).items() >= vars(theirs).items(), fn.__name__
    parent = bytes(range(32))

    def step(tokens):
        return hash_blocks(tokens, 4, salt="x", parent=parent)

    torch._dynamo.reset()
    tokens = torch.arange(12, dtype=torch.int32)
    got = torch.compile(step, fullgraph=True, backend="eager")(tokens)
    assert torch.equal(got, step(tokens))


def test_import_does_not_load_dynamo():
    """Importing the torch frontend does not import torch._dynamo (as long to import as torch
    itself): a program that never compiles does not pay for it."""
    code = ("import sys, prefixkv.torch_frontend\n"
            "print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False", r.stdout


GOOD = dict(tokens=torch.arange(32, dtype=torch.int32), block_size=16)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(tokens=torch.arange(32)), TypeError, "tokens: expected int32"),
    (dict(block_size=0), ValueError, "block_size: expected >= 1"),
    (dict(block_size=True), TypeError, "block_size: expected an int"),
    (dict(cu_lens=torch.tensor([0, 32])), TypeError, "cu_lens: expected int32"),
    (dict(salt=1.5), TypeError, "salt: expected str, bytes or None"),
    (dict(extra=torch.zeros((2, 4), dtype=torch.int32)), TypeError, "extra: expected uint32"),
    (dict(extra=torch.zeros((1, 4), dtype=torch.uint32)), ValueError, "extra: expected 2 rows"),
    (dict(parent=[None, None]), ValueError, "parent: expected a list of num_seqs"),
    (dict(tokens=torch.tensor([0, -1] + [0] * 30, dtype=torch.int32)), ValueError,
     "tokens: expected token ids >= 0"),
    (dict(cu_lens=torch.tensor([0, 20, 10, 32], dtype=torch.int32)), ValueError,
     "cu_lens: expected non-decreasing"),
    (dict(cu_lens=torch.tensor([0, 31], dtype=torch.int32)), ValueError,
     r"cu_lens: expected cu_lens\[-1\]"),
    (dict(tokens=np.arange(32, dtype=np.int32)), TypeError,
     "tokens: expected a torch.Tensor, got ndarray"),
    (dict(extra=np.zeros((2, 4), np.uint32)), TypeError,
     "extra: expected a torch.Tensor, got ndarray"),
    (dict(parent=np.zeros(8, np.uint32)), TypeError,
     "parent: expected None, 32 bytes, a list or a torch.Tensor, got ndarray"),
])
def test_bad_input(kwargs, exc, match):
    args = {**GOOD, **kwargs}
    with value_checks(), pytest.raises(exc, match=match):
        hash_blocks(args.pop("tokens"), args.pop("block_size"), **args)


def test_cu_lens_checked_even_without_value_checks():
    with value_checks(False):
        hash_blocks(torch.tensor([0, -5] + [0] * 30, dtype=torch.int32), 16)  # ids unchecked
        with pytest.raises(ValueError, match=r"cu_lens: expected cu_lens\[-1\]"):
            hash_blocks(GOOD["tokens"], 16, cu_lens=torch.tensor([0, 40], dtype=torch.int32))


def test_backend_errors():
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        hash_blocks(GOOD["tokens"], 16, backend="nope")
    with pytest.raises(BackendError, match="triton.*runs on cuda"):
        hash_blocks(GOOD["tokens"], 16, backend="triton")
    ok, why = HASH_BLOCKS_BACKENDS._backends["triton"].supports(block_size=249)
    assert not ok and "block_size <= 248" in why


@pytest.mark.parametrize("backend", [b for b, why in HASH_BLOCKS_BACKENDS.explain("cpu").items()
                                     if why == "ok"])
def test_no_full_block_with_a_huge_block_size(backend):
    """Zero full blocks: an empty result (the C chain had sized its buffers by block_size,
    a MemoryError for 2**40). Past int32 a block size is refused by name (2**63 had raised an
    OverflowError naming nothing)."""
    out = hash_blocks(torch.arange(4, dtype=torch.int32), 2**30, backend=backend)
    assert tuple(out.shape) == (0, 8)
    for huge in (2**31, 2**40, 2**63):
        with pytest.raises(ValueError, match=r"block_size: expected at most 2\*\*31 - 1"):
            hash_blocks(torch.arange(4, dtype=torch.int32), huge, backend=backend)


@pytest.mark.parametrize("missing", ["extension", "extension_and_blake3"])
def test_cpu_host_path_without_the_extension(monkeypatch, missing):
    """Without the compiled kernel the torch CPU default stays on the host path (the blake3
    package, else keyed BLAKE3 in Python): it had fallen to the vectorized torch ops, ~2000x
    slower than the kernel and ~12x slower than pure Python. Pure Python warns, once."""
    import sys
    import warnings

    from prefixkv.kernels.cpu import hashing as cpu
    from prefixkv.paged import hashing as host

    case = make_case(np.random.default_rng(7), 16, [40, 33, 5], salt="x", with_extra=True,
                     parent=None)
    want = oracle(**case)
    monkeypatch.setattr(cpu, "load_extension", lambda: None)
    if missing == "extension_and_blake3":
        monkeypatch.setitem(sys.modules, "blake3", None)
        host._warn_pure_python.cache_clear()
    assert HASH_BLOCKS_BACKENDS.explain("cpu")["host"] == "ok"
    calls = []
    real = host.keyed_chain_digests
    monkeypatch.setattr(sys.modules["prefixkv.torch_frontend._hashing"], "keyed_chain_digests",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            args = _torch_case(case, "cpu")
            got = hash_blocks(args.pop("tokens"), 16, salt="x", **args)
            np.testing.assert_array_equal(_words(got), want)
    assert calls == [1, 1]  # the host backend ran, not the torch ops
    slow = [w for w in seen if "pure Python" in str(w.message)]
    assert len(slow) == (1 if missing == "extension_and_blake3" else 0)
    assert all("pip install 'prefixkv[hash]'" in str(w.message) for w in slow)
