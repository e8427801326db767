"""hypothesis state machine over PrefixCache + BlockPool: random request streams with shared
prefixes, salts, chunked prefill, decode, forks (copy-on-write), truncation, frees, evictions
and cache resets. After every step: no block both free and referenced, ref counts equal the
live references, every cached (namespace, hash) names a block that holds exactly the KV of
that hash's tokens (a shadow of the tokens behind each hash), hits never cross salts, every
running request reads its own KV, and the event log replays to the pool's index."""

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)
from prefixkv.paged.events import EventLog
from prefixkv.paged.pool import namespace_of
from prefixkv.paged.prefix_cache import PrefixCache, default_hash_fn
from test_prefix_cache import SimEngine, kv_values, sglang_hash

SALTS = [None, "tenant-a", "tenant-b"]
TOKENS = st.lists(st.integers(0, 3), min_size=0, max_size=14)


class PoolMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(4, 24),
                saltless=st.booleans())
    def setup(self, block_size, num_blocks, saltless):
        # prefixkv-v1, or a compatibility hash with no salt (the index must still keep
        # namespaces apart)
        base = sglang_hash if saltless else default_hash_fn
        self.shadow: dict[tuple[bytes, bytes], tuple[int, ...]] = {}

        def recording(tokens, bs, *, salt=None, parent=None):
            out = base(tokens, bs, salt=salt, parent=parent)
            ns = namespace_of(salt)
            prefix = () if parent is None else self.shadow[(ns, parent)]
            toks = tuple(int(t) for t in tokens)
            for i, h in enumerate(out):
                self.shadow[(ns, h)] = prefix + toks[:(i + 1) * bs]
            return out

        self.pc = PrefixCache(num_blocks, block_size, hash_fn=recording)
        self.eng = SimEngine(self.pc)
        self.log = EventLog()
        self.pc.events.subscribe(self.log)
        self.prefixes = [[1, 2, 3, 0, 1, 2, 3, 0, 2, 2], [1, 2, 3, 0, 3, 3], [0] * 12]
        self.next_id = 0

    # ------------------------------------------------------------------ rules
    @rule(target=requests, prefix=st.integers(0, 3), cut=st.integers(0, 12), suffix=TOKENS,
          salt=st.sampled_from(SALTS))
    def add(self, prefix, cut, suffix, salt):
        toks = (self.prefixes[prefix][:cut] if prefix < 3 else []) + suffix
        if not toks:
            toks = [0]
        rid = self.next_id
        self.next_id += 1
        cached = self.pc.add_request(rid, toks, salt=salt)
        bs = self.pc.block_size
        assert cached % bs == 0 and cached <= len(toks) - 1
        # a hit never crosses salts and always holds this request's tokens
        pool = self.pc.pool
        for i, b in enumerate(self.pc.blocks(rid)):
            ns, h = pool.block_namespace(b), pool.block_hash(b)
            assert ns == namespace_of(salt)
            assert self.shadow[(ns, h)] == tuple(toks[:(i + 1) * bs])
        return rid

    @rule(rid=requests, frac=st.floats(0.0, 1.0))
    def compute(self, rid, frac):
        if rid not in self.pc:
            return
        left = len(self.pc.tokens(rid)) - self.pc.num_computed(rid)
        n = int(round(left * frac))
        if self.pc.blocks_needed(rid, n) > self.pc.pool.num_free:
            self.pc.free(rid)            # preempt, as a scheduler would
            return
        self.eng.run([(rid, n)])

    @rule(data=st.data())
    def batch_step(self, data):
        live = [r for r in self.pc.request_ids
                if len(self.pc.tokens(r)) > self.pc.num_computed(r)]
        if not live:
            return
        chosen = data.draw(st.lists(st.sampled_from(live), unique=True, min_size=1))
        batch = [(r, len(self.pc.tokens(r)) - self.pc.num_computed(r)) for r in chosen]
        if sum(self.pc.blocks_needed(r, n) for r, n in batch) > self.pc.pool.num_free:
            return
        self.eng.run(batch)

    def _run_if_room(self, batch):
        if sum(self.pc.blocks_needed(r, n) for r, n in batch) <= self.pc.pool.num_free:
            self.eng.run(batch)

    @rule(target=requests, rid=requests, a=st.integers(0, 3), b=st.integers(0, 3))
    def fork_and_diverge(self, rid, a, b):
        """Parallel sampling: the two write different tokens into their shared last block."""
        if rid not in self.pc:
            return rid
        left = len(self.pc.tokens(rid)) - self.pc.num_computed(rid)
        self._run_if_room([(rid, left)])
        child = self.next_id
        self.next_id += 1
        self.pc.fork(rid, child)
        self.pc.append_tokens(rid, [a])
        self.pc.append_tokens(child, [b])
        self._run_if_room([(rid, 1), (child, 1)])
        return child

    @rule(rid=requests, back=st.integers(1, 5), tokens=st.lists(st.integers(0, 3), min_size=1,
                                                               max_size=5))
    def rollback(self, rid, back, tokens):
        """Speculative decoding: reject the last tokens, then write others in their place."""
        if rid not in self.pc:
            return
        n = self.pc.num_computed(rid)
        self.pc.truncate(rid, max(n - back, 0))
        self.pc.append_tokens(rid, tokens)
        self._run_if_room([(rid, len(self.pc.tokens(rid)) - self.pc.num_computed(rid))])

    @rule(rid=requests, tokens=st.lists(st.integers(0, 3), min_size=1, max_size=3))
    def decode(self, rid, tokens):
        if rid not in self.pc:
            return
        self.pc.append_tokens(rid, tokens)

    @rule(target=requests, rid=requests)
    def fork(self, rid):
        if rid not in self.pc:
            return rid
        child = self.next_id
        self.next_id += 1
        self.pc.fork(rid, child)
        return child

    @rule(rid=requests, keep=st.floats(0.0, 1.0))
    def truncate(self, rid, keep):
        if rid not in self.pc:
            return
        self.pc.truncate(rid, int(len(self.pc.tokens(rid)) * keep))

    @rule(rid=consumes(requests))
    def free(self, rid):
        if rid in self.pc:
            self.pc.free(rid)

    @precondition(lambda self: self.next_id % 7 == 6)
    @rule()
    def reset(self):
        self.pc.reset_prefix_cache()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def pool_consistent(self):
        self.pc.pool.check_consistency()

    @invariant()
    def ref_counts_equal_live_references(self):
        want = np.zeros(self.pc.pool.num_blocks, dtype=np.int64)
        for r in self.pc.request_ids:
            blocks = self.pc.blocks(r)
            assert len(set(blocks)) == len(blocks) and 0 not in blocks
            want[blocks] += 1
        assert want.tolist() == list(self.pc.pool.ref_counts)

    @invariant()
    def index_matches_block_contents(self):
        bs = self.pc.block_size
        for ns, d in self.pc.pool.cached_hashes().items():
            for h, b in d.items():
                toks = self.shadow[(ns, h)]
                np.testing.assert_array_equal(self.eng.k[b, :, 0, 0], kv_values(toks)[-bs:])

    @invariant()
    def running_requests_read_their_kv(self):
        for r in self.pc.request_ids:
            n = self.pc.num_computed(r)
            got = self.eng.read(self.pc.blocks(r) or [0], n)
            np.testing.assert_array_equal(got, kv_values(self.pc.tokens(r)[:n]))

    @invariant()
    def events_replay_to_the_index(self):
        assert self.log.replay() == self.pc.pool.cached_hashes()


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                         deadline=None)
TestPoolMachine = PoolMachine.TestCase
