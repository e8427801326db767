"""Triton kernels under TRITON_INTERPRET=1 on caches of more than 2**31 elements: every offset
that can pass 2**31 is computed in int64. Not collected (run by tests/test_triton_interp.py in
a subprocess: a wrapped offset makes the interpreter read or write far outside and the process
dies). The caches are torch.empty, committed lazily: ~11 GB of address space, a few MB touched
(peak RSS ~300 MB). Prints one line per case, exits 0 when all pass, 3 when the machine cannot
reserve the address space (no overcommit).

1. A block-major cache [blocks, 16, 3, 128] f16 used at its last blocks (offsets past 2**31 by
   the block index): write_kv, paged_attention (split and not), gather/scatter/copy_blocks.
2. A head-outermost view ([kv_heads, blocks, 16, 128] storage seen as [blocks, 16, kv_heads,
   128], "any strides"): with 3 heads of 2**30 + 32768 elements, head 2 starts at element
   2**31 + 65536, reached through ``head * head_stride`` (write_kv, paged_attention).
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_interp.py"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from prefixkv.kernels.triton import attention as tattn  # noqa: E402
from prefixkv.kernels.triton import cache as tcache  # noqa: E402

BS, H, D = 16, 3, 128
failed = []


def check(name, got, want, atol=0.0):
    err = float((got.float() - want.float()).abs().max())
    ok = bool(err <= atol) and not bool(got.isnan().any())
    print(f"{name}: max |got - want| {err:.3g} -> {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        failed.append(name)


def attend(q, k, v, table, kv_lens, num_splits=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lse = torch.full(q.shape[:2], float("nan"))
    tattn.paged_attention(out, lse, q, k, v, table, kv_lens, None, scale=D ** -0.5, causal=True,
                          sliding_window=None, logits_soft_cap=None, num_splits=num_splits)
    return out


def empty(*shape):
    try:
        return torch.empty(shape, dtype=torch.float16)
    except RuntimeError as e:  # pragma: no cover - a machine without overcommit
        print(f"cannot reserve {np.prod(shape) * 2 / 2**30:.1f} GB of address space: {e}")
        sys.exit(3)


rng = np.random.default_rng(0)
key = torch.from_numpy(rng.standard_normal((2 * BS, H, D)).astype(np.float16))
val = torch.from_numpy(rng.standard_normal((2 * BS, H, D)).astype(np.float16))
small_k, small_v = key.reshape(2, BS, H, D).clone(), val.reshape(2, BS, H, D).clone()
q = torch.from_numpy(rng.standard_normal((1, 2 * H, D)).astype(np.float16))  # group 2
kv = torch.tensor([2 * BS], dtype=torch.int32)
want = attend(q, small_k, small_v, torch.tensor([[0, 1]], dtype=torch.int32), kv)


def slots_of(blocks):
    return (blocks[:, None] * BS + torch.arange(BS, dtype=torch.int32)).reshape(-1)


# 1. block-major, the last blocks
nb = 2**31 // (BS * H * D) + 64
kc, vc = empty(nb, BS, H, D), empty(nb, BS, H, D)
assert kc.numel() > 2**31
blocks = torch.tensor([nb - 1, nb - 40], dtype=torch.int32)
tcache.write_kv(key, val, kc, vc, slots_of(blocks))
check("block-major write_kv at the last blocks (K)", kc[blocks.long()], small_k)
check("block-major write_kv at the last blocks (V)", vc[blocks.long()], small_v)
for splits in (None, 2):
    check(f"block-major paged_attention over the last blocks (splits {splits})",
          attend(q, kc, vc, blocks[None, :].clone(), kv, splits), want, atol=1e-3)
buf = torch.full((2, 2, BS, H, D), float("nan"), dtype=torch.float16)
tcache.gather_blocks(buf, [kc, vc], blocks)
check("block-major gather_blocks of the last blocks", buf, torch.stack([small_k, small_v], 1))
tcache.copy_blocks([kc, vc], blocks[:1], torch.tensor([nb - 7], dtype=torch.int32))
check("block-major copy_blocks between the last blocks", kc[nb - 7], small_k[0])
tcache.scatter_blocks([kc, vc], buf.flip(0).contiguous(), blocks)
check("block-major scatter_blocks to the last blocks", kc[nb - 1], small_k[1])
del kc, vc

# 2. head-outermost views: head 2 past 2**31 elements
nb = (2**30 + 32768) // (BS * D)
kc = empty(H, nb, BS, D).permute(1, 2, 0, 3)
vc = empty(H, nb, BS, D).permute(1, 2, 0, 3)
assert 2 * kc.stride(2) >= 2**31 and kc.stride(2) < 2**31
blocks = torch.tensor([7, 3], dtype=torch.int32)
tcache.write_kv(key, val, kc, vc, slots_of(blocks))
check("head-outer write_kv (K)", kc[blocks.long()], small_k)
check("head-outer write_kv (V)", vc[blocks.long()], small_v)
for splits in (None, 2):
    check(f"head-outer paged_attention (splits {splits})",
          attend(q, kc, vc, blocks[None, :].clone(), kv, splits), want, atol=1e-3)

print("FAILED: " + ", ".join(failed) if failed else "PASS", flush=True)
sys.exit(1 if failed else 0)
