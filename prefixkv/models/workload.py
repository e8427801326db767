"""The deterministic request stream the demo and the tests serve.

Two tenants (each with its own salt, so their caches never share a block) run multi-turn chats
that all start with the same system prompt; turn ``k`` of a chat is turn ``k - 1``'s prompt
plus a fixed assistant reply and a new user message, so it extends the earlier turn. A few
unique prompts (nothing shared) are mixed in. The stream is ordered turn by turn, chats of the
two tenants interleaved, unique prompts spread through it. With the defaults about 90% of the
prompt tokens lie in a prefix that an earlier request of the same tenant already had
(:func:`shared_prefix_fraction`).

:func:`arrival_times` gives the stream an open-loop schedule (a Poisson process at a request
rate, as vLLM's ``benchmark_serving.py --request-rate``) for ``Engine.run(arrivals=...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Request:
    request_id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    tenant: str
    salt: bytes | None
    kind: str          # "chat" or "unique"
    chat: int = -1     # chat index within the stream (-1 for unique prompts)
    turn: int = 0


@dataclass(frozen=True)
class WorkloadConfig:
    system_prompt_len: int = 768
    chats_per_tenant: int = 6
    turns: int = 3
    user_len: int = 16
    assistant_len: int = 16
    num_unique: int = 4
    unique_len: int = 128
    max_new_tokens: int = 8
    tenants: tuple[str, ...] = ("acme", "globex")
    seed: int = 0

    def replace(self, **changes) -> WorkloadConfig:
        from dataclasses import replace

        return replace(self, **changes)


def make_workload(config: WorkloadConfig, vocab_size: int,
                  num_requests: int | None = None) -> list[Request]:
    """The request stream for ``config`` (token ids in ``[1, vocab_size)``), optionally cut to
    its first ``num_requests`` requests."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size: expected >= 2, got {vocab_size}")
    rng = np.random.default_rng(config.seed)

    def tokens(n: int) -> list[int]:
        return rng.integers(1, vocab_size, size=n).tolist()

    system = tokens(config.system_prompt_len)
    chats = []  # (tenant, [prompt of turn 0, 1, ...])
    for _ in range(config.chats_per_tenant):
        for tenant in config.tenants:
            prompt = system + tokens(config.user_len)
            turns = [list(prompt)]
            for _ in range(1, config.turns):
                prompt = prompt + tokens(config.assistant_len) + tokens(config.user_len)
                turns.append(list(prompt))
            chats.append((tenant, turns))
    uniques = [(config.tenants[u % len(config.tenants)], tokens(config.unique_len))
               for u in range(config.num_unique)]

    order: list[tuple] = []
    for t in range(config.turns):
        for ci, (tenant, turns) in enumerate(chats):
            order.append(("chat", tenant, turns[t], ci, t))
    # spread the unique prompts evenly through the stream
    step = max(len(order) // (len(uniques) + 1), 1)
    for u, (tenant, prompt) in reversed(list(enumerate(uniques))):
        order.insert(min((u + 1) * step, len(order)), ("unique", tenant, prompt, -1, 0))
    if num_requests is not None:
        order = order[:num_requests]
    return [Request(request_id=i, prompt=tuple(prompt), max_new_tokens=config.max_new_tokens,
                    tenant=tenant, salt=f"tenant-{tenant}".encode(), kind=kind, chat=ci,
                    turn=turn)
            for i, (kind, tenant, prompt, ci, turn) in enumerate(order)]


def arrival_times(num_requests: int, request_rate: float, seed: int = 0,
                  burstiness: float = 1.0) -> np.ndarray:
    """f64[num_requests] arrival times in seconds from the start of a run, a Poisson process
    at ``request_rate`` requests/s: the first request at 0 and each next one an exponential gap
    of mean ``1 / request_rate`` later (vLLM's benchmark sends one request, then sleeps such a
    gap before the next), so non-decreasing. ``request_rate=inf``: every request at 0.
    ``burstiness`` B (vLLM's ``--burstiness``): the gaps are Gamma(shape B, scale
    1 / (request_rate B)), of the same mean and a coefficient of variation 1 / sqrt(B): B < 1
    burstier than Poisson (a burst can land requests at the same time), B > 1 more even;
    B = 1 is the exponential (the same schedule as without it). Seeded (its own generator,
    not the workload's token stream): the same times for the same ``(num_requests,
    request_rate, seed, burstiness)``, and the first ``n`` of a longer schedule are the
    schedule of ``n``."""
    if num_requests < 0:
        raise ValueError(f"num_requests: expected >= 0, got {num_requests}")
    if not request_rate > 0:  # also refuses NaN
        raise ValueError(f"request_rate: expected > 0 requests/s (inf: all at once), got "
                         f"{request_rate}")
    if not 0 < burstiness < math.inf:
        raise ValueError(f"burstiness: expected a finite value > 0 (1: Poisson), got "
                         f"{burstiness}")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    rng, n = np.random.default_rng((seed, 1)), max(num_requests - 1, 0)
    if burstiness == 1.0:
        gaps = rng.exponential(1.0 / request_rate, size=n)
    else:
        gaps = rng.gamma(burstiness, 1.0 / (request_rate * burstiness), size=n)
    return np.concatenate([np.zeros(min(num_requests, 1)), np.cumsum(gaps)])


def _lcp(a: tuple, b: tuple) -> int:
    m = min(len(a), len(b))
    x, y = np.asarray(a[:m]), np.asarray(b[:m])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else m


def shared_prefix_fraction(requests: list[Request]) -> float:
    """Fraction of prompt tokens that lie in a prefix an earlier request of the same salt had
    (token granularity; the cache hits whole blocks, never the last token)."""
    total = shared = 0
    seen: dict[bytes | None, list[tuple]] = {}
    for r in requests:
        earlier = seen.setdefault(r.salt, [])
        best = max((_lcp(r.prompt, p) for p in earlier), default=0)
        shared += min(best, len(r.prompt))
        total += len(r.prompt)
        earlier.append(r.prompt)
    return shared / total if total else 0.0
