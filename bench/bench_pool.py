"""Block pool throughput on a shared-prefix request trace (issue 6).

Trace (fixed seed): 2000 requests, each one of 16 shared prefixes of 512-2048 tokens plus its
own suffix of 64-1024 tokens; 8192 blocks of 16 tokens; up to 32 requests running at once
(the oldest finishes when a 33rd arrives). Per request, the pool does what an engine's
manager does: look up the longest cached prefix (full blocks, never the last token), take
references on the hits, allocate the rest (evicting LRU cached blocks), register the newly
full blocks by hash, and free everything when the request finishes. Hashes are computed once
before timing (hashing has its own benchmark), so this measures the pool alone, like the vLLM
BlockPool figure of shared/ANCHORS.md (7.4k requests/s, ~1 M block-ops/s on this machine).

Pools, same trace, same run:
- ``prefixkv``: :class:`prefixkv.paged.pool.BlockPool` (OrderedDict LRU, list ref counts).
- ``linked-objects``: the classic design (vLLM's): one Python object per block, an intrusive
  doubly-linked free queue with sentinel head/tail; written here from the description.
- ``naive``: a user's first attempt: dict ref counts, a Python list as the LRU queue
  (``list.remove`` / ``pop(0)``).

extra_info: requests/s, block-ops/s (touches + allocations + registrations + frees), blocks/s
(blocks requested), hit rate, and the ratio to vLLM's 7.4k requests/s (``x_vllm_7.4k_req_s``: a
figure quoted from shared/ANCHORS.md, not measured in this run; ``vllm_figure`` says so in
each row); ``baseline: true`` on ``linked-objects`` (the design a serving engine already uses;
``naive`` is an extra row). Each pool's operation counts and hits must equal those of one
untimed ``linked-objects`` run of the trace (checked in the benchmark itself, so also under
``--benchmark-only``), so the timings compare the same work.

``manager-trace`` group: the whole manager on the same trace with real tokens (2000 requests,
3.7 M tokens): per request, hash the prompt's full blocks, take the cached prefix, one prefill
step (allocate, register, the step's metadata), free when it finishes. ``prefixkv``:
:class:`PrefixCache` (prefixkv-v1 hashes); ``dict_baseline`` (``baseline: true``): the prefix
cache a user writes in plain Python (:class:`DictPrefixCache`: sha256 chained block hashes, a
dict index, an OrderedDict LRU, numpy metadata). Both must give the same hits and the same
metadata (block tables, kv_lens, cu_q_lens, slot mapping, positions) for every request as one
untimed ``dict_baseline`` run, checked before timing; the timed rounds' hits again after.

``decode-step`` group: one decode step of an engine's manager, 512 running requests of 2048
tokens each (128 blocks): ``append_tokens`` of each sampled token, then ``PrefixCache.step``
of one token per request (allocate, copy-on-write check, plan, hash the blocks filled,
register). The host cost per step, with the planner's shared-prefix search off and on,
against ``dict_baseline`` (``baseline: true``; DictPrefixCache's same steps, which must give
the same metadata for the first BLOCK_SIZE + 1 steps, checked untimed).

``planner`` group: ``plan_batch`` of 512 decode sequences of 2048 blocks each (32k tokens),
with no block shared and with the first 1024 blocks shared by all, the shared-prefix search
on and, as the baseline, off (the metadata alone): what the group search adds to a step.

Run: OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_pool.py --benchmark-only
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections import OrderedDict, deque
from types import SimpleNamespace

import numpy as np
import pytest
from prefixkv.paged.pool import BlockPool
from prefixkv.paged.prefix_cache import PrefixCache

from bench.conftest import seconds

NUM_REQUESTS = 2000
NUM_PREFIXES = 16
NUM_BLOCKS = 8192
BLOCK_SIZE = 16
MAX_RUNNING = 32
VLLM_REQ_PER_S = 7.4e3  # vLLM 0.33 BlockPool on this trace, this machine (shared/ANCHORS.md)
#: put next to x_vllm_7.4k_req_s: that ratio divides by the constant above, not a same-run time
VLLM_FIGURE = ("quoted: vLLM 0.33 BlockPool, pool alone, 7.4k req/s (shared/ANCHORS.md); "
               "not measured in this run")


def make_trace(seed: int = 0):
    """[(num_tokens, block hashes of the full blocks)] per request."""
    rng = np.random.default_rng(seed)
    prefix_lens = rng.integers(512, 2049, NUM_PREFIXES)
    trace = []
    for r in range(NUM_REQUESTS):
        p = int(rng.integers(NUM_PREFIXES))
        n = int(prefix_lens[p]) + int(rng.integers(64, 1025))
        full = n // BLOCK_SIZE
        shared = int(prefix_lens[p]) // BLOCK_SIZE
        # prefix-chained digests: equal for equal leading blocks, like real block hashes
        hashes = [hashlib.blake2b(f"p{p}/{i}".encode(), digest_size=32).digest()
                  for i in range(min(shared, full))]
        hashes += [hashlib.blake2b(f"r{r}/{i}".encode(), digest_size=32).digest()
                   for i in range(len(hashes), full)]
        trace.append((n, hashes))
    return trace


def run_trace(pool, trace) -> dict:
    """Drive ``pool`` through the trace; returns operation counts."""
    running: deque = deque()
    ops = hits_total = blocks_total = 0
    ns = b""
    for n, hashes in trace:
        if len(running) == MAX_RUNNING:
            done = running.popleft()
            pool.free(done)
            ops += len(done)
        num_blocks = -(-n // BLOCK_SIZE)
        cap = (n - 1) // BLOCK_SIZE
        hits = pool.lookup(hashes[:cap], ns)
        pool.touch(hits)
        h = len(hits)
        new = pool.allocate(num_blocks - h)
        full = len(hashes)
        pool.register(new[:full - h], hashes[h:full], ns, hashes[h - 1] if h else None)
        running.append(hits + new)
        ops += num_blocks + (full - h)
        hits_total += h
        blocks_total += num_blocks
    while running:
        done = running.popleft()
        pool.free(done)
        ops += len(done)
    return {"block_ops": ops, "hit_blocks": hits_total, "blocks": blocks_total}


def make_token_trace(seed: int = 0):
    """The same shape of trace with real tokens: [np.int32 tokens] per request."""
    rng = np.random.default_rng(seed)
    prefix_lens = rng.integers(512, 2049, NUM_PREFIXES)
    prefixes = [rng.integers(0, 32000, int(n)).astype(np.int32) for n in prefix_lens]
    out = []
    for _ in range(NUM_REQUESTS):
        p = prefixes[int(rng.integers(NUM_PREFIXES))]
        out.append(np.concatenate([p, rng.integers(0, 32000, int(rng.integers(64, 1025)))
                                   .astype(np.int32)]))
    return out


#: the step metadata compared between the manager-trace implementations
PLAN_ARRAYS = ("block_tables", "kv_lens", "cu_q_lens", "slot_mapping", "positions")


def run_manager_trace(pc, requests, digests: list | None = None) -> dict:
    """An engine's calls per request: add_request (hash + hit), one prefill step (allocate,
    register, plan), free when it finishes (32 running). ``pc``: a PrefixCache or a
    DictPrefixCache. ``digests``: a list to append a CRC of each step's metadata to (an
    untimed check run)."""
    running: deque = deque()
    hits = []
    tokens = 0
    for rid, toks in enumerate(requests):
        if len(running) == MAX_RUNNING:
            pc.free(running.popleft())
        cached = pc.add_request(rid, toks)
        plan = pc.step([(rid, len(toks) - cached)])
        if digests is not None:
            crc = 0
            for name in PLAN_ARRAYS:
                crc = zlib.crc32(np.ascontiguousarray(getattr(plan, name)).tobytes(), crc)
            digests.append(crc)
        running.append(rid)
        hits.append(cached)
        tokens += len(toks)
    while running:
        pc.free(running.popleft())
    return {"hit_tokens": sum(hits), "tokens": tokens, "hits": hits}


# ---------------------------------------------------------------------- comparison pools
class _Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash = None
        self.prev = None
        self.next = None


class LinkedObjectPool:
    """One object per block and an intrusive doubly-linked free queue (the classic design)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.blocks = [_Block(i) for i in range(num_blocks)]
        self.head = _Block(-1)
        self.tail = _Block(-1)
        self.head.next = self.tail
        self.tail.prev = self.head
        self.index: dict = {}
        for b in self.blocks[1:]:
            self._append(b)
        self.num_free = num_blocks - 1

    def _append(self, b):
        last = self.tail.prev
        last.next = b
        b.prev = last
        b.next = self.tail
        self.tail.prev = b

    def _remove(self, b):
        b.prev.next = b.next
        b.next.prev = b.prev
        b.prev = b.next = None

    def lookup(self, hashes, ns):
        out = []
        for h in hashes:
            b = self.index.get((ns, h))
            if b is None:
                break
            out.append(b)
        return out

    def touch(self, blocks):
        for bid in blocks:
            b = self.blocks[bid]
            if b.ref_cnt == 0:
                self._remove(b)
                self.num_free -= 1
            b.ref_cnt += 1

    def allocate(self, n):
        if n > self.num_free:
            raise RuntimeError("out of blocks")
        out = []
        for _ in range(n):
            b = self.head.next
            self._remove(b)
            if b.block_hash is not None:
                del self.index[b.block_hash]
                b.block_hash = None
            b.ref_cnt = 1
            out.append(b.block_id)
        self.num_free -= n
        return out

    def register(self, blocks, hashes, ns, parent):
        for bid, h in zip(blocks, hashes, strict=True):
            key = (ns, h)
            if key not in self.index:
                b = self.blocks[bid]
                b.block_hash = key
                self.index[key] = bid

    def free(self, blocks):
        for bid in reversed(blocks):
            b = self.blocks[bid]
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._append(b)
                self.num_free += 1


class NaivePool:
    """The obvious first attempt: dicts and a Python list as the LRU queue."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.ref = {b: 0 for b in range(num_blocks)}
        self.free_list = list(range(1, num_blocks))
        self.hash_of: dict = {}
        self.index: dict = {}

    def lookup(self, hashes, ns):
        out = []
        for h in hashes:
            if (ns, h) not in self.index:
                break
            out.append(self.index[(ns, h)])
        return out

    def touch(self, blocks):
        for b in blocks:
            if self.ref[b] == 0:
                self.free_list.remove(b)
            self.ref[b] += 1

    def allocate(self, n):
        if n > len(self.free_list):
            raise RuntimeError("out of blocks")
        out = []
        for _ in range(n):
            b = self.free_list.pop(0)
            if b in self.hash_of:
                del self.index[self.hash_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def register(self, blocks, hashes, ns, parent):
        for b, h in zip(blocks, hashes, strict=True):
            if (ns, h) not in self.index:
                self.index[(ns, h)] = b
                self.hash_of[b] = (ns, h)

    def free(self, blocks):
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_list.append(b)


class DictPrefixCache:
    """The prefix cache a user writes in plain Python, the manager-trace baseline: a request's
    full blocks hashed with hashlib.sha256 over the parent's digest and the block's int32
    bytes (raw bytes: cheaper than vLLM's pickled tuples); a dict from hash to block; free
    cached blocks in an OrderedDict, least recently used first; empty blocks in a list; each
    step's block tables, kv_lens, cu_q_lens, slot mapping and positions as int32 numpy.

    The same policy as PrefixCache, so hits and block ids agree: hits are full blocks, never
    the last token; empty blocks go first, lowest ids first on a fresh pool, then the most
    recently emptied; a finished request's blocks are queued tail first; a hash already
    cached is not registered again. What run_manager_trace and the decode steps call:
    add_request, append_tokens, step (hashing the blocks a step fills), free."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.index: dict[bytes, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.empty = list(range(num_blocks - 1, 0, -1))  # block 0 is the null block
        self.requests: dict = {}  # id -> [hashes, blocks, tokens computed, tokens appended]

    def add_request(self, rid, tokens) -> int:
        tokens = np.asarray(tokens, dtype=np.int32)
        bs = self.block_size
        hashes, parent = [], b""
        for i in range(len(tokens) // bs):
            parent = hashlib.sha256(parent + tokens[i * bs:(i + 1) * bs].tobytes()).digest()
            hashes.append(parent)
        blocks = []
        for h in hashes[:(len(tokens) - 1) // bs]:
            b = self.index.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.lru[b]
            self.ref[b] += 1
            blocks.append(b)
        self.requests[rid] = [hashes, blocks, len(blocks) * bs, tokens, []]
        return len(blocks) * bs

    def append_tokens(self, rid, tokens) -> None:
        self.requests[rid][4].extend(tokens)

    def _allocate(self) -> int:
        if self.empty:
            b = self.empty.pop()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.index[self.hash_of.pop(b)]
        else:
            raise RuntimeError("out of blocks")
        self.ref[b] = 1
        return b

    def step(self, batch) -> SimpleNamespace:
        bs = self.block_size
        tables, kv_lens, cu, slots, positions = [], [], [0], [], []
        for rid, n in batch:
            req = self.requests[rid]
            hashes, blocks, start, prompt, appended = req
            end = start + n
            while len(blocks) * bs < end:
                blocks.append(self._allocate())
            table = np.asarray(blocks, dtype=np.int32)
            pos = np.arange(start, end, dtype=np.int32)
            slots.append(table[pos // bs] * bs + pos % bs)
            positions.append(pos)
            tables.append(table)
            kv_lens.append(end)
            cu.append(cu[-1] + n)
            for i in range(start // bs, end // bs):  # the blocks this step filled
                if i == len(hashes):  # a block of decoded tokens: hashed as it fills
                    lo = i * bs - len(prompt)
                    toks = np.concatenate([prompt[i * bs:], np.asarray(
                        appended[max(lo, 0):lo + bs], dtype=np.int32)])
                    hashes.append(hashlib.sha256((hashes[-1] if i else b"")
                                                 + toks.tobytes()).digest())
                if hashes[i] not in self.index:
                    self.index[hashes[i]] = blocks[i]
                    self.hash_of[blocks[i]] = hashes[i]
            req[2] = end
        block_tables = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
        for i, t in enumerate(tables):
            block_tables[i, :len(t)] = t
        return SimpleNamespace(block_tables=block_tables, kv_lens=np.asarray(kv_lens, np.int32),
                               cu_q_lens=np.asarray(cu, np.int32),
                               slot_mapping=np.concatenate(slots),
                               positions=np.concatenate(positions))

    def free(self, rid) -> None:
        for b in reversed(self.requests.pop(rid)[1]):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.lru[b] = None
                else:
                    self.empty.append(b)


POOLS = {
    "prefixkv": BlockPool,
    "linked-objects": LinkedObjectPool,
    "naive": NaivePool,
}


#: the group's baseline: the classic design an engine already has
BASELINE_POOL = "linked-objects"


@pytest.fixture(scope="module")
def trace():
    return make_trace()


@pytest.fixture(scope="module")
def baseline_counts(trace):
    """run_trace's counts of one untimed BASELINE_POOL run: what every pool must report."""
    counts = run_trace(POOLS[BASELINE_POOL](NUM_BLOCKS, BLOCK_SIZE), trace)
    assert counts["hit_blocks"] > 0.4 * counts["blocks"], counts
    return counts


@pytest.mark.benchmark(group="pool-trace")
@pytest.mark.parametrize("name", list(POOLS))
def test_pool_trace(benchmark, trace, baseline_counts, name):
    cls = POOLS[name]
    rounds = 2 if name == "naive" else 5
    counts = benchmark.pedantic(run_trace, setup=lambda: ((cls(NUM_BLOCKS, BLOCK_SIZE), trace),
                                                          {}),
                                rounds=rounds, warmup_rounds=1 if name != "naive" else 0)
    # the same hits, allocations and frees as the baseline (each round starts a fresh pool)
    assert counts == baseline_counts, (name, counts, baseline_counts)
    t = seconds(benchmark, "min")
    info = benchmark.extra_info
    info["requests"] = NUM_REQUESTS
    info["requests_per_s"] = NUM_REQUESTS / t
    info["block_ops_per_s"] = counts["block_ops"] / t
    info["blocks_per_s"] = counts["blocks"] / t
    info["hit_rate"] = counts["hit_blocks"] / counts["blocks"]
    info["x_vllm_7.4k_req_s"] = NUM_REQUESTS / t / VLLM_REQ_PER_S
    info["vllm_figure"] = VLLM_FIGURE
    if name == BASELINE_POOL:
        info["baseline"] = True


MANAGERS = {"prefixkv": PrefixCache, "dict_baseline": DictPrefixCache}


@pytest.fixture(scope="module")
def token_trace():
    return make_token_trace()


@pytest.fixture(scope="module")
def manager_reference(token_trace):
    """(per-request hits, per-step metadata CRCs) of one untimed dict_baseline run: what
    every manager must give."""
    digests: list = []
    counts = run_manager_trace(DictPrefixCache(NUM_BLOCKS, BLOCK_SIZE), token_trace, digests)
    assert counts["hit_tokens"] > 0.4 * counts["tokens"], counts
    return counts["hits"], digests


@pytest.mark.benchmark(group="manager-trace")
@pytest.mark.parametrize("name", list(MANAGERS))
def test_prefix_cache_trace(benchmark, token_trace, manager_reference, name):
    """The manager end to end on the token trace: hashing, hits, allocation, registration and
    the step's batch metadata, per request. PrefixCache (prefixkv-v1 hashes, incremental)
    against DictPrefixCache, the baseline. An untimed run first (the warm-up) must give the
    reference's hits and metadata, request by request; then the timed rounds' hits."""
    cls = MANAGERS[name]
    want_hits, want_digests = manager_reference
    digests: list = []
    counts = run_manager_trace(cls(NUM_BLOCKS, BLOCK_SIZE), token_trace, digests)
    assert counts["hits"] == want_hits, name
    bad = next((i for i, (a, b) in enumerate(zip(digests, want_digests, strict=True))
                if a != b), None)
    assert bad is None, f"{name}: request {bad}'s step metadata differs from the reference's"
    counts = benchmark.pedantic(
        run_manager_trace, setup=lambda: ((cls(NUM_BLOCKS, BLOCK_SIZE), token_trace), {}),
        rounds=3)
    assert counts["hits"] == want_hits, name
    t = seconds(benchmark, "min")
    info = benchmark.extra_info
    info["requests_per_s"] = NUM_REQUESTS / t
    info["tokens_per_s"] = counts["tokens"] / t
    info["hit_rate"] = counts["hit_tokens"] / counts["tokens"]
    info["x_vllm_7.4k_req_s"] = NUM_REQUESTS / t / VLLM_REQ_PER_S
    info["vllm_figure"] = VLLM_FIGURE
    if name == "dict_baseline":
        info["baseline"] = True


DECODE_REQUESTS = 512
DECODE_CONTEXT = 2048


def decode_setup(impl: str):
    """A manager (``impl``: PrefixCache with the shared-prefix search off or on, or the
    DictPrefixCache baseline) with DECODE_REQUESTS requests of DECODE_CONTEXT distinct tokens,
    prefilled."""
    blocks = DECODE_REQUESTS * (DECODE_CONTEXT // BLOCK_SIZE + 8) + 1000
    pc = (DictPrefixCache(blocks, BLOCK_SIZE) if impl == "dict_baseline"
          else PrefixCache(blocks, BLOCK_SIZE, shared_prefix=impl == "cascade"))
    rng = np.random.default_rng(0)
    for r in range(DECODE_REQUESTS):
        pc.add_request(r, rng.integers(0, 50000, DECODE_CONTEXT, dtype=np.int32))
        pc.step([(r, DECODE_CONTEXT)])
    return pc


def _decode_steps(pc, steps: int) -> list:
    """``steps`` decode steps of every request (token t of step t), each step's metadata."""
    batch = [(r, 1) for r in range(DECODE_REQUESTS)]
    plans = []
    for t in range(steps):
        for r in range(DECODE_REQUESTS):
            pc.append_tokens(r, [t])
        plans.append(pc.step(batch))
    return plans


@functools.cache
def _decode_reference() -> list:
    """CRCs of the metadata of the first BLOCK_SIZE + 1 decode steps of the baseline (each
    request fills a block in them): what every manager's steps must give."""
    return [_plan_crc(p) for p in _decode_steps(decode_setup("dict_baseline"), BLOCK_SIZE + 1)]


def _plan_crc(plan) -> int:
    crc = 0
    for name in PLAN_ARRAYS:
        crc = zlib.crc32(np.ascontiguousarray(getattr(plan, name)).tobytes(), crc)
    return crc


@pytest.mark.benchmark(group="decode-step")
@pytest.mark.parametrize("impl", ["no-cascade", "cascade", "dict_baseline"])
def test_prefix_cache_decode_step(benchmark, impl):
    """One decode step: 512 x append_tokens([token]) + step([(rid, 1)] * 512); each round is
    the next step (a block fills for 1 in BLOCK_SIZE requests each step). PrefixCache with
    the shared-prefix search off and on, against the DictPrefixCache baseline (which hashes
    the blocks its steps fill too); the first BLOCK_SIZE + 1 steps' metadata (untimed, on a
    manager of their own) must be the baseline's."""
    got = [_plan_crc(p) for p in _decode_steps(decode_setup(impl), BLOCK_SIZE + 1)]
    assert got == _decode_reference(), f"{impl}: decode metadata differs from the baseline's"
    pc = decode_setup(impl)
    batch = [(r, 1) for r in range(DECODE_REQUESTS)]
    token = iter(range(1 << 30))

    def decode_step():
        t = next(token) % 50000
        for r in range(DECODE_REQUESTS):
            pc.append_tokens(r, [t])
        return pc.step(batch)

    plan = benchmark.pedantic(decode_step, rounds=48, warmup_rounds=4)
    assert plan.kv_lens.shape == (DECODE_REQUESTS,) and int(plan.cu_q_lens[-1]) == DECODE_REQUESTS
    t = seconds(benchmark, "median")
    info = benchmark.extra_info
    info["requests"] = DECODE_REQUESTS
    info["context_tokens"] = DECODE_CONTEXT
    info["ms_per_step"] = t * 1e3
    info["us_per_request"] = t / DECODE_REQUESTS * 1e6
    if impl == "dict_baseline":
        info["baseline"] = True


PLAN_SEQS, PLAN_BLOCKS = 512, 2048


@pytest.mark.benchmark(group="planner")
@pytest.mark.parametrize("shared", [False, True], ids=["no-sharing", "half-shared"])
@pytest.mark.parametrize("search", [False, True], ids=["metadata-only", "with-groups"])
def test_plan_batch(benchmark, shared, search):
    """plan_batch of one decode step (block lists as int32 arrays, as PrefixCache keeps them)."""
    from prefixkv.paged.planner import plan_batch

    ids = np.arange(1, PLAN_SEQS * PLAN_BLOCKS + 1, dtype=np.int32).reshape(PLAN_SEQS, -1)
    if shared:
        ids[:, :PLAN_BLOCKS // 2] = ids[0, :PLAN_BLOCKS // 2]
    rows = list(ids)
    ctx = [PLAN_BLOCKS * BLOCK_SIZE - 1] * PLAN_SEQS
    plan = benchmark.pedantic(plan_batch, args=(rows, ctx, [1] * PLAN_SEQS, BLOCK_SIZE),
                              kwargs={"shared_prefix": search}, rounds=10, warmup_rounds=1)
    assert plan.num_seqs == PLAN_SEQS
    assert (plan.shared is not None) == (shared and search)
    if plan.shared is not None:
        assert plan.shared.prefix_lens.tolist() == [PLAN_BLOCKS // 2 * BLOCK_SIZE]
    benchmark.extra_info["ms_per_plan"] = seconds(benchmark, "median") * 1e3
    if not search:
        benchmark.extra_info["baseline"] = True
