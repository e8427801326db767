"""PrefixCache: the per-step manager an engine drives over a :class:`BlockPool`.

Life of a request (``pc = PrefixCache(num_blocks, block_size)``)::

    cached = pc.add_request(rid, prompt_tokens, salt=tenant)  # longest cached prefix, refs taken
    plan = pc.step([(rid, num_new_tokens), ...])     # allocate, CoW, metadata, register
    #   engine: copy_blocks(caches, plan.copy_src, plan.copy_dst); write_kv(..., plan.slot_mapping)
    #           paged_attention(q, k, v, plan.block_tables, plan.kv_lens, plan.cu_q_lens)
    #           or shared_prefix_attention(q, k, v, **plan.shared arrays, plan.cu_q_lens)
    pc.append_tokens(rid, [sampled_token])           # decode: the next step computes it
    pc.free(rid)                                     # finished: blocks go back to the LRU queue

``step`` is ``allocate`` + ``plan`` + ``commit`` for every request; the three are public for an
engine that wants them apart (``commit`` after the forward pass, say).

Hits are full blocks only and never include the last known token (the hit is capped at
``(len(tokens) - 1) // block_size`` blocks), so the last token is always computed and gives
logits. Block hashes are ``hash_blocks(tokens, block_size, salt=salt, parent=...)`` of
:mod:`prefixkv.paged.hashing` (prefixkv-v1 by default), computed incrementally: each request
keeps its chain, so only newly-full blocks are hashed. The pool's index is keyed by the salt
namespace as well, so hits never cross salts whatever the hash function.

Multimodal prompts: ``add_request(..., mm_items=[(offset, length, identifier)])`` names each
image's (audio's, ...) placeholder tokens and content hash; the blocks from the first one an
item overlaps on are hashed with the items' identity (``hash_blocks(..., mm_items=)``,
docs/hashing.md), so prompts with the same placeholder tokens but other images share only
the blocks before the first image.

Copy-on-write: before this step's tokens are written into an existing block, a block held by
another request too (ref_count > 1, after :meth:`fork`) is replaced by a fresh copy (the
``(src, dst)`` pair is returned / put in the plan), and a registered block held only by this
request (after :meth:`truncate`) is unregistered (a ``"removed"`` event), so a cached block's
KV never changes under its hash.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterable

import numpy as np

from . import validate
from .hashing import v1_hashes_trusted
from .planner import BatchPlan, plan_checked_rows
from .pool import BlockPool, NoFreeBlocksError, namespace_of

HashFn = Callable[..., list]
_ZERO_PARENT = bytes(32)  # prefixkv-v1's parent of a sequence's first block (parent=None)


def default_hash_fn(tokens: np.ndarray, block_size: int, *, salt=None,
                    parent: bytes | None = None, mm_items=None) -> list[bytes]:
    """prefixkv-v1 hashes of the full blocks of ``tokens`` (i32), continuing from ``parent``;
    ``mm_items``: multimodal items, offsets from ``tokens[0]`` (``hash_blocks``)."""
    from .hashing import hash_blocks

    if mm_items is None:
        return list(hash_blocks(tokens, block_size, salt=salt, parent=parent))
    return list(hash_blocks(tokens, block_size, salt=salt, parent=parent, mm_items=mm_items))


def _shift_mm(mm: tuple, base: int) -> tuple:
    """Checked items with offsets from token ``base`` (earlier items: negative offsets)."""
    return tuple((off - base, n, ident) for off, n, ident in mm) if base else mm


class _Request:
    __slots__ = ("_tokens", "array", "salt", "namespace", "mm", "blocks", "num_computed",
                 "hashes", "num_registered", "_row", "_row_len", "copies")

    def __init__(self, tokens: np.ndarray, salt, namespace: bytes,
                 token_list: list[int] | None = None, mm: tuple | None = None) -> None:
        self.array = tokens             # int32; a prefix of self.tokens (hashing reads it)
        self._tokens = token_list       # None: not made yet, the tokens are self.array
        self.salt = salt
        self.namespace = namespace
        self.mm = mm                    # checked multimodal items (sorted), None = text only
        self.blocks: list[int] = []
        self.num_computed = 0          # tokens whose KV is in blocks
        self.hashes: list[bytes] = []  # hash chain of the first len(hashes) full blocks
        self.num_registered = 0        # leading blocks registered (or found) in the index
        self._row = None               # int32 copy of blocks[:_row_len], room to append;
        self._row_len = 0              # None = stale (a block changed in place, or removed)
        self.copies: list[tuple[int, int]] = []  # CoW pairs allocated, not yet committed

    @property
    def tokens(self) -> list[int]:
        """Every known token, a list of Python ints (append_tokens extends it), made from the
        prompt's array when first asked for: a request served from its prompt alone never
        pays for it (tolist of a 2k-token prompt cost as much as hashing it)."""
        tokens = self._tokens
        if tokens is None:
            tokens = self._tokens = self.array.tolist()
        return tokens

    @property
    def num_tokens(self) -> int:
        return len(self.array) if self._tokens is None else len(self._tokens)

    def token_slice(self, lo: int, hi: int) -> list[int]:
        """tokens[lo:hi], without making the whole list."""
        if self._tokens is None:
            return self.array[lo:hi].tolist()
        return self._tokens[lo:hi]

    def row(self) -> np.ndarray:
        """The blocks as int32 (cached between steps: decode steps rarely change them).

        Blocks appended since the last call are copied into spare room at the end (a decode
        step that starts a block copies one id, not the whole row); a view handed out earlier
        is never written, as only positions past every earlier view's end are. Changing or
        removing blocks sets ``_row`` to None: the next call builds a fresh array."""
        blocks = self.blocks
        n = len(blocks)
        row = self._row
        if row is None:
            row = np.empty(n + (n >> 2) + 8, dtype=np.int32)
            row[:n] = blocks
        elif n > self._row_len:
            if n > row.size:
                grown = np.empty(n + (n >> 2) + 8, dtype=np.int32)
                grown[:self._row_len] = row[:self._row_len]
                row = grown
            row[self._row_len:n] = blocks[self._row_len:]
        else:
            return row[:n]
        self._row = row
        self._row_len = n
        return row[:n]

    def copy(self) -> _Request:
        r = _Request(self.array, self.salt, self.namespace,
                     None if self._tokens is None else list(self._tokens), self.mm)
        r.blocks = list(self.blocks)
        r.num_computed = self.num_computed
        r.hashes = list(self.hashes)
        r.num_registered = self.num_registered
        return r


def _token_array(tokens, name: str = "tokens") -> np.ndarray:
    """tokens (1-D int array or sequence of ints, values in [0, 2**31)) as an int32 array."""
    return _tokens_checked(tokens, name)[0]


def _tokens_checked(tokens, name: str = "tokens") -> tuple[np.ndarray, list[int] | None]:
    """(:func:`_token_array` of tokens, and, for a sequence of Python ints, the list copy
    checked on the way: a request keeps its tokens as a list too, and an array's tolist()
    of a long prompt cost as much again)."""
    out = ints = None
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"{name}: expected a 1-D integer array, got "
                             f"{tokens.dtype}{list(tokens.shape)}")
        arr = tokens
    else:
        try:
            out = ints = list(tokens)
        except TypeError:
            raise TypeError(f"{name}: expected a sequence of int token ids or a 1-D integer "
                            f"array, got {type(tokens).__name__}") from None
        if not set(map(type, out)) <= {int}:  # numpy ints: converted, not kept as the list
            ints = None
            for i, t in enumerate(out):
                if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                    raise TypeError(f"{name}[{i}]: expected an int token id, got {t!r}")
        try:
            arr = np.array(out, dtype=np.int64) if out else np.zeros(0, np.int64)
        except OverflowError:  # a Python int past 64 bits: name it (max() may be a valid one)
            i = next(i for i, t in enumerate(out) if not 0 <= t <= 0x7FFFFFFF)
            raise ValueError(f"{name}[{i}]: expected a token id in [0, 2**31), got "
                             f"{out[i]}") from None
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 0x7FFFFFFF):
        raise ValueError(f"{name}: expected token ids in [0, 2**31), got min {int(arr.min())} "
                         f"max {int(arr.max())}")
    # a copy, also of a caller's int32 array: a request keeps it and hashes its blocks from
    # it later, after the caller may have reused the buffer
    return arr.astype(np.int32, copy=arr is tokens), ints


def _pairs(batch) -> tuple[list, list]:
    """(the batch as a list, its request ids) of a step's [(request_id, num_new_tokens)];
    TypeError naming the first entry that is no pair (a dict: its items were meant)."""
    if isinstance(batch, dict):
        raise TypeError("batch: expected (request_id, num_new_tokens) pairs, got a dict; pass "
                        "list(batch.items())")
    batch = list(batch)
    try:
        return batch, [rid for rid, _ in batch]
    except (TypeError, ValueError):
        i = next((i for i, item in enumerate(batch)
                  if not isinstance(item, (tuple, list)) or len(item) != 2), None)
        if i is None:
            raise
        raise TypeError(f"batch[{i}]: expected a (request_id, num_new_tokens) pair, got "
                        f"{batch[i]!r}") from None


def _token_list(tokens, name: str = "tokens") -> list[int]:
    """:func:`_token_array` as a list of Python ints. A short list or tuple of Python ints in
    range (a sampled token) is checked in Python, with no array built; anything else goes
    through :func:`_token_array`, which raises its errors."""
    if type(tokens) in (list, tuple) and len(tokens) <= 16:
        for t in tokens:
            if type(t) is not int or not 0 <= t <= 0x7FFFFFFF:
                break
        else:
            return list(tokens)
    return _token_array(tokens, name).tolist()



class PrefixCache:
    """Prefix-caching block manager over one :class:`BlockPool` (one KV cache, one tier).

    num_blocks / block_size: the pool's size (block 0 is the null block).
    pool: an existing pool instead (its num_blocks/block_size win).
    hash_fn: ``hash_fn(tokens_i32, block_size, salt=..., parent=...) -> list[bytes]``;
        prefixkv-v1 ``hash_blocks`` by default. A compatibility hash works when it is a prefix
        chain that continues from ``parent`` (checked here,
        :func:`~prefixkv.paged.hashing.check_prefix_chain`); the salt may be ignored, the index
        is namespaced by salt anyway. Requests with multimodal items call it with
        ``mm_items=`` too (offsets from ``tokens[0]``), which it must honour
        (:func:`~prefixkv.paged.hashing.check_mm_hash_fn`, at the first such request):
        ``hash_blocks(..., algo="vllm-sha256-cbor")`` does; one that cannot is refused then.
    enable_caching: False turns hits and registration off (a plain paged allocator).
    shared_prefix / min_prefix_blocks / min_group_size: passed to :func:`plan_batch`.
    """

    def __init__(self, num_blocks: int | None = None, block_size: int | None = None, *,
                 pool: BlockPool | None = None, hash_fn: HashFn | None = None,
                 enable_caching: bool = True, tier: str = "device", shared_prefix: bool = True,
                 min_prefix_blocks: int = 1, min_group_size: int = 2) -> None:
        if pool is None:
            if num_blocks is None or block_size is None:
                raise ValueError("num_blocks/block_size: expected both, or pool=")
            pool = BlockPool(num_blocks, block_size, tier=tier)
        self.pool = pool
        self.block_size = pool.block_size
        if hash_fn is not None:
            from .hashing import check_prefix_chain

            check_prefix_chain(hash_fn, self.block_size)
        self.hash_fn = hash_fn if hash_fn is not None else default_hash_fn
        self.enable_caching = enable_caching
        self.shared_prefix = shared_prefix
        self.min_prefix_blocks = validate.check_int("min_prefix_blocks", min_prefix_blocks, 1)
        self.min_group_size = validate.check_int("min_group_size", min_group_size, 2)
        self._requests: dict[Hashable, _Request] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def events(self):
        """The pool's :class:`~prefixkv.paged.events.EventBus`."""
        return self.pool.events

    def _hash(self, tokens: np.ndarray, salt, parent: bytes | None, mm: tuple | None = None,
              base: int = 0) -> list[bytes]:
        """hash_fn of ``tokens`` (token ``base`` of its request onwards) under ``mm``."""
        if len(tokens) < self.block_size:
            return []
        if mm is None:
            if self.hash_fn is default_hash_fn:  # checked tokens: no public checks again
                return v1_hashes_trusted(tokens, self.block_size, namespace_of(salt), parent)
            return self.hash_fn(tokens, self.block_size, salt=salt, parent=parent)
        return self.hash_fn(tokens, self.block_size, salt=salt, parent=parent,
                            mm_items=_shift_mm(mm, base))

    def _check_mm(self, mm_items, num_tokens: int) -> tuple | None:
        """Checked items of a prompt of ``num_tokens`` (None: none); ValueError naming
        mm_items when hash_fn cannot take them (never dropped silently)."""
        if mm_items is None:
            return None
        from .hashing import request_mm_items

        return request_mm_items(mm_items, num_tokens, self.hash_fn, self.block_size) or None

    def _extend_hashes(self, req: _Request, num_blocks: int) -> None:
        """Hash req's full blocks up to ``num_blocks`` (only the ones not hashed yet)."""
        have = len(req.hashes)
        if num_blocks <= have:
            return
        bs = self.block_size
        parent = req.hashes[-1] if have else None
        lo, hi = have * bs, num_blocks * bs
        if hi <= len(req.array):
            chunk = req.array[lo:hi]
        else:
            chunk = np.asarray(req.tokens[lo:hi], dtype=np.int32)
        req.hashes.extend(self._hash(chunk, req.salt, parent, req.mm, lo))

    def _get(self, request_id) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"request_id: no request {request_id!r}") from None

    def block_hashes(self, tokens, salt=None, *, mm_items=None) -> list[bytes]:
        """The hash chain of every full block of ``tokens`` under ``salt`` (and
        ``mm_items``, as :meth:`add_request`)."""
        toks = _token_array(tokens)
        return self._hash(toks, salt, None, self._check_mm(mm_items, len(toks)))

    # ------------------------------------------------------------------ queries
    def match(self, tokens, salt=None, *, mm_items=None) -> tuple[list[int], int]:
        """Longest cached prefix of ``tokens`` (with ``mm_items``, as :meth:`add_request`)
        in full blocks, never the last token.

        Returns (blocks, num_cached_tokens); takes no references (see :meth:`add_request`).
        """
        toks = _token_array(tokens)
        ns = namespace_of(salt)
        mm = self._check_mm(mm_items, len(toks))
        if not self.enable_caching or len(toks) <= self.block_size:
            return [], 0
        cap = (len(toks) - 1) // self.block_size
        blocks = self.pool.lookup(self._hash(toks[:cap * self.block_size], salt, None, mm), ns)
        return blocks, len(blocks) * self.block_size

    def __contains__(self, request_id) -> bool:
        return request_id in self._requests

    @property
    def request_ids(self) -> list:
        return list(self._requests)

    def blocks(self, request_id) -> list[int]:
        """The request's blocks in order (a copy)."""
        return list(self._get(request_id).blocks)

    def num_computed(self, request_id) -> int:
        """Tokens of the request whose KV is in its blocks."""
        return self._get(request_id).num_computed

    def tokens(self, request_id) -> list[int]:
        return list(self._get(request_id).tokens)

    def request_hashes(self, request_id, num_blocks: int | None = None) -> list[bytes]:
        """Hash chain of the request's first ``num_blocks`` full blocks (all full by default)."""
        req = self._get(request_id)
        n = (req.num_tokens // self.block_size if num_blocks is None
             else validate.check_int("num_blocks", num_blocks))
        if not 0 <= n <= req.num_tokens // self.block_size:
            raise ValueError(f"num_blocks: expected 0 <= num_blocks <= "
                             f"{req.num_tokens // self.block_size} (the request's full "
                             f"blocks), got {n}")
        self._extend_hashes(req, n)
        return req.hashes[:n]

    def namespace(self, request_id) -> bytes:
        return self._get(request_id).namespace

    def mm_items(self, request_id) -> tuple:
        """The request's multimodal items, checked and sorted (``()`` for none): pass them to
        :meth:`add_request` again with :meth:`tokens` after a preemption."""
        return self._get(request_id).mm or ()

    # ------------------------------------------------------------------ request life
    def add_request(self, request_id: Hashable, tokens, salt=None, *, mm_items=None) -> int:
        """Start a request: take the longest cached prefix (refs +1). Returns cached tokens.

        mm_items: the prompt's multimodal items, ``[(offset, length, identifier)]``: an
        item's placeholder tokens ``tokens[offset:offset + length]`` and its content hash
        (bytes or str, e.g. vLLM's mm hash), as many as the prompt has. Blocks before the first
        one an item overlaps hit as for a text prompt; later ones only for the same items at
        the same positions. Kept for the request's life (forks too)."""
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        toks, token_list = _tokens_checked(tokens)
        mm = None if mm_items is None else self._check_mm(mm_items, len(toks))
        req = _Request(toks, salt, namespace_of(salt), token_list, mm=mm)
        if self.enable_caching and len(toks) > self.block_size:
            cap = (len(toks) - 1) // self.block_size
            self._extend_hashes(req, len(toks) // self.block_size)
            hits = self.pool.lookup(req.hashes[:cap], req.namespace)
            self.pool.touch(hits)
            req.blocks = hits
            req.num_computed = req.num_registered = len(hits)
            req.num_computed *= self.block_size
        self._requests[request_id] = req
        return req.num_computed

    def append_tokens(self, request_id, token_ids) -> None:
        """Append known tokens (e.g. the sampled one); a later step computes their KV."""
        self._get(request_id).tokens.extend(_token_list(token_ids, "token_ids"))

    def onboard(self, request_id, num_blocks: int) -> list[int]:
        """Allocate ``num_blocks`` blocks for the request's next full blocks, whose KV a lower
        tier holds, register them and count them as computed. The caller must fill them
        (``scatter_blocks``) before the next step reads them. Returns the new block ids.
        Raises NoFreeBlocksError when the pool is short; a raising hash_fn or "stored"
        subscriber takes the call back too (as in :meth:`step`): a failed call changes
        nothing."""
        return self._onboard(*self._check_onboard(request_id, num_blocks))

    def _onboard(self, req: _Request, first: int, last: int) -> list[int]:
        """:meth:`onboard` of blocks [first, last) of a checked request."""
        if first == last:
            return []
        bs = self.block_size
        if self.enable_caching:  # hash first: a hash_fn that raises leaves nothing changed
            self._extend_hashes(req, last)
        new = self.pool.allocate(last - first)
        req.blocks.extend(new)  # appended: row() copies them in
        done = [(req, req.num_computed, req.num_registered)]
        req.num_computed = last * bs
        try:
            if self.enable_caching:
                self._register(req)
        except BaseException:  # a "stored" subscriber raised: as step, the call changes
            # nothing (the caller, seeing it fail, never fills the blocks)
            self._undo_commit(done)
            self._undo_allocate([(req, first, first, [])])
            raise
        return new

    def _check_onboard(self, request_id, num_blocks: int) -> tuple[_Request, int, int]:
        """:meth:`onboard`'s checks: (request, first block, end block) or the error naming
        the argument."""
        req = self._get(request_id)
        num_blocks = validate.check_int("num_blocks", num_blocks)
        bs = self.block_size
        first = req.num_computed // bs
        if num_blocks == 0:
            return req, first, first
        if req.num_computed % bs or len(req.blocks) * bs != req.num_computed:
            raise ValueError("request_id: onboard needs a request whose computed tokens end at "
                             "a block boundary with no block allocated beyond them")
        last = first + num_blocks
        if num_blocks < 0 or last * bs > req.num_tokens - 1:
            raise ValueError(f"num_blocks: expected 0 <= num_blocks <= "
                             f"{max((req.num_tokens - 1) // bs - first, 0)} (full blocks, not "
                             f"the last token), got {num_blocks}")
        return req, first, last

    def allocate(self, request_id, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for the next ``num_new_tokens`` tokens (which must be known tokens).

        Returns copy-on-write pairs ``[(src, dst)]`` for ``copy_blocks``. Raises
        NoFreeBlocksError, changing nothing, when the pool is short; an ``"evicted"`` or
        ``"removed"`` subscriber that raises takes the call back too (as in :meth:`step`).
        """
        req = self._get(request_id)
        self._check_new(req, num_new_tokens)
        first = req.num_computed // self.block_size
        before = [(req, first, len(req.blocks), req.blocks[first:])]
        copies = req.copies[:]  # pairs of earlier calls this step, not yet planned
        try:
            return self._allocate(req, int(num_new_tokens))
        except BaseException:  # no copy pair queued that the caller never got
            self._undo_allocate(before)
            req.copies = copies
            raise

    def _allocate(self, req: _Request, num_new_tokens: int) -> list[tuple[int, int]]:
        """:meth:`allocate` of a checked ``num_new_tokens`` (a Python int)."""
        if num_new_tokens == 0:
            return []
        bs = self.block_size
        start = req.num_computed
        end = start + num_new_tokens
        pool = self.pool
        first = start // bs
        last = -(-end // bs)
        blocks = req.blocks
        touched_existing = range(first, min(last, len(blocks)))
        cow = []  # indices of the blocks written into that other requests hold too
        if touched_existing:
            ref = pool.ref_counts
            for i in touched_existing:
                if ref[blocks[i]] > 1:
                    cow.append(i)
        need = max(last - len(blocks), 0) + len(cow)
        if need and need > pool.num_free:
            raise NoFreeBlocksError(f"num_new_tokens: {num_new_tokens} tokens need {need} blocks, "
                                    f"{pool.num_free} free")
        pairs = []
        if cow:
            fresh = pool.allocate(len(cow))
            for i, dst in zip(cow, fresh, strict=True):
                src = req.blocks[i]
                req.blocks[i] = dst
                req._row = None
                pairs.append((src, dst))
            pool.free([s for s, _ in pairs])
            req.copies.extend(pairs)  # plan() puts them in its copy_src / copy_dst
        if touched_existing:
            stale = []  # registered blocks written into: their hash goes first
            for i in touched_existing:
                if pool.block_hash(blocks[i]) is not None:
                    stale.append(blocks[i])
            if stale:
                pool.unregister(stale)
        if first < req.num_registered:
            req.num_registered = first
        grow = last - len(blocks)
        if grow > 0:
            req.blocks.extend(pool.allocate(grow))  # appended: row() copies them in
        return pairs

    @staticmethod
    def _check_new(req: _Request, num_new_tokens: int) -> None:
        num_new_tokens = validate.check_int("num_new_tokens", num_new_tokens)
        if (num_new_tokens < 0 or
                req.num_computed + num_new_tokens > req.num_tokens):
            raise ValueError(f"num_new_tokens: expected 0 <= num_new_tokens <= "
                             f"{req.num_tokens - req.num_computed} (known tokens not computed "
                             f"yet), got {num_new_tokens!r}")

    def blocks_needed(self, request_id, num_new_tokens: int) -> int:
        """Free blocks :meth:`allocate` would take for ``num_new_tokens`` (CoW copies included)."""
        return self.batch_blocks_needed([(request_id, num_new_tokens)])

    def batch_blocks_needed(self, batch: Iterable[tuple[Hashable, int]]) -> int:
        """Free blocks allocating the whole ``batch`` ([(request_id, num_new_tokens)]) takes
        (what :meth:`step` checks first): each request's new blocks, plus one
        copy per write into a shared block while the block stays shared (k writers of a
        block held r times copy min(k, r - 1) times: the last holder writes in place)."""
        return self._blocks_needed(self._checked(_pairs(batch)[0]))

    def _checked(self, batch: Iterable[tuple[Hashable, int]]) -> list[tuple[_Request, int]]:
        """[(request, num_new_tokens as a Python int)] of ``batch``, each request looked up and
        its count checked once, in batch order (the first bad entry raises)."""
        get = self._requests.get
        out = []
        for rid, n in batch:
            req = get(rid)
            if req is None:
                req = self._get(rid)  # raises the KeyError
            if type(n) is not int or n < 0 or req.num_computed + n > req.num_tokens:
                self._check_new(req, n)
                n = int(n)
            out.append((req, n))
        return out

    def _blocks_needed(self, items: list[tuple[_Request, int]]) -> int:
        bs = self.block_size
        ref = self.pool.ref_counts
        need = 0
        writers: dict[int, int] = {}
        for req, n in items:
            if n == 0:
                continue
            blocks = req.blocks
            end = -(-(req.num_computed + n) // bs)
            grow = end - len(blocks)
            if grow >= 0:
                need += grow
                end = len(blocks)
            for i in range(req.num_computed // bs, end):
                b = blocks[i]
                if ref[b] > 1:
                    writers[b] = writers.get(b, 0) + 1
        return need + sum(min(k, ref[b] - 1) for b, k in writers.items())

    def commit(self, request_id, num_new_tokens: int) -> None:
        """The KV of the next ``num_new_tokens`` tokens is (or will be, this step) written:
        count them computed and register the blocks they filled."""
        req = self._get(request_id)
        num_new_tokens = validate.check_int("num_new_tokens", num_new_tokens)
        end = req.num_computed + num_new_tokens
        limit = min(len(req.blocks) * self.block_size, req.num_tokens)
        if num_new_tokens < 0 or end > limit:
            raise ValueError(f"num_new_tokens: expected 0 <= num_new_tokens <= "
                             f"{limit - req.num_computed} (allocated, known tokens), "
                             f"got {num_new_tokens}")
        self._commit(req, end)

    def _commit(self, req: _Request, end: int) -> None:
        """:meth:`commit` up to token ``end`` (checked: allocated, known tokens)."""
        if self.enable_caching:  # hash first: a hash_fn that raises leaves nothing counted
            self._extend_hashes(req, end // self.block_size)
        req.num_computed = end
        req.copies = []
        if self.enable_caching:
            self._register(req)

    def _register(self, req: _Request) -> None:
        full = req.num_computed // self.block_size
        if full <= req.num_registered:
            return
        self._extend_hashes(req, full)
        lo = req.num_registered
        parent = req.hashes[lo - 1] if lo else None
        bs = self.block_size
        tokens = req.token_slice(lo * bs, full * bs) if self.pool.events else None  # events
        self.pool.register(req.blocks[lo:full], req.hashes[lo:full], req.namespace, parent,
                           tokens)
        req.num_registered = full

    def plan(self, batch: Iterable[tuple[Hashable, int]]) -> BatchPlan:
        """Metadata for ``batch`` = [(request_id, num_new_tokens)] after :meth:`allocate`
        (before :meth:`commit`), with the copy-on-write pairs of the allocations not committed
        yet in ``copy_src`` / ``copy_dst``."""
        batch, request_ids = _pairs(batch)
        return self._plan(request_ids, [self._get(rid) for rid, _ in batch],
                          [n for _, n in batch])

    def _plan(self, request_ids: list, reqs: list[_Request], q_lens: list[int]) -> BatchPlan:
        plan = plan_checked_rows([r.row() for r in reqs], [r.num_computed for r in reqs],
                                 q_lens, self.block_size, shared_prefix=self.shared_prefix,
                                 min_prefix_blocks=self.min_prefix_blocks,
                                 min_group_size=self.min_group_size)
        plan.request_ids = request_ids
        pairs = [p for r in reqs if r.copies for p in r.copies]
        if pairs:
            plan.copy_src = np.asarray([src for src, _ in pairs], dtype=np.int32)
            plan.copy_dst = np.asarray([dst for _, dst in pairs], dtype=np.int32)
        return plan

    def step(self, batch: Iterable[tuple[Hashable, int]]) -> BatchPlan:
        """One engine step: allocate every request's new tokens, build the plan (with the
        copy-on-write pairs) and commit. Raises NoFreeBlocksError, changing nothing, when the
        batch needs more blocks than are free (the scheduler then preempts or waits)."""
        batch, request_ids = _pairs(batch)
        if len(set(request_ids)) != len(batch):
            raise ValueError("batch: expected each request_id at most once")
        items = self._checked(batch)  # each request looked up and checked once
        pool = self.pool
        need = self._blocks_needed(items)
        if need > pool.num_free:
            raise NoFreeBlocksError(f"batch: needs {need} blocks, {pool.num_free} free")
        bs = self.block_size
        # what allocate may change, for the undo: blocks from the first one written on
        # (copy-on-write swaps them) and the length (new blocks are appended)
        before = [(req, req.num_computed // bs, len(req.blocks),
                   req.blocks[req.num_computed // bs:]) for req, _ in items]
        try:
            allocate = self._allocate
            for req, n in items:
                allocate(req, n)
            reqs = [req for req, _ in items]
            plan = self._plan(request_ids, reqs, [n for _, n in items])
            if self.enable_caching:  # hash the blocks the batch fills before committing any
                self._hash_filled([(req, (req.num_computed + n) // bs) for req, n in items
                                   if (req.num_computed + n) // bs > len(req.hashes)])
        except BaseException:
            self._undo_allocate(before)
            raise
        caching = self.enable_caching
        done = []  # (request, num_computed, num_registered) before its commit
        try:
            for req, n in items:  # commit (hashed above)
                done.append((req, req.num_computed, req.num_registered))
                req.num_computed += n
                if req.copies:
                    req.copies = []
                if caching and req.num_computed // bs > req.num_registered:
                    self._register(req)
        except BaseException:  # a "stored" subscriber raised: the step changes no request
            self._undo_commit(done)
            self._undo_allocate(before)
            raise
        return plan

    def _undo_commit(self, done: list) -> None:
        """Take back the commits of a step that raised while registering: the blocks it
        registered (none held a hash before: blocks past a request's registered ones are its
        own, unregistered) are unregistered (``"removed"`` events), the counts restored. A
        subscriber raising again here is not raised (the step's first error is)."""
        bs = self.block_size
        blocks = []
        for req, computed, registered in done:
            blocks += req.blocks[registered:req.num_computed // bs]
            req.num_computed = computed
            req.num_registered = registered
        with contextlib.suppress(Exception):  # the pool is consistent; the first error wins
            self.pool.unregister(blocks)

    def _hash_filled(self, todo: list[tuple[_Request, int]]) -> None:
        """:meth:`_extend_hashes` of each (request, num_blocks) of ``todo``. With the default
        hash, the requests of one salt are hashed in one ``hash_blocks`` call (a ragged batch,
        each continuing its own chain): its per-call cost, ~0.1 ms, was paid by each request
        that filled a block, 1 in block_size of a decode batch every step. Requests with
        multimodal items whose new blocks all come at or after their first item's block (the
        decode blocks) make a batch of their own, with extra words; others are hashed alone."""
        if self.hash_fn is not default_hash_fn or len(todo) < 2:
            for req, num_blocks in todo:
                self._extend_hashes(req, num_blocks)
            return
        from .hashing import hash_blocks, mm_extra_words

        bs = self.block_size
        # by namespace, the salt's bytes (what the default hash reads of a salt): a bytearray or
        # memoryview salt is no dict key; and by whether the blocks take extra words
        groups: dict[tuple[bytes, bool], list[tuple[_Request, int]]] = {}
        for item in todo:
            req = item[0]
            if req.mm is None:
                groups.setdefault((req.namespace, False), []).append(item)
            elif len(req.hashes) >= req.mm[0][0] // bs:
                groups.setdefault((req.namespace, True), []).append(item)
            else:  # blocks before the first item's: the switch is inside this chunk
                self._extend_hashes(*item)
        for (salt, with_extra), group in groups.items():
            if len(group) == 1:
                self._extend_hashes(*group[0])
                continue
            chunks, cu, parents = [], [0], []
            tail: list[int] = []  # consecutive pieces of known tokens past the arrays
            for req, num_blocks in group:
                have = len(req.hashes)
                lo, hi = have * bs, num_blocks * bs
                if hi <= len(req.array):
                    if tail:
                        chunks.append(np.array(tail, dtype=np.int32))
                        tail = []
                    chunks.append(req.array[lo:hi])
                else:  # decode tokens: one conversion for the run, not one per request
                    tail += req.tokens[lo:hi]
                cu.append(cu[-1] + hi - lo)
                parents.append(req.hashes[-1] if have else _ZERO_PARENT)
            if tail:
                chunks.append(np.array(tail, dtype=np.int32))
            # parents as u32[num_seqs, 8] (32 zero bytes = none): no conversion per sequence
            words = np.frombuffer(b"".join(parents), dtype="<u4").astype(np.uint32)
            extra = None
            if with_extra:
                extra = np.concatenate([mm_extra_words(req.mm, len(req.hashes), num_blocks, bs)
                                        for req, num_blocks in group])
            digests = hash_blocks(np.concatenate(chunks), bs, cu_lens=np.asarray(cu, np.int32),
                                  salt=salt, parent=words.reshape(len(group), 8), extra=extra)
            k = 0
            for req, num_blocks in group:
                m = num_blocks - len(req.hashes)
                req.hashes.extend(digests[k:k + m])
                k += m

    def _undo_allocate(self, before: list) -> None:
        """Put back the blocks :meth:`allocate` changed since ``before`` ([(request, first,
        num_blocks, blocks[first:])] then: allocate changes no block before ``first``): a
        copy-on-write source is taken again and its fresh copy freed, new blocks are freed.
        (Blocks it unregistered stay unregistered: a lost cache entry, never a wrong one.) So
        a step that fails after allocating leaves no copy the engine never heard of: a retried
        step plans the copies again."""
        for req, first, num_blocks, tail in before:
            new = req.blocks
            swapped = [i for i in range(first, min(num_blocks, len(new)))
                       if tail[i - first] != new[i]]
            self.pool.touch([tail[i - first] for i in swapped])
            self.pool.free([new[i] for i in swapped] + new[num_blocks:])
            req.blocks = new[:first] + tail
            req.copies = []
            req._row = None

    def fork(self, parent_id, child_id) -> None:
        """A child request sharing all the parent's blocks and tokens (parallel sampling).
        The first write into a shared block copies it (copy-on-write)."""
        if child_id in self._requests:
            raise ValueError(f"child_id: {child_id!r} is already running")
        req = self._get(parent_id).copy()
        self.pool.touch(req.blocks)
        self._requests[child_id] = req

    def truncate(self, request_id, num_tokens: int) -> None:
        """Roll back to the first ``num_tokens`` tokens (rejected speculative tokens); blocks
        past them are freed. A registered block that is written again later is unregistered
        or copied first, never changed under its hash."""
        req = self._get(request_id)
        num_tokens = validate.check_int("num_tokens", num_tokens)
        if not 0 <= num_tokens <= req.num_tokens:
            raise ValueError(f"num_tokens: expected 0 <= num_tokens <= {req.num_tokens}, "
                             f"got {num_tokens}")
        bs = self.block_size
        del req.tokens[num_tokens:]
        req.array = req.array[:num_tokens]
        req.num_computed = min(req.num_computed, num_tokens)
        keep = -(-req.num_computed // bs)
        if keep < len(req.blocks):
            self.pool.free(req.blocks[keep:])
            del req.blocks[keep:]
            req._row = None
            if req.copies:  # pending copies into freed blocks are void
                held = set(req.blocks)
                req.copies = [p for p in req.copies if p[1] in held]
        del req.hashes[num_tokens // bs:]
        req.num_registered = min(req.num_registered, req.num_computed // bs)

    def free(self, request_id) -> None:
        """The request finished (or was preempted): its blocks go back to the pool, cached
        ones stay hittable until evicted (tail blocks are evicted first)."""
        req = self._requests.pop(request_id, None)
        if req is None:
            raise KeyError(f"request_id: no request {request_id!r}")
        self.pool.free(req.blocks)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (running requests keep their blocks)."""
        try:
            self.pool.reset_prefix_cache()  # a "cleared" subscriber may raise: done anyway
        finally:
            for req in self._requests.values():
                req.num_registered = 0  # their KV is still valid: the next commit registers
