"""The tiny Llama decoder in JAX, its attention through :mod:`prefixkv.jax_frontend`.

One jitted forward per (bucketed) batch shape and attention variant: embed, then per layer
RMSNorm, q/k/v projections, RoPE at each token's absolute position, ``write_kv`` of this step's
keys and values into the paged cache, ``paged_attention`` over it (``shared_prefix_attention``
when the step has shared-prefix groups; planned on the host each step, the plan passed into
the jitted forward), the output projection and a SwiGLU MLP; finally the logits of each
sequence's last token. The caches are donated, so XLA updates them in place.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..paged import validate
from .batch import StepBatch
from .config import LlamaConfig


def _rms_norm(x, w, eps):
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def forward(ops, cfg: LlamaConfig, shared: bool, w: dict, caches: list, a: dict, plan):
    """Pure forward: (logits f32[num_seqs, vocab], updated caches). ``a``: the batch arrays;
    ``plan``: the step's attention plan (its metadata checked on the host)."""
    t = a["token_ids"].shape[0]
    x = w["embed"][a["token_ids"]]
    cos, sin = w["rope_cos"][a["positions"]], w["rope_sin"][a["positions"]]
    new_caches = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        h = _rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
        q = (h @ w[p + "wq"]).reshape(t, cfg.num_q_heads, cfg.head_dim)
        k = (h @ w[p + "wk"]).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = (h @ w[p + "wv"]).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        kc, vc = ops.write_kv(k, v, caches[2 * i], caches[2 * i + 1], a["slot_mapping"])
        new_caches += [kc, vc]
        attn = plan.run(q, kc, vc)
        x = x + attn.reshape(t, -1) @ w[p + "wo"]
        h = _rms_norm(x, w[p + "mlp_norm"], cfg.rms_norm_eps)
        x = x + (jax.nn.silu(h @ w[p + "w_gate"]) * (h @ w[p + "w_up"])) @ w[p + "w_down"]
    last = _rms_norm(x[a["logits_indices"]], w["final_norm"], cfg.rms_norm_eps)
    return (last @ w["lm_head"]).astype(jnp.float32), new_caches


#: The batch arrays of the forward besides the attention metadata (in the plan).
_BATCH_FIELDS = ("token_ids", "positions", "slot_mapping", "logits_indices")
#: The shared-prefix plan's metadata before cu_q_lens.
_SHARED_FIELDS = ("prefix_block_tables", "prefix_lens", "prefix_ids", "suffix_block_tables",
                  "suffix_kv_lens")


class JaxLlama:
    """Model adapter (see :mod:`prefixkv.models.engine`) holding JAX weights and caches.

    device: a JAX platform or device string ("cpu", "gpu", "tpu"; default: JAX's default).
    ops: the module providing the ops (default :mod:`prefixkv.jax_frontend`).
    """

    static_shapes = True  # the engine pads batches to a few bucketed shapes (jit)
    name = "jax"

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], *, num_blocks: int,
                 block_size: int, device: str | None = None, ops=None):
        if ops is None:
            from .. import jax_frontend as ops
        self.ops, self.config = ops, config
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = jax.devices(device)[0] if device else jax.devices()[0]
        self.w = {k: jax.device_put(jnp.asarray(v), self.device) for k, v in weights.items()}
        self._fwd = {}
        # donated, as the forward's: an eager scatter would copy every layer's whole cache
        # (measured: 2 blocks onboarded into 1 GiB of caches took 1.6 s, 0.2 ms donated)
        self._scatter = jax.jit(ops.scatter_blocks, donate_argnums=(0,))
        self.reset()

    def reset(self) -> None:
        c = self.config
        shape = (self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        dt = self.w["embed"].dtype
        self.caches = [jax.device_put(jnp.zeros(shape, dt), self.device)
                       for _ in range(2 * c.num_layers)]

    def _compiled(self, shared: bool):
        fn = self._fwd.get(shared)
        if fn is None:
            fn = jax.jit(partial(forward, self.ops, self.config, shared), donate_argnums=(1,))
            self._fwd[shared] = fn
        return fn

    def forward(self, batch: StepBatch) -> np.ndarray:
        arrays = jax.device_put({n: getattr(batch, n) for n in _BATCH_FIELDS},
                                self.device)  # one call
        # the attention metadata checked on the host once per step (traced inside the jitted
        # forward, the ops could not check it), on the caches' device; a pytree argument
        like = dict(k_cache=self.caches[0], num_q_heads=self.config.num_q_heads)
        if batch.shared:
            plan = self.ops.plan_shared_prefix_attention(
                *(getattr(batch, n) for n in _SHARED_FIELDS), batch.cu_q_lens, **like)
        else:
            plan = self.ops.plan_paged_attention(batch.block_tables, batch.kv_lens,
                                                 batch.cu_q_lens, **like)
        logits, self.caches = self._compiled(batch.shared)(self.w, self.caches, arrays, plan)
        return np.asarray(logits)

    # Offload/onboard move a varying number of blocks; the ops run on fixed pieces of
    # BLOCK_PIECE blocks so that one compiled shape per op serves every count.
    BLOCK_PIECE = 16

    def gather_blocks(self, block_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(block_ids, np.int32)
        p, out = self.BLOCK_PIECE, []
        for start in range(0, max(len(ids), 1), p):
            part = ids[start:start + p]
            padded = np.zeros(p, np.int32)  # pad with the null block 0 (read only)
            padded[:len(part)] = part
            got = self.ops.gather_blocks(self.caches, jax.device_put(padded, self.device))
            out.append(np.asarray(got)[:len(part)])
        return np.concatenate(out)

    def scatter_blocks(self, block_ids: np.ndarray, buffer: np.ndarray) -> None:
        ids = np.asarray(block_ids, np.int32)
        # the jitted scatter sees traced ids, which the frontend cannot check: check them here
        validate.check_block_ids_values(self.num_blocks, ids, distinct=True)
        buffer = np.asarray(buffer)
        p = self.BLOCK_PIECE
        for start in range(0, len(ids), p):
            part, buf = ids[start:start + p], buffer[start:start + p]
            if len(part) < p:
                # fill the piece with other blocks written back with their own contents
                # (distinct ids, no change), so the scatter keeps its one compiled shape
                taken = set(part.tolist())
                fill = np.asarray([b for b in range(self.num_blocks) if b not in taken]
                                  [:p - len(part)], np.int32)
                part = np.concatenate([part, fill])
                buf = np.concatenate([buf, self.gather_blocks(fill)])
            self.caches = list(self._scatter(
                self.caches, jax.device_put(jnp.asarray(buf), self.device),
                jax.device_put(part, self.device)))
