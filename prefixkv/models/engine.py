"""A framework-agnostic serving loop over :class:`~prefixkv.paged.prefix_cache.PrefixCache`.

The engine schedules, the ``paged/`` manager allocates, matches prefixes (salt-aware), evicts
and plans, and a *model adapter* runs the forward pass in its framework. An adapter has::

    adapter.name                       # "jax", "torch", "numpy"
    adapter.forward(batch: StepBatch) -> np.ndarray   # f32[num_seqs, vocab] last-token logits
    adapter.gather_blocks(block_ids) -> np.ndarray    # [n, 2 * num_layers, *block_shape]
    adapter.scatter_blocks(block_ids, buffer)         # onboard a gathered buffer
    adapter.reset()                                   # fresh (zeroed) caches
    adapter.caches                                    # per-layer K, V (shape/dtype for tiers)
    adapter.static_shapes                             # True: pad batches to bucketed shapes

Each step (continuous batching, chunked prefill, as vLLM's scheduler): running sequences in
decode get one token each, then sequences still in prefill get chunks of their uncached prompt
tokens up to ``max_num_batched_tokens``, then new requests are admitted into the free sequence
slots, each matched against the cache and given its chunk (when tokens are left) before the
next is matched; a chunk shrinks when the pool is short, and when a decode token cannot get a
block the most recently admitted other sequence is preempted (freed and re-queued from
scratch).

Arrivals. By default a closed loop: a request is admitted when a sequence slot is free (it
arrives when a previous one leaves), and its time to first token (TTFT) is measured from that
moment to the end of the step that sampled its first token. ``run(arrivals=...)`` makes it an
open loop, as vLLM's ``benchmark_serving.py --request-rate``: request ``i`` arrives at
``arrivals[i]`` seconds (wall clock) after the run starts (:func:`~.workload.arrival_times`: a
Poisson process), is never admitted before then, and its TTFT and latency count from its
arrival, so they include the time it queued for a slot; when no sequence is running and the
next request has not arrived the engine sleeps until it does (``RunResult.idle_s``). All
arrivals at 0 admit as the closed loop does, with TTFT from 0. A preempted request keeps its
arrival (or first admission) and the time of its first token; its latency counts the
recomputation. In the closed loop, requests that share a system prompt finish together and
their successors are admitted together (a lockstep that the open loop does not have).

Cache at allocation (vLLM's ``cache_blocks`` in ``allocate_slots``): each scheduled chunk is
allocated and committed as it is scheduled, so the full blocks it fills are in the cache's
index before the next request of the same step is matched. Requests admitted in one step that
share a prefix (a system prompt) compute it once: the later ones hit the blocks the chunks
scheduled before them fill, their attention reading the KV that the same forward pass writes,
which is correct because every model adapter writes the KV of the whole batch's tokens
(``write_kv``) before its attention reads the cache, layer by layer. A committed chunk is
always part of that step's forward (preemptions happen only before the first commit of a
step), and hits hold references, so no block matched in a step is freed or reused before the
forward that writes it. A request admitted when no token is left in the step is matched then,
not again when it gets tokens (as vLLM matches a waiting request): on the demo that raised the
hit rate 88.2% -> 89.9% but let requests sharing a prompt finish in the same step, so in its
closed loop their successors arrived, and prefilled, together: TTFT p50 12.8 -> 18.1 ms in a
model of the torch step costs (20 -> 28 ms measured).

Offload: when the pool evicts a cached block (an ``"evicted"`` event, published before the
block is reused), its KV is gathered (``gather_blocks``) into a
:class:`~prefixkv.paged.tiers.HostTier` through a
:class:`~prefixkv.paged.tiers.BlockOffloader`, keyed by (model namespace + salt, block hash);
a later request whose prefix continues past the device hit into the host tier gets those
blocks onboarded (read from the tier, ``PrefixCache.onboard``, ``scatter_blocks``) instead of
recomputed.

Counters: prefix-hit rate = (device-hit + onboarded tokens) / prompt tokens; decode tokens/s =
tokens sampled by sequences already past their prompt / wall time of the steps that sampled
them (steps are mixed, so other requests' prefill chunks in those steps count against it).

For adapters with ``static_shapes`` (JAX), shapes are bucketed (tokens to 16, 64, 256, ...,
sequences to ``max_num_seqs + 1``, block tables to :attr:`EngineConfig.table_width`) so compiled
forwards are reused; :meth:`Engine.warmup` compiles every bucket before anything is timed.
Eager adapters (torch, numpy) get the exact batch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..paged.events import EVICTED, KVEvent
from ..paged.planner import plan_batch
from ..paged.prefix_cache import PrefixCache
from ..paged.spec import dtype_name, numpy_dtype
from ..paged.tiers import BlockOffloader, HostTier, Namespace
from ..paged.validate import check_int
from .batch import StepBatch
from .workload import Request

I32 = np.int32


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    # device pool, null block 0 included: room for max_num_seqs of the demo's longest requests
    # with caching off (3 x 54 blocks), too small to keep every cached block with caching on
    num_blocks: int = 164
    max_num_seqs: int = 3
    max_num_batched_tokens: int = 256
    max_model_len: int = 1024
    enable_caching: bool = True
    shared_prefix: bool = True       # shared_prefix_attention for groups the planner finds
    host_blocks: int = 512           # host tier capacity in blocks (0: no offload)
    min_token_bucket: int = 16
    bucket_growth: int = 4           # token buckets 16, 64, 256, ...: few compiled shapes

    def __post_init__(self) -> None:
        # Checked when made (replace() makes a new one, so it is checked too): a bad value
        # fails here, naming its field, instead of hanging (token_buckets never reaches the
        # token budget when min_token_bucket < 1 or bucket_growth < 2) or failing later under
        # another argument's name (a step that schedules nothing read as "num_blocks: the
        # pool cannot hold one sequence"; host_blocks < 0 as the tier's budget_bytes).
        # numpy ints are stored as Python ints, so equal configs hash alike.
        for name, minimum, hint in (
                ("block_size", 1, ""),
                ("num_blocks", 2, " (block 0 is the null block)"),
                ("max_num_seqs", 1, ""),
                ("max_num_batched_tokens", 1, " (tokens a step may compute)"),
                ("max_model_len", 1, ""),
                ("host_blocks", 0, " (0: no offload)"),
                ("min_token_bucket", 1, " (the smallest padded step)"),
                # an int: buckets are token counts (array sizes); 1 would never grow
                ("bucket_growth", 2, " (each token bucket this many times the last)")):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum, hint))
        for name in ("enable_caching", "shared_prefix"):  # a truthy string would pass silently
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name}: expected a bool, got {value!r}")
            object.__setattr__(self, name, bool(value))

    def replace(self, **changes) -> EngineConfig:
        from dataclasses import replace

        return replace(self, **changes)

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    @property
    def table_width(self) -> int:
        """Block-table columns of a padded batch: a sequence's blocks, or the padding
        sequence's, whose kv_len is the padding count (up to the token budget), all over the
        null block (the ops check kv_len <= columns x block_size)."""
        return max(self.max_blocks_per_seq, -(-self.max_num_batched_tokens // self.block_size))

    def token_buckets(self) -> list[int]:
        out, b = [], self.min_token_bucket
        while b < self.max_num_batched_tokens:
            out.append(b)
            b *= self.bucket_growth
        out.append(self.max_num_batched_tokens)
        return out


@dataclass(eq=False)  # identity: the scheduler's membership tests and removals stay O(1) per
class _Seq:           # sequence (field-wise __eq__ made each step O(running^2))
    req: Request
    rid: int
    tokens: list[int]
    num_computed: int = 0
    generated: list[int] = field(default_factory=list)
    arrival: float = 0.0
    first_token: float | None = None
    finish: float | None = None
    cached_tokens: int = 0       # device hits
    onboarded_tokens: int = 0    # host-tier hits
    final_logits: np.ndarray | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prompt_len


@dataclass
class RequestResult:
    request_id: int
    tenant: str
    prompt_len: int
    cached_tokens: int
    onboarded_tokens: int
    output_tokens: list[int]
    ttft_s: float
    latency_s: float
    final_logits: np.ndarray


@dataclass
class RunResult:
    framework: str
    enable_caching: bool
    requests: list[RequestResult]
    wall_s: float
    steps: int
    shared_prefix_steps: int
    decode_tokens: int
    decode_step_s: float
    blocks_evicted: int
    blocks_offloaded: int
    blocks_onboarded: int
    preemptions: int
    warmup_s: float = 0.0
    open_loop: bool = False      # run(arrivals=...): TTFT and latency from each arrival
    idle_s: float = 0.0          # open loop: time slept with nothing running, waiting for one

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_len for r in self.requests)

    @property
    def hit_tokens(self) -> int:
        return sum(r.cached_tokens + r.onboarded_tokens for r in self.requests)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / max(self.prompt_tokens, 1)

    def ttft(self, q: float) -> float:
        return float(np.percentile([r.ttft_s for r in self.requests], q))

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_step_s if self.decode_step_s else 0.0

    def outputs(self) -> dict[int, list[int]]:
        return {r.request_id: r.output_tokens for r in self.requests}


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"num_tokens: {n} exceeds the largest bucket {buckets[-1]}")


class Engine:
    """Serves a request stream with one model adapter over one PrefixCache."""

    def __init__(self, adapter, config: EngineConfig | None = None, *,
                 model_id: str = "prefixkv-tiny-llama") -> None:
        self.adapter = adapter
        self.model_id = model_id
        self.config = config = config or EngineConfig()
        if getattr(adapter, "num_blocks", config.num_blocks) != config.num_blocks or getattr(
                adapter, "block_size", config.block_size) != config.block_size:
            raise ValueError(f"adapter: its cache has {adapter.num_blocks} blocks of "
                             f"{adapter.block_size}, the engine expects {config.num_blocks} of "
                             f"{config.block_size}")
        model = getattr(adapter, "config", None)
        if model is not None and model.max_model_len < config.max_model_len:
            raise ValueError(f"config: max_model_len {config.max_model_len} is past the model's "
                             f"{model.max_model_len} (its RoPE table); positions past it would "
                             f"be clamped by JAX, not refused")
        self.vocab_size = None if model is None else model.vocab_size
        self.buckets = config.token_buckets()
        # compiled frameworks (JAX) get bucketed shapes; eager ones the exact batch
        self.static_shapes = bool(getattr(adapter, "static_shapes", True))
        self.num_seqs_padded = config.max_num_seqs + 1
        self.max_prefixes = max(config.max_num_seqs // 2, 1)

    # ------------------------------------------------------------------ batches
    def _unpadded(self, plan, token_ids: np.ndarray, logits_rows: np.ndarray) -> StepBatch:
        batch = StepBatch(
            token_ids=token_ids, positions=plan.positions, slot_mapping=plan.slot_mapping,
            cu_q_lens=plan.cu_q_lens, kv_lens=plan.kv_lens, block_tables=plan.block_tables,
            logits_indices=logits_rows.astype(I32), num_real_tokens=plan.num_tokens,
            num_real_seqs=plan.num_seqs)
        sp = plan.shared
        if sp is not None:
            batch.prefix_block_tables, batch.prefix_lens = sp.prefix_block_tables, sp.prefix_lens
            batch.prefix_ids, batch.suffix_block_tables = sp.prefix_ids, sp.block_tables
            batch.suffix_kv_lens = sp.kv_lens
        return batch

    def _pad(self, plan, token_ids: np.ndarray, logits_rows: np.ndarray) -> StepBatch:
        if not self.static_shapes:
            return self._unpadded(plan, token_ids, logits_rows)
        c = self.config
        t_real, s_real = plan.num_tokens, plan.num_seqs
        t = _bucket(max(t_real, 1), self.buckets)
        s = self.num_seqs_padded
        w = c.table_width
        pad = t - t_real

        def tokens(x, fill):
            out = np.full(t, fill, I32)
            out[:t_real] = x
            return out

        def table(x):
            out = np.zeros((s, w), I32)  # the null block 0
            out[:x.shape[0], :x.shape[1]] = x
            return out

        def lens(x, last):
            out = np.zeros(s, I32)
            out[:s_real] = x
            out[-1] = last
            return out

        cu = np.full(s + 1, t_real, I32)
        cu[:s_real + 1] = plan.cu_q_lens
        cu[-1] = t
        logits = np.zeros(s, I32)
        logits[:s_real] = logits_rows
        batch = StepBatch(
            token_ids=tokens(token_ids, 0), positions=tokens(plan.positions, 0),
            slot_mapping=tokens(plan.slot_mapping, -1), cu_q_lens=cu,
            kv_lens=lens(plan.kv_lens, pad), block_tables=table(plan.block_tables),
            logits_indices=logits, num_real_tokens=t_real, num_real_seqs=s_real)
        sp = plan.shared
        if sp is not None:
            p = sp.prefix_block_tables
            ptab = np.zeros((self.max_prefixes, w), I32)
            ptab[:p.shape[0], :p.shape[1]] = p
            plens = np.zeros(self.max_prefixes, I32)
            plens[:p.shape[0]] = sp.prefix_lens
            pids = np.full(s, -1, I32)
            pids[:s_real] = sp.prefix_ids
            batch.prefix_block_tables, batch.prefix_lens, batch.prefix_ids = ptab, plens, pids
            batch.suffix_block_tables = table(sp.block_tables)
            batch.suffix_kv_lens = lens(sp.kv_lens, pad)
        return batch

    def dummy_batch(self, num_tokens: int, shared: bool) -> StepBatch:
        """An all-padding batch of a bucket's shape (compiles the forward for that shape)."""
        c = self.config
        s, w = self.num_seqs_padded, c.table_width
        kv = np.zeros(s, I32)
        kv[-1] = num_tokens
        cu = np.zeros(s + 1, I32)
        cu[-1] = num_tokens
        z = np.zeros(num_tokens, I32)
        batch = StepBatch(token_ids=z, positions=z, slot_mapping=np.full(num_tokens, -1, I32),
                          cu_q_lens=cu, kv_lens=kv, block_tables=np.zeros((s, w), I32),
                          logits_indices=np.zeros(s, I32), num_real_tokens=0, num_real_seqs=0)
        if shared:
            batch.prefix_block_tables = np.zeros((self.max_prefixes, w), I32)
            batch.prefix_lens = np.zeros(self.max_prefixes, I32)
            batch.prefix_ids = np.full(s, -1, I32)
            batch.suffix_block_tables = batch.block_tables.copy()
            batch.suffix_kv_lens = kv.copy()
        return batch

    def warmup(self) -> float:
        """Run (compile) the forward once for every shape a run can produce; returns seconds."""
        t0 = time.perf_counter()
        if self.config.enable_caching:  # the block hash's first call (loads its kernel)
            PrefixCache(self.config.num_blocks, self.config.block_size).block_hashes(
                list(range(2 * self.config.block_size)))
        if not self.static_shapes:  # eager: one small call warms the kernels up
            self.adapter.forward(self.dummy_batch(self.buckets[0], False))
            self.adapter.reset()
            return time.perf_counter() - t0
        variants = [False, True] if (self.config.enable_caching and
                                     self.config.shared_prefix) else [False]
        for shared in variants:
            for b in self.buckets:
                self.adapter.forward(self.dummy_batch(b, shared))
        if self.config.enable_caching and self.config.host_blocks:  # offload/onboard ops
            ids = np.arange(1, min(3, self.config.num_blocks), dtype=I32)
            self.adapter.scatter_blocks(ids, self.adapter.gather_blocks(ids))
        self.adapter.reset()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ the loop
    def run(self, requests: Sequence[Request], *, arrivals: Sequence[float] | None = None,
            progress: Callable[[int], None] | None = None,
            clock: Callable[[], float] = time.perf_counter,
            sleep: Callable[[float], None] = time.sleep) -> RunResult:
        """Serve ``requests`` in order and return per-request results and counters.

        arrivals: f64[len(requests)] seconds after the run starts, finite, >= 0, nondecreasing
        (request ``i`` arrives at ``arrivals[i]``: an open loop, TTFT from arrival); None: the
        closed loop (TTFT from admission). clock, sleep: the wall clock (seconds) and how to
        wait on it (a test passes a fake pair)."""
        c = self.config
        self.adapter.reset()
        pc = PrefixCache(c.num_blocks, c.block_size, enable_caching=c.enable_caching,
                         shared_prefix=c.shared_prefix)
        adapter = self.adapter
        offloader = None
        if c.enable_caching and c.host_blocks:
            kv_dtype = dtype_name(adapter.caches[0])
            block_shape = (len(adapter.caches), *adapter.caches[0].shape[1:])
            block_bytes = int(np.prod(block_shape)) * numpy_dtype(kv_dtype).itemsize
            host = HostTier(c.host_blocks * block_bytes)
            offloader = BlockOffloader(
                host, Namespace(
                    self.model_id, layout=f"NHD-block{c.block_size}",
                    dtype=kv_dtype),
                gather=lambda caches, ids: adapter.gather_blocks(ids),
                scatter=lambda caches, buf, ids: adapter.scatter_blocks(ids, buf))
        counters = {"evicted": 0, "onboarded": 0}

        def on_event(ev: KVEvent) -> None:
            if ev.kind == EVICTED and ev.tier == "device":
                counters["evicted"] += len(ev.block_hashes)

        pc.events.subscribe(on_event)
        if offloader is not None:  # evicted blocks go to the host tier before their reuse
            offloader.offload_on_evict(pc.events, lambda: adapter.caches)
        for r in requests:
            if not len(r.prompt):  # the first token is sampled at the last prompt token: an
                # empty prompt has nothing to compute, and a step with nothing scheduled
                # would be blamed on num_blocks
                raise ValueError(f"requests: request {r.request_id} has an empty prompt, "
                                 f"expected at least one token")
            if len(r.prompt) + r.max_new_tokens > c.max_model_len:
                raise ValueError(f"requests: request {r.request_id} needs "
                                 f"{len(r.prompt) + r.max_new_tokens} tokens, max_model_len is "
                                 f"{c.max_model_len}")
            need = -(-(len(r.prompt) + r.max_new_tokens - 1) // c.block_size)
            if need > c.num_blocks - 1:
                raise ValueError(f"requests: request {r.request_id} needs {need} blocks, the "
                                 f"pool has {c.num_blocks - 1} (num_blocks minus the null "
                                 f"block)")
            if r.max_new_tokens < 1:
                raise ValueError(f"requests: request {r.request_id} has max_new_tokens "
                                 f"{r.max_new_tokens}, expected >= 1")
            if self.vocab_size is not None and len(r.prompt) and not (
                    np.min(r.prompt) >= 0 and np.max(r.prompt) < self.vocab_size):
                raise ValueError(f"requests: request {r.request_id} has token ids outside "
                                 f"[0, {self.vocab_size}) (the model's vocabulary): min "
                                 f"{np.min(r.prompt)} max {np.max(r.prompt)}")
        seen: set = set()
        for r in requests:  # results, arrivals and the cache's requests are keyed by id
            if r.request_id in seen:
                raise ValueError(f"requests: request id {r.request_id} appears more than once")
            seen.add(r.request_id)
        open_loop = arrivals is not None
        if open_loop:
            arrivals = np.asarray(arrivals, dtype=np.float64)
            if arrivals.shape != (len(requests),):
                raise ValueError(f"arrivals: expected shape ({len(requests)},) (one per "
                                 f"request), got {arrivals.shape}")
            if not (np.isfinite(arrivals).all() and (arrivals >= 0).all()):
                raise ValueError("arrivals: expected finite seconds >= 0, got "
                                 f"{arrivals[~(np.isfinite(arrivals) & (arrivals >= 0))][:3]}")
            if (np.diff(arrivals) < 0).any():  # the queue is served in order of arrival
                i = int(np.flatnonzero(np.diff(arrivals) < 0)[0])
                raise ValueError(f"arrivals: expected nondecreasing, got {arrivals[i]} then "
                                 f"{arrivals[i + 1]} (requests {i}, {i + 1})")
        pending: deque[Request] = deque(requests)
        running: list[_Seq] = []
        done: list[_Seq] = []
        steps = shared_steps = decode_tokens = preemptions = 0
        decode_s = idle_s = 0.0
        t_start = clock()

        # a preempted request keeps its first arrival and first token (what its user saw);
        # open loop: every arrival is known up front, closed loop: set at first admission
        arrived: dict[int, float] = {}
        if open_loop:
            arrived = {r.request_id: t_start + float(a)
                       for r, a in zip(requests, arrivals, strict=True)}
        first_tokens: dict[int, float] = {}

        def admit(req: Request, now: float) -> _Seq:
            seq = _Seq(req=req, rid=req.request_id, tokens=list(req.prompt),
                       arrival=arrived.setdefault(req.request_id, now),
                       first_token=first_tokens.get(req.request_id))
            seq.cached_tokens = pc.add_request(seq.rid, seq.tokens, salt=req.salt)
            seq.num_computed = seq.cached_tokens
            if offloader is not None:  # the next blocks from the host tier (read, verified,
                # then allocated, registered and scattered; a failed scatter is rolled back)
                _, got = offloader.onboard_request(pc, seq.rid, adapter.caches)
                if got:
                    counters["onboarded"] += got
                    seq.onboarded_tokens = got * c.block_size
                    seq.num_computed = pc.num_computed(seq.rid)
            return seq

        hold_admission = False  # no admission right after a preemption: let the others progress

        def preempt(victim: _Seq) -> None:
            nonlocal preemptions, hold_admission
            preemptions += 1
            hold_admission = True
            pc.free(victim.rid)
            running.remove(victim)
            preempted.add(victim)
            pending.appendleft(victim.req)

        def chunk(seq: _Seq, budget: int) -> int:
            """Prompt tokens ``seq`` can compute now: within the budget and the free blocks."""
            n = min(seq.prompt_len - seq.num_computed, budget)
            free = pc.pool.num_free
            while n > 0 and pc.blocks_needed(seq.rid, n) > free:
                room = len(pc.blocks(seq.rid)) * c.block_size - seq.num_computed
                n = min(n - 1, room + free * c.block_size)
            return n

        def schedule(seq: _Seq, n: int) -> None:
            """Put ``n`` tokens of ``seq`` in this step: allocated and committed now, so the
            full blocks they fill are cached at once and a request matched later in this step
            hits them (this step's forward writes them before any attention reads them)."""
            contexts.append(seq.num_computed)
            if pc.allocate(seq.rid, n):  # copy-on-write needs fork(), which is never done here
                raise RuntimeError("plan: copy-on-write pairs in a batch without forks")
            pc.commit(seq.rid, n)
            items.append((seq, n))

        def waiting(now: float) -> float:
            """Seconds until the next pending request arrives (0: it has; closed loop: 0)."""
            return max(arrived[pending[0].request_id] - now, 0.0) if open_loop else 0.0

        while pending or running:
            now = clock()
            if not running and (wait := waiting(now)) > 0:
                sleep(wait)  # idle until the next arrival
                idle_s += clock() - now
                continue
            held = hold_admission  # a preemption just before this step
            hold_admission = False
            budget = c.max_num_batched_tokens
            items: list[tuple[_Seq, int]] = []
            contexts: list[int] = []  # each item's cached tokens before this step
            preempted: set[_Seq] = set()  # this step's: a set, not a scan of running per seq

            # ---- schedule: decodes first, then prefill chunks within the token budget
            for seq in list(running):
                if seq.in_prefill or seq in preempted:
                    continue
                while pc.blocks_needed(seq.rid, 1) > pc.pool.num_free:
                    # preempt the youngest sequence not yet scheduled this step; when every
                    # other one is scheduled, this one is the youngest (vLLM's policy). Only
                    # decodes are scheduled yet: nothing committed this step is freed
                    scheduled = {it[0] for it in items}
                    victims = [s for s in running if s is not seq and s not in scheduled]
                    preempt(victims[-1] if victims else seq)
                    if not victims:
                        break
                if seq in preempted:
                    continue
                schedule(seq, 1)
                budget -= 1
            for seq in list(running):
                if not seq.in_prefill or budget <= 0:
                    continue
                n = chunk(seq, budget)
                if n > 0:
                    schedule(seq, n)
                    budget -= n
            # ---- admit into free slots, one request at a time: each is matched after the
            # chunks scheduled before it are cached (after a preemption admit nothing new
            # while others can still progress)
            if not ((held or hold_admission) and running):
                while pending and len(running) < c.max_num_seqs and waiting(now) == 0:
                    seq = admit(pending.popleft(), now)
                    running.append(seq)
                    if budget > 0 and (n := chunk(seq, budget)) > 0:
                        schedule(seq, n)
                        budget -= n
            if not items:
                if len(running) > 1:
                    preempt(running[-1])
                    continue
                raise RuntimeError("num_blocks: the pool cannot hold one sequence")
            # ---- plan (metadata of the chunks allocated and committed above) and run the model
            plan = plan_batch([pc.blocks(s.rid) for s, _ in items], contexts,
                              [n for _, n in items], c.block_size,
                              shared_prefix=pc.shared_prefix,
                              min_prefix_blocks=pc.min_prefix_blocks,
                              min_group_size=pc.min_group_size)
            token_ids = np.concatenate(
                [np.asarray(s.tokens[s.num_computed:s.num_computed + n], I32) for s, n in items])
            rows = plan.cu_q_lens[1:] - 1
            batch = self._pad(plan, token_ids, rows)
            t0 = clock()
            logits = self.adapter.forward(batch)
            steps += 1
            shared_steps += batch.shared
            # ---- sample (greedy) and retire
            now = clock()
            n_decode = 0
            for i, (seq, n) in enumerate(items):
                decoding = not seq.in_prefill
                seq.num_computed += n
                if seq.in_prefill:
                    continue  # a chunk in the middle of the prompt: no token yet
                n_decode += decoding
                tok = int(np.argmax(logits[i]))
                seq.generated.append(tok)
                if seq.first_token is None:
                    seq.first_token = first_tokens[seq.rid] = now
                if len(seq.generated) >= seq.req.max_new_tokens:
                    seq.final_logits = np.array(logits[i], copy=True)
                    seq.finish = now
                    pc.free(seq.rid)
                    running.remove(seq)
                    done.append(seq)
                else:
                    seq.tokens.append(tok)
                    pc.append_tokens(seq.rid, [tok])
            if n_decode:
                decode_tokens += n_decode
                decode_s += now - t0
            if progress is not None and len(done):
                progress(len(done))
        wall = clock() - t_start
        done.sort(key=lambda s: s.rid)
        results = [RequestResult(
            request_id=s.rid, tenant=s.req.tenant, prompt_len=s.prompt_len,
            cached_tokens=s.cached_tokens, onboarded_tokens=s.onboarded_tokens,
            output_tokens=list(s.generated), ttft_s=s.first_token - s.arrival,
            latency_s=s.finish - s.arrival, final_logits=s.final_logits) for s in done]
        return RunResult(
            framework=getattr(self.adapter, "name", type(self.adapter).__name__),
            enable_caching=c.enable_caching, requests=results, wall_s=wall, steps=steps,
            shared_prefix_steps=shared_steps, decode_tokens=decode_tokens,
            decode_step_s=decode_s, blocks_evicted=counters["evicted"],
            blocks_offloaded=0 if offloader is None else host.stats.puts,
            blocks_onboarded=counters["onboarded"],
            preemptions=preemptions, open_loop=open_loop, idle_s=idle_s)
