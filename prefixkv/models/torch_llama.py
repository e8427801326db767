"""The tiny Llama decoder in PyTorch, its attention through :mod:`prefixkv.torch_frontend`.

Same computation as :mod:`prefixkv.models.jax_llama` (same numpy weights): per layer RMSNorm,
q/k/v projections, RoPE at absolute positions, ``write_kv`` (in place) of this step's keys and
values, ``paged_attention`` over the paged cache (``shared_prefix_attention`` when the step has
shared-prefix groups; planned once per step, run per layer), output projection, SwiGLU MLP;
logits of each sequence's last token.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..torch_frontend._host import from_numpy as to_torch
from ..torch_frontend._host import to_numpy
from .batch import StepBatch
from .config import LlamaConfig


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    var = (xf * xf).mean(dim=-1, keepdim=True)
    return (xf * torch.rsqrt(var + eps)).to(x.dtype) * w


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


class TorchLlama:
    """Model adapter (see :mod:`prefixkv.models.engine`) holding torch weights and caches.

    device: a torch device string ("cpu", "cuda", "cuda:1"; "gpu" means "cuda"; default "cpu").
    ops: the module providing the ops (default :mod:`prefixkv.torch_frontend`).
    """

    static_shapes = False  # eager: the engine passes exact batch shapes
    name = "torch"

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], *, num_blocks: int,
                 block_size: int, device: str | None = None, ops=None):
        if ops is None:
            from .. import torch_frontend as ops
        self.ops, self.config = ops, config
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device({"gpu": "cuda"}.get(device, device) or "cpu")
        self.w = {k: to_torch(v, self.device) for k, v in weights.items()}
        self.reset()

    def reset(self) -> None:
        c = self.config
        shape = (self.num_blocks, self.block_size, c.num_kv_heads, c.head_dim)
        dt = self.w["embed"].dtype
        self.caches = [torch.zeros(shape, dtype=dt, device=self.device)
                       for _ in range(2 * c.num_layers)]

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return to_torch(x, self.device)

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> np.ndarray:
        cfg, w, ops = self.config, self.w, self.ops
        t = batch.num_tokens
        slots, cu = self._t(batch.slot_mapping), self._t(batch.cu_q_lens)
        # the step's attention metadata checked once, for every layer (torch_frontend._plan)
        like = dict(k_cache=self.caches[0], num_q_heads=cfg.num_q_heads)
        if batch.shared:
            plan = ops.plan_shared_prefix_attention(*(self._t(getattr(batch, n)) for n in (
                "prefix_block_tables", "prefix_lens", "prefix_ids", "suffix_block_tables",
                "suffix_kv_lens")), cu, **like)
        else:
            plan = ops.plan_paged_attention(self._t(batch.block_tables),
                                            self._t(batch.kv_lens), cu, **like)
        positions = self._t(batch.positions).long()
        x = w["embed"][self._t(batch.token_ids).long()]
        cos, sin = w["rope_cos"][positions], w["rope_sin"][positions]
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            h = _rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
            q = (h @ w[p + "wq"]).view(t, cfg.num_q_heads, cfg.head_dim)
            k = (h @ w[p + "wk"]).view(t, cfg.num_kv_heads, cfg.head_dim)
            v = (h @ w[p + "wv"]).view(t, cfg.num_kv_heads, cfg.head_dim)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            kc, vc = self.caches[2 * i], self.caches[2 * i + 1]
            ops.write_kv(k, v, kc, vc, slots)  # in place
            attn = plan.run(q, kc, vc)
            x = x + attn.reshape(t, -1) @ w[p + "wo"]
            h = _rms_norm(x, w[p + "mlp_norm"], cfg.rms_norm_eps)
            x = x + (F.silu(h @ w[p + "w_gate"]) * (h @ w[p + "w_up"])) @ w[p + "w_down"]
        idx = self._t(batch.logits_indices).long()
        last = _rms_norm(x[idx], w["final_norm"], cfg.rms_norm_eps)
        return (last @ w["lm_head"]).float().cpu().numpy()

    @torch.inference_mode()
    def gather_blocks(self, block_ids: np.ndarray) -> np.ndarray:
        ids = self._t(np.asarray(block_ids, np.int32))
        return to_numpy(self.ops.gather_blocks(self.caches, ids))

    @torch.inference_mode()
    def scatter_blocks(self, block_ids: np.ndarray, buffer: np.ndarray) -> None:
        ids = self._t(np.asarray(block_ids, np.int32))
        self.ops.scatter_blocks(self.caches, self._t(buffer), ids)  # in place
