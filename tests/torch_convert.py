"""numpy <-> torch for the torch and Triton tests (bfloat16 through its 16-bit pattern, since
torch.from_numpy does not know ml_dtypes' bfloat16), and the attention check they share."""

from __future__ import annotations

import numpy as np
import torch
from prefixkv.paged.spec import ATTENTION_TOLERANCE, numpy_dtype

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def T(x, device="cpu"):
    """numpy (incl. ml_dtypes bfloat16) -> torch tensor on ``device`` (a copy); None stays."""
    if x is None:
        return None
    x = np.asarray(x)
    if x.dtype == numpy_dtype("bfloat16"):
        return torch.from_numpy(x.view(np.uint16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(x.copy()).to(device)


def N(t):
    """torch -> float64 numpy (host)."""
    return t.detach().to(torch.float64).cpu().numpy()


def close(got, want, dtype):
    atol, rtol = ATTENTION_TOLERANCE[dtype]
    np.testing.assert_allclose(N(got), np.asarray(want).astype(np.float64), atol=atol, rtol=rtol)


def check_paged_attention(b, dtype, **opts):
    """torch_frontend.paged_attention of the ragged batch ``b`` (paged.testing) against the
    reference, into out= and lse= pre-filled with NaN (an unwritten row fails)."""
    from prefixkv.paged import reference as ref

    from prefixkv import torch_frontend as tf

    want, want_lse = ref.paged_attention_reference(*b.args(), return_lse=True, **opts)
    out = torch.full(b.q.shape, float("nan"), dtype=TORCH_DTYPE[dtype])
    lse = torch.full(b.q.shape[:2], float("nan"))
    got, got_lse = tf.paged_attention(*(T(a) for a in b.args()), return_lse=True, out=out,
                                      lse=lse, **opts)
    assert got is out and got_lse is lse
    close(got, want, dtype)
    np.testing.assert_allclose(N(got_lse), want_lse, atol=1e-4, rtol=1e-4)
    return want
