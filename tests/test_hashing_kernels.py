"""The hash_blocks kernels without a GPU/TPU: the Triton kernel under TRITON_INTERPRET=1 (in a
subprocess) and compiled for sm_80/sm_90, the CUDA kernel compiled by nvcc for sm_80/sm_90,
the Pallas kernel in interpret mode and lowered for TPU with jax.export. Results exact against
the BLAKE3 package (tests/hashing_cases.py's oracle)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from prefixkv.paged.reference.hashing import block_key, parent_words

sys.path.insert(0, str(Path(__file__).parent))
from hashing_cases import make_case, oracle  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("pallas_races")  # the Pallas TPU-interpret runs

# (block_size, lengths, salt, extra, parent): short chains, the interpreter is slow
KERNEL_CASES = {
    "b16_ragged": (16, [0, 15, 16, 33, 40], None, False, "none"),
    "b7_extra_parent": (7, [7, 13, 0, 15], "tenant", True, "per_seq"),
    "b1_shared_parent": (1, [3, 0, 2], b"\xffx", False, "shared"),
    "b100_seven_blocks": (100, [100, 150], "s", True, "none"),
    "empty": (16, [0, 0, 5], None, False, "none"),
}


def _inputs(name):
    block_size, lens, salt, with_extra, parent = KERNEL_CASES[name]
    case = make_case(np.random.default_rng(len(name) * 7919 + block_size), block_size, lens,
                     salt=salt, with_extra=with_extra, parent=parent)
    cu = case["cu_lens"].astype(np.int64)
    nb = np.diff(cu) // block_size
    key = np.array(struct.unpack("<8I", block_key(salt, with_extra)), dtype=np.uint32)
    return case, nb, key, parent_words(case["parent"], len(lens))


# ------------------------------------------------------------------------------- Triton

_TRITON_SCRIPT = r"""
import sys
import numpy as np, torch
sys.path.insert(0, {tests!r})
from test_hashing_kernels import KERNEL_CASES, _inputs
from test_hashing_jax import oracle
from prefixkv.kernels.triton.hashing import hash_blocks_triton
for name in KERNEL_CASES:
    case, nb, key, parents = _inputs(name)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x).view(np.int32))
    out = torch.full((int(nb.sum()), 8), -1, dtype=torch.int32)  # unwritten rows fail
    boff = (np.cumsum(nb) - nb).astype(np.int32)
    extra = None if case["extra"] is None else t(case["extra"])
    hash_blocks_triton(t(case["tokens"]), t(case["cu_lens"]), t(boff), t(parents), extra, t(key),
                       out, block_size=case["block_size"], num_steps=int(nb.max()), block_s=4)
    got = out.numpy().view(np.uint32)
    exp = oracle(**case)
    assert got.shape == exp.shape and np.array_equal(got, exp), name
    print("ok", name, flush=True)
"""


@pytest.mark.slow(seconds=20)
def test_triton_interpreted_matches_blake3():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = _TRITON_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == len(KERNEL_CASES)


@pytest.mark.parametrize("capability, block_size, has_extra", [
    (90, 1, False), (80, 7, True), (90, 128, True), (80, 244, True)])
def test_triton_compiles_for_gpu(capability, block_size, has_extra):
    """Compiled for sm_80/sm_90 in seconds at any block size: the rounds and the message's
    64-byte blocks are loops (fully unrolled, 128-token blocks compiled for over 10 minutes)."""
    triton = pytest.importorskip("triton")
    from prefixkv.kernels.triton.hashing import _hash_blocks_kernel, launch_geometry
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    nblk, last_len = launch_geometry(block_size, has_extra)
    sig = {n: "*i32" for n in ("tok_ptr", "cu_ptr", "boff_ptr", "parent_ptr", "ext_ptr",
                               "key_ptr", "out_ptr")}
    sig.update(num_seqs="i32", num_steps="i32")
    constexprs = dict(BLOCK_SIZE=block_size, HAS_EXTRA=has_extra, NBLK=nblk,
                      LAST_LEN=last_len, BLOCK_S=32)
    sig.update({k: "constexpr" for k in constexprs})
    compiled = triton.compile(ASTSource(_hash_blocks_kernel, sig, constexprs),
                              target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": 1})
    ptx = compiled.asm["ptx"]
    assert f".target sm_{capability}" in ptx
    assert "shf.r.wrap.b32" in ptx or "shf.l.wrap.b32" in ptx  # rotations became funnel shifts
    assert compiled.metadata.shared == 0


def test_triton_rejects_multi_chunk_messages():
    pytest.importorskip("triton")
    from prefixkv.kernels.triton.hashing import launch_geometry

    assert launch_geometry(248, False) == (16, 64)
    with pytest.raises(ValueError, match="block_size <= 244"):
        launch_geometry(245, True)


# --------------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_kernel_compiles(arch, tmp_path):
    src = ROOT / "kernels" / "cuda" / "blake3_hash.cu"
    proc = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", str(src),
                           "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "prefixkv_hash_blocks_v1" in proc.stderr
    assert "0 bytes spill stores" in proc.stderr  # state and message stay in registers


def test_cuda_launcher_checks_block_size():
    from prefixkv.kernels.cuda.hashing import check_block_size

    check_block_size(248, False)
    with pytest.raises(ValueError, match="block_size <= 248"):
        check_block_size(249, False)
    for bad in (0, -8):  # the kernels divide by it
        with pytest.raises(ValueError, match=f"block_size: expected >= 1, got {bad}"):
            check_block_size(bad, True)


# ------------------------------------------------------------------------------- Pallas


@pytest.mark.parametrize("name, mode", [("b16_ragged", "generic"), ("empty", "generic"),
                                        ("b7_extra_parent", "tpu")])
def test_pallas_interpreted_matches_blake3(name, mode):
    """generic: interpret=True; tpu: TPU interpret mode (VMEM scratch, out-of-bounds reads
    raise, uninitialized memory NaN)."""
    from jax.experimental.pallas import tpu as pltpu
    from prefixkv.kernels.pallas.hashing import hash_blocks_pallas

    interpret = True if mode == "generic" else pltpu.InterpretParams(
        out_of_bounds_reads="raise", uninitialized_memory="nan")

    case, nb, key, parents = _inputs(name)
    extra = None if case["extra"] is None else jnp.asarray(case["extra"])
    got = hash_blocks_pallas(jnp.asarray(case["tokens"].view(np.uint32)),
                             jnp.asarray(case["cu_lens"]), jnp.asarray(key),
                             jnp.asarray(parents), extra, block_size=case["block_size"],
                             num_out=int(nb.sum()), num_steps=int(nb.max()),
                             interpret=interpret)
    np.testing.assert_array_equal(np.asarray(got), oracle(**case))


@pytest.mark.parametrize("num_seqs, sub, grid_rows, mode", [
    (300, 2, 2, "tpu"), (1100, 5, 2, "generic"), (2100, 8, 3, "generic")])
def test_pallas_tiles_many_sequences(num_seqs, sub, grid_rows, mode):
    """Sequences fill (sub, 128) tiles: more than 256 make two grid rows, more than 1792
    whole 8 x 128 tiles; lanes past the last sequence are padding. Exact against BLAKE3, with
    extra words and per-sequence parents, in interpret mode."""
    from jax.experimental.pallas import tpu as pltpu
    from prefixkv.kernels.pallas.hashing import LANES, hash_blocks_pallas, sublanes

    assert sublanes(num_seqs) == sub and -(-num_seqs // (sub * LANES)) == grid_rows
    rng = np.random.default_rng(num_seqs)
    lens = rng.integers(0, 3 * 8 + 1, num_seqs)
    lens[-1] = 3 * 8  # the longest sequence sits in the last grid row
    case = make_case(rng, 8, lens.tolist(), salt="t", with_extra=True, parent="per_seq")
    nb = np.diff(case["cu_lens"].astype(np.int64)) // 8
    key = np.array(struct.unpack("<8I", block_key("t", True)), dtype=np.uint32)
    got = hash_blocks_pallas(jnp.asarray(case["tokens"].view(np.uint32)),
                             jnp.asarray(case["cu_lens"]), jnp.asarray(key),
                             jnp.asarray(parent_words(case["parent"], num_seqs)),
                             jnp.asarray(case["extra"]), block_size=8, num_out=int(nb.sum()),
                             num_steps=int(nb.max()),
                             interpret=True if mode == "generic" else pltpu.InterpretParams(
                                 out_of_bounds_reads="raise", uninitialized_memory="nan"))
    np.testing.assert_array_equal(np.asarray(got), oracle(**case))


def test_pallas_through_the_frontend_with_traced_cu_lens():
    """backend="pallas_tpu" is refused off TPU; the kernel path itself under jit with a
    traced cu_lens (num_steps bound = num_tokens // block_size, padded rows zero)."""
    from prefixkv.kernels.pallas.hashing import hash_blocks_pallas

    case, nb, key, parents = _inputs("b16_ragged")
    n = case["tokens"].size

    @jax.jit
    def f(tok, cu):
        return hash_blocks_pallas(tok, cu, jnp.asarray(key), jnp.asarray(parents), None,
                                  block_size=16, num_out=n // 16, num_steps=n // 16,
                                  interpret=True)

    got = np.asarray(f(jnp.asarray(case["tokens"].view(np.uint32)), jnp.asarray(case["cu_lens"])))
    exp = oracle(**case)
    np.testing.assert_array_equal(got[:len(exp)], exp)
    assert not got[len(exp):].any()


@pytest.mark.parametrize("has_extra", [False, True])
def test_pallas_lowers_for_tpu(has_extra):
    from prefixkv.kernels.pallas.hashing import hash_blocks_pallas

    def f(tok, cu, key, parents, extra):
        return hash_blocks_pallas(tok, cu, key, parents, extra, block_size=16, num_out=64,
                                  num_steps=16)

    u32 = jnp.uint32
    args = (jax.ShapeDtypeStruct((1024,), u32), jax.ShapeDtypeStruct((5,), jnp.int32),
            jax.ShapeDtypeStruct((8,), u32), jax.ShapeDtypeStruct((4, 8), u32),
            jax.ShapeDtypeStruct((64, 4), u32) if has_extra else None)
    exported = jax.export.export(jax.jit(f), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    assert "tpu_custom_call" in text


@pytest.mark.parametrize("num_seqs, vector", [(2100, "vector<8x128xi32>"),
                                              (100, "vector<1x128xi32>")])
def test_pallas_hashes_on_whole_vregs(num_seqs, vector, monkeypatch, capsys):
    """The Mosaic module lowered for TPU: the BLAKE3 rounds of a large batch work on whole
    8 x 128 int32 vregs; a batch of 100 sequences has one 128-lane row of them."""
    import re
    from collections import Counter

    from jax.experimental import pallas as pl
    from prefixkv.kernels.pallas.hashing import hash_blocks_pallas

    pallas_call = pl.pallas_call
    monkeypatch.setattr(pl, "pallas_call", lambda *a, **k: pallas_call(*a, **k, debug=True))

    def f(tok, cu, key, parents):
        return hash_blocks_pallas(tok, cu, key, parents, None, block_size=16, num_out=64,
                                  num_steps=16)

    u32 = jnp.uint32
    jax.export.export(jax.jit(f), platforms=["tpu"])(
        jax.ShapeDtypeStruct((4096,), u32), jax.ShapeDtypeStruct((num_seqs + 1,), jnp.int32),
        jax.ShapeDtypeStruct((8,), u32), jax.ShapeDtypeStruct((num_seqs, 8), u32))
    shapes = Counter(re.findall(r"vector<[0-9x]+xi32>", capsys.readouterr().out))
    assert shapes.most_common(1)[0][0] == vector, shapes
