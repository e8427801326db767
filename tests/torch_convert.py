"""numpy <-> torch for the torch and Triton tests (bfloat16 through its 16-bit pattern, since
torch.from_numpy does not know ml_dtypes' bfloat16)."""

from __future__ import annotations

import numpy as np
import torch
from prefixkv.paged.spec import numpy_dtype

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
