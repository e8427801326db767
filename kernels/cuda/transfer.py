"""Host -> GPU copies of small index tensors that do not stall the stream."""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A CPU tensor bound for a GPU goes through pinned memory with a
    non-blocking copy: from pageable memory the copy waits for all work queued on the stream.
    A tensor pinned already is copied to a pinned tensor of its own first: the caller may
    refill its buffer (an engine's staging buffer) before the stream reaches the copy.
    Under torch.compile tracing, a plain ``.to``."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        staged = (torch.empty_like(t, pin_memory=True).copy_(t) if t.is_pinned()
                  else t.pin_memory())
        return staged.to(device, non_blocking=True)
    return t.to(device)
