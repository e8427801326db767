"""The tiny Llama decoder in numpy over the reference ops: the meaning of one model step.

Slow (every cache write copies the cache, as the functional reference does) and meant for small
tests: the JAX and torch models are checked against it, and the engine can run on it when no
framework is installed. Same adapter interface as :class:`~prefixkv.models.jax_llama.JaxLlama`.
"""

from __future__ import annotations

import numpy as np

from ..paged import reference as ref
from .batch import StepBatch
from .config import LlamaConfig


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x: [..., hidden_size] float32|float16|bfloat16, returned in x's dtype.

    Normalized in float32, then cast back before the weight, as the torch and JAX models do:
    left in float32, a bf16/f16 model's K and V reached write_kv as float32 and were refused
    against its bf16/f16 caches."""
    xf = x.astype(np.float32)
    var = np.mean(np.square(xf), axis=-1, keepdims=True)
    return (xf / np.sqrt(var + eps)).astype(x.dtype) * w


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: [T, H, D]; cos, sin: [T, D // 2]. Rotate-half RoPE."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    """In float32, returned in x's dtype (ml_dtypes promotes ``1.0 + bf16`` to float32)."""
    xf = x.astype(np.float32)
    return (xf / (1.0 + np.exp(-xf))).astype(x.dtype)


def matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x @ w in x's dtype: ml_dtypes' bfloat16 matmul returns float32 (its accumulator); torch
    and JAX round the product to bf16, and write_kv needs K and V in the caches' dtype."""
    return (x @ w).astype(x.dtype, copy=False)


class NumpyLlama:
    """Model adapter: holds the weights and every layer's paged K/V cache (numpy)."""

    static_shapes = False  # eager: the engine passes exact batch shapes
    name = "numpy"

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], *, num_blocks: int,
                 block_size: int):
        self.config, self.w = config, weights
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reset()

    def reset(self) -> None:
        c = self.config
        shape = (self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        dt = self.w["embed"].dtype
        self.caches = [np.zeros(shape, dt) for _ in range(2 * c.num_layers)]

    def forward(self, batch: StepBatch) -> np.ndarray:
        """Logits f32[num_seqs, vocab_size] at each sequence's last query token."""
        c, w = self.config, self.w
        t = batch.num_tokens
        x = w["embed"][batch.token_ids]
        cos, sin = w["rope_cos"][batch.positions], w["rope_sin"][batch.positions]
        for i in range(c.num_layers):
            p = f"layers.{i}."
            h = rms_norm(x, w[p + "attn_norm"], c.rms_norm_eps)
            q = matmul(h, w[p + "wq"]).reshape(t, c.num_q_heads, c.head_dim)
            k = matmul(h, w[p + "wk"]).reshape(t, c.num_kv_heads, c.head_dim)
            v = matmul(h, w[p + "wv"]).reshape(t, c.num_kv_heads, c.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kc, vc = ref.write_kv_reference(k, v, self.caches[2 * i], self.caches[2 * i + 1],
                                            batch.slot_mapping)
            self.caches[2 * i], self.caches[2 * i + 1] = kc, vc
            if batch.shared:
                attn = ref.shared_prefix_attention_reference(
                    q, kc, vc, batch.prefix_block_tables, batch.prefix_lens, batch.prefix_ids,
                    batch.suffix_block_tables, batch.suffix_kv_lens, batch.cu_q_lens)
            else:
                attn = ref.paged_attention_reference(q, kc, vc, batch.block_tables,
                                                     batch.kv_lens, batch.cu_q_lens)
            x = x + matmul(attn.reshape(t, -1), w[p + "wo"])
            h = rms_norm(x, w[p + "mlp_norm"], c.rms_norm_eps)
            x = x + matmul(silu(matmul(h, w[p + "w_gate"])) * matmul(h, w[p + "w_up"]),
                           w[p + "w_down"])
        last = rms_norm(x[batch.logits_indices], w["final_norm"], c.rms_norm_eps)
        return matmul(last, w["lm_head"]).astype(np.float32)

    def gather_blocks(self, block_ids: np.ndarray) -> np.ndarray:
        """[n, 2 * num_layers, block_size, num_kv_heads, head_dim] host copy (for offload)."""
        return ref.gather_blocks_reference(self.caches, np.asarray(block_ids, np.int32))

    def scatter_blocks(self, block_ids: np.ndarray, buffer: np.ndarray) -> None:
        """Write a gathered buffer back into blocks ``block_ids`` (onboard)."""
        self.caches = ref.scatter_blocks_reference(self.caches, buffer,
                                                   np.asarray(block_ids, np.int32))
