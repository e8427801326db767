"""A tiny Llama-style decoder configuration and its deterministic random weights.

The weights are generated once, in numpy, from a seed, so the JAX model and the torch model hold
bit-identical parameters (nothing is downloaded). Shapes, with ``D = head_dim``::

    embed:               [vocab_size, hidden_size]
    layers.{i}.attn_norm [hidden_size]
    layers.{i}.wq        [hidden_size, num_q_heads * D]
    layers.{i}.wk, .wv   [hidden_size, num_kv_heads * D]
    layers.{i}.wo        [num_q_heads * D, hidden_size]
    layers.{i}.mlp_norm  [hidden_size]
    layers.{i}.w_gate, .w_up [hidden_size, intermediate_size]
    layers.{i}.w_down    [intermediate_size, hidden_size]
    final_norm           [hidden_size]
    lm_head              [hidden_size, vocab_size]
    rope_cos, rope_sin   [max_model_len, D // 2]  (float64-computed, stored in the model dtype)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from ..paged.spec import numpy_dtype


@dataclass(frozen=True)
class LlamaConfig:
    """Sizes of the tiny decoder and of its paged KV cache (one cache per layer)."""

    vocab_size: int = 512
    hidden_size: int = 256
    num_layers: int = 2
    num_q_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_model_len: int = 1024
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_q_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_model_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads={self.num_q_heads} must be divisible by "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even value (RoPE pairs), got {self.head_dim}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {self.dtype!r}")

    def replace(self, **changes) -> LlamaConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers."""
        itemsize = numpy_dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the layers (attention scores excluded)."""
        h, d = self.hidden_size, self.head_dim
        qkvo = h * d * (2 * self.num_q_heads + 2 * self.num_kv_heads)
        mlp = 3 * h * self.intermediate_size
        return 2 * self.num_layers * (qkvo + mlp)


def rope_tables(config: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [max_model_len, head_dim // 2] in float64.

    Pair i of a head rotates by angle ``position * rope_theta ** (-2 i / head_dim)``
    (the "rotate half" layout: element i pairs with element i + head_dim / 2).
    """
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) * 2.0 / config.head_dim)
    angles = np.arange(config.max_model_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def init_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random weights (numpy, ``config.dtype``) for a seed.

    Matrices are standard normal scaled by ``fan_in ** -0.5``; norm weights ``1 + 0.1 * N(0,1)``
    so that RMSNorm's scale matters. The embedding is scaled by 1 so the first layer sees
    unit-variance inputs.
    """
    rng = np.random.default_rng(seed)
    dt = numpy_dtype(config.dtype)
    h, d = config.hidden_size, config.head_dim
    hq, hkv, inter = config.num_q_heads, config.num_kv_heads, config.intermediate_size

    def mat(fan_in: int, fan_out: int) -> np.ndarray:
        return (rng.standard_normal((fan_in, fan_out)) * fan_in ** -0.5).astype(dt)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(dt)

    w: dict[str, np.ndarray] = {
        "embed": rng.standard_normal((config.vocab_size, h)).astype(dt)}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        w[p + "attn_norm"] = norm()
        w[p + "wq"] = mat(h, hq * d)
        w[p + "wk"] = mat(h, hkv * d)
        w[p + "wv"] = mat(h, hkv * d)
        w[p + "wo"] = mat(hq * d, h)
        w[p + "mlp_norm"] = norm()
        w[p + "w_gate"] = mat(h, inter)
        w[p + "w_up"] = mat(h, inter)
        w[p + "w_down"] = mat(inter, h)
    w["final_norm"] = norm()
    w["lm_head"] = mat(h, config.vocab_size)
    cos, sin = rope_tables(config)
    w["rope_cos"] = cos.astype(dt)
    w["rope_sin"] = sin.astype(dt)
    return w
