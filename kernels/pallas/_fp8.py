"""float8_e4m3fn bytes -> float32 inside Pallas kernels, exactly, with no float8 conversion.

e4m3fn: sign | 4 exponent bits (bias 7) | 3 mantissa bits; subnormals m * 2^-9; 0x7f and 0xff
NaN (no inf). The kernels read an fp8 cache through an int8 view (a free bitcast of the same
bytes) and decode with integer ops and a bitcast, which lower in interpret mode, through
Mosaic (TPU) and through Triton (GPU) alike. Exact: every fp8 value is a float32 (and a
bfloat16 or float16) value.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def as_bytes(cache):
    """A float8_e4m3fn cache as int8 (the same bytes: a bitcast, no copy)."""
    return lax.bitcast_convert_type(cache, jnp.int8)


def fp8_e4m3_to_f32(b):
    """int8/uint8 bytes -> float32 through float32 bits (the TPU kernel: TPUs have no float16
    vector unit). A normal byte's 7 low bits shifted by 20 are its exponent and mantissa in
    float32 position; + 120 << 23 moves the bias from 7 to 127. A subnormal (exponent 0) is
    its mantissa m * 2^-9 (an exact int -> float). Then the sign; NaN bytes selected."""
    x = b.astype(jnp.int32) & 0xFF
    mag = x & 0x7F
    normal = lax.bitcast_convert_type((mag << 20) + (120 << 23), jnp.float32)
    f = jnp.where(mag < 8, (mag & 7).astype(jnp.float32) * (2.0 ** -9), normal)
    f = jnp.where(x >= 0x80, -f, f)
    return jnp.where(mag == 0x7F, jnp.float32(jnp.nan), f)


def fp8_e4m3_to_f32_via_f16(b):
    """int8/uint8 bytes -> float32 as the Triton kernel of the torch frontend decodes them
    (kernels/triton/attention.py _fp8_e4m3_to_f32; the GPU kernel): integer ops place the byte
    in float16 bits (sign << 8, the other 7 bits << 7: exponent bias 15, so the float16 is the
    value * 2^-8, e4m3 subnormals on float16 subnormals with the same mantissa), an exact
    float16 -> float32 conversion and * 256; NaN bytes selected."""
    x = b.astype(jnp.int32) & 0xFF
    bits = (((x & 0x80) << 8) | ((x & 0x7F) << 7)).astype(jnp.uint16)
    f = lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32) * 256.0
    return jnp.where((x & 0x7F) == 0x7F, jnp.float32(jnp.nan), f)


def scale_pair(k_scale, v_scale):
    """f32[2] (k_scale, v_scale), None as 1.0: the kernels' scales input (traced or not)."""
    return jnp.stack([jnp.ones((), jnp.float32) if s is None
                      else jnp.asarray(s, jnp.float32).reshape(()) for s in (k_scale, v_scale)])
