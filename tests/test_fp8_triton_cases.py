"""The Triton fp8 write_kv kernel under TRITON_INTERPRET=1 against the numpy reference, bit for
bit (run in a subprocess by tests/test_fp8.py::test_triton_fp8_write_kv_under_interpreter;
skipped when collected without the variable): every hand-computed case of QUANT_CASES, every
tie between two adjacent float8_e4m3fn values and its float32 neighbours, random values over
every binade, from float32, float16 and bfloat16 keys, into strided (stacked K/V) caches."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (tests/test_fp8.py starts it)",
                allow_module_level=True)
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from prefixkv.kernels.triton import cache as tcache  # noqa: E402
from prefixkv.paged import reference as ref  # noqa: E402
from prefixkv.paged.spec import numpy_dtype  # noqa: E402
from test_fp8 import F8, _write_cases  # noqa: E402
from torch_convert import T  # noqa: E402


def _t8(x):
    return torch.from_numpy(np.asarray(x).view(np.uint8).copy()).view(torch.float8_e4m3fn)


def _ties_and_neighbours() -> np.ndarray:
    """Every midpoint between adjacent non-negative finite e4m3 values (exact in float32), the
    float32 values either side of it, and the same negated: 2 * 3 * 126 values."""
    vals = np.arange(0x7F, dtype=np.uint8).view(F8).astype(np.float32)  # 0 .. 448
    mids = (vals[:-1] + vals[1:]) / np.float32(2)
    around = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)),
                             np.nextafter(mids, np.float32(-np.inf))])
    return np.concatenate([around, -around]).astype(np.float32)


def _write(values: np.ndarray, scale, dtype: str):
    """values written as key and (reversed) value rows through the kernel and the reference,
    into the K/V halves of a stacked cache: (got_k, got_v, want_k, want_v) as bits."""
    heads, dim = 3, 16
    rows = -(-values.size // (heads * dim))
    key = np.zeros(rows * heads * dim, np.float32)
    key[:values.size] = values
    key = key.reshape(rows, heads, dim)
    val = key[::-1].copy()
    with np.errstate(over="ignore"):
        key, val = key.astype(numpy_dtype(dtype)), val.astype(numpy_dtype(dtype))
    num_blocks, block_size = rows // 4 + 2, 4
    rng = np.random.default_rng(rows)
    kc = ref.quantize_fp8_reference(rng.standard_normal((num_blocks, block_size, heads, dim)))
    vc = ref.quantize_fp8_reference(rng.standard_normal((num_blocks, block_size, heads, dim)))
    slots = rng.permutation(num_blocks * block_size)[:rows].astype(np.int32)
    slots[0] = -1 if rows > 1 else slots[0]
    want_k, want_v = ref.write_kv_reference(key, val, kc, vc, slots, k_scale=scale,
                                            v_scale=scale)
    stacked = torch.stack([_t8(kc), _t8(vc)], dim=1)
    tk, tv = stacked[:, 0], stacked[:, 1]
    s = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    tcache.write_kv(T(key), T(val), tk, tv, T(slots), k_scale=s, v_scale=s)
    return (tk.view(torch.uint8).numpy(), tv.view(torch.uint8).numpy(),
            want_k.view(np.uint8), want_v.view(np.uint8))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_hand_computed_cases(dtype):
    for scale, values in [*_write_cases("none"), *_write_cases("float")]:
        values = np.array([*values, -np.nan], np.float32)
        gk, gv, wk, wv = _write(values, scale, dtype)
        np.testing.assert_array_equal(gk, wk, err_msg=f"{dtype} {scale}")
        np.testing.assert_array_equal(gv, wv, err_msg=f"{dtype} {scale}")


@pytest.mark.parametrize("scale", [None, 1.0, 0.5])
def test_every_tie_and_its_neighbours(scale):
    """With scale 0.5 the ties are divided onto other values: the division is covered too."""
    gk, gv, wk, wv = _write(_ties_and_neighbours(), scale, "float32")
    np.testing.assert_array_equal(gk, wk)
    np.testing.assert_array_equal(gv, wv)


@pytest.mark.parametrize("scale", [0.37, 3.1, 1e-3])
def test_random_values_over_every_binade(scale):
    rng = np.random.default_rng(int(scale * 1000))
    x = (rng.uniform(1, 2, 4000) * 2.0 ** rng.integers(-14, 12, 4000)
         * rng.choice([-1, 1], 4000)).astype(np.float32)
    gk, gv, wk, wv = _write(x, scale, "float32")
    np.testing.assert_array_equal(gk, wk)
    np.testing.assert_array_equal(gv, wv)
