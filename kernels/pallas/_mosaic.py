"""Helpers of the Mosaic TPU kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ref_index(i: int):
    """A static index ``i`` into a ref or a semaphore array (a DMA's buffer slot, its
    semaphore): the Python int itself, or with ``jax_enable_x64`` on an int32 constant. A
    Python int is traced as int64 there, and Mosaic takes 32-bit indices only: no TPU DMA
    kernel lowered with x64 on ("'tpu.memref_slice' op operand #1 must be variadic of 32-bit
    signless integer")."""
    return jnp.int32(i) if jax.config.jax_enable_x64 else i
