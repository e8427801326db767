"""One engine step as the models take it: a ragged batch of prefill chunks and decode tokens.

All arrays are host numpy int32; each model adapter moves them to its framework. Shapes are
padded to fixed buckets by the engine so that compiled (jitted) forwards are reused:

    token_ids, positions, slot_mapping: i32[num_tokens]     (padding: token 0, slot -1)
    cu_q_lens: i32[num_seqs + 1];  kv_lens: i32[num_seqs]   (padding sequences: q_len 0)
    block_tables: i32[num_seqs, max_blocks_per_seq]
    logits_indices: i32[num_seqs]  row of the last query token of each sequence

Padding tokens belong to the last sequence, whose block table row is the pool's null block 0
(no request owns it; the padding is never written: slot -1), so every batch meets the op
contract (docs/host.md, "Fixed-size batches").

With shared-prefix groups (``prefix_ids is not None``) the attention runs as
``shared_prefix_attention``: ``prefix_block_tables`` (i32[num_prefixes, max_prefix_blocks]),
``prefix_lens`` (multiples of block_size) and ``prefix_ids`` (i32[num_seqs], -1 = none) name the
shared blocks, and ``suffix_block_tables`` / ``suffix_kv_lens`` each sequence's own tokens after
its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepBatch:
    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    cu_q_lens: np.ndarray
    kv_lens: np.ndarray
    block_tables: np.ndarray
    logits_indices: np.ndarray
    num_real_tokens: int
    num_real_seqs: int
    prefix_block_tables: np.ndarray | None = None
    prefix_lens: np.ndarray | None = None
    prefix_ids: np.ndarray | None = None
    suffix_block_tables: np.ndarray | None = None
    suffix_kv_lens: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.kv_lens.shape[0])

    @property
    def shared(self) -> bool:
        """Whether this step runs shared_prefix_attention."""
        return self.prefix_ids is not None

    def shape_key(self) -> tuple:
        """What a compiled forward depends on (bucketed sizes and the attention variant)."""
        key = (self.num_tokens, self.num_seqs, self.block_tables.shape[1], self.shared)
        if self.shared:
            key += tuple(self.prefix_block_tables.shape)
        return key
