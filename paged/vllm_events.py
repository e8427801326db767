"""vLLM's KV event wire format: prefixkv events to and from the msgpack ``KVEventBatch`` that a
vLLM engine publishes over ZMQ (``--kv-events-config``), which llm-d's KV-cache indexer,
Dynamo's router and vLLM's own subscriber example consume.

Two directions:

- :class:`VllmEventEncoder`: a subscriber of a prefixkv :class:`~prefixkv.paged.events.EventBus`
  that turns its events into vLLM payloads, one batch per :meth:`~VllmEventEncoder.take` (an
  engine step), so an engine built on prefixkv feeds the routers and indexers written for vLLM.
- :class:`VllmEventDecoder`: a vLLM engine's payloads to :class:`KVEvent` objects that a
  :class:`~prefixkv.paged.router.Router` applies (``router.apply(worker, event)``); with
  :func:`vllm_hash_fn` as the router's ``hash_fn``, a prefixkv router routes requests over
  vLLM engines by their cached prefixes.

The wire (vLLM's ``vllm/distributed/kv_events.py``, msgspec structs with ``tag=True`` and
``omit_defaults=True``):

- a batch is ``{"ts": float, "events": [...], "data_parallel_rank": int}`` (the rank left out
  when None); older vLLM releases encode structs as arrays (``array_like=True``): the batch
  ``[ts, events, rank]``, an event ``["BlockStored", field, ...]`` with every field in order
  (those releases had fewer fields and skip trailing ones they do not know);
- ``BlockStored``: ``block_hashes``, ``parent_block_hash``, ``token_ids``, ``block_size``,
  ``lora_id`` (deprecated, None here), ``medium``, ``lora_name``, then the optional
  ``extra_keys`` (one entry per block) and ``group_idx``; ``BlockRemoved``: ``block_hashes``,
  ``medium``, optional ``group_idx``; ``AllBlocksCleared``: no fields;
- a block hash is the digest's bytes, or with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`` (vLLM's
  default) its low 64 bits as an int (:func:`external_hash`);
- ZMQ frames: ``(topic, sequence number as 8 bytes big-endian, payload)``
  (:func:`encode_frames`, :func:`decode_frames`).

Salts. vLLM's events have no namespace field: its hashes include the cache salt, which vLLM
puts among the extra keys of a request's block 0 only. prefixkv's events carry the namespace on
every event, and the encoder keeps it on the wire:

- a salted ``"stored"`` event that starts a sequence (``parent_hash`` None) gets
  ``extra_keys`` whose first block's keys are ``(("cache_salt", salt),)`` (vLLM 0.33's key),
  None for the others;
- in the map wire, every salted event also carries a top-level ``"cache_salt"`` string (the
  field TRT-LLM's publisher sends and Dynamo reads; vLLM's decoder ignores unknown keys), so a
  chain continued in a later event keeps its namespace;
- a namespace that is not UTF-8 (a bytes salt) raises: vLLM's cache salt is a str.

The decoder takes the namespace from ``"cache_salt"``, else from a ``("cache_salt", salt)``
extra key, else from the parent block's (it remembers the namespace of every live block, as
Dynamo's indexer does), else the shared namespace b"" (always, once the stream has shown
it marks salted events with ``"cache_salt"``). A hash that ignores salts can be live under
several namespaces: a continuation the wire leaves ambiguous is left out and such a removal
goes to each of them (the router misses rather than crossing tenants). Only the salt's own
extra key is written or read: a LoRA adapter's or a multimodal item's keys are in the hashes
already, and the encoder's events do not know them.
"""

from __future__ import annotations

import operator
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from .events import CLEARED, EVICTED, REMOVED, STORED, KVEvent

#: prefixkv tier name -> vLLM ``medium`` (vLLM's GPU cache is "GPU", its CPU offload "CPU").
MEDIA = {"device": "GPU", "host": "CPU", "disk": "DISK"}

WIRES = ("map", "array")

# the array wire's field order after the tag, of the fields the decoder reads
_ARRAY_FIELDS = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                                 "lora_id", "medium", "lora_name", "extra_keys", "group_idx"),
                 "BlockRemoved": ("block_hashes", "medium", "group_idx")}

# BlockStored / BlockRemoved fields with a default (None): left out of the map wire when None
_OPTIONAL = frozenset({"extra_keys", "group_idx", "kv_cache_spec_kind",
                       "kv_cache_spec_sliding_window"})

_U64 = (1 << 64) - 1


def _msgpack():
    try:
        import msgpack
    except ImportError:
        raise ImportError("the vLLM event wire format needs the msgpack package "
                          "(pip install 'prefixkv[events]')") from None
    return msgpack


def _msgspec():
    """msgspec when installed (vLLM depends on it): packs msgpack 2.6x faster than msgpack's
    Packer, with the same bytes for these objects."""
    try:
        import msgspec
    except ImportError:
        return None
    return msgspec


def _pack_function():
    """A function object -> msgpack bytes (bytes as bin, numpy ints through ``_plain``)."""
    msgspec = _msgspec()
    if msgspec is not None:
        return msgspec.msgpack.Encoder(enc_hook=_plain).encode
    return _msgpack().Packer(use_bin_type=True, default=_plain).pack


def external_hash(block_hash: bytes) -> int:
    """vLLM's int form of a block hash (``maybe_convert_block_hash`` with
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``): the digest's low 64 bits, big-endian."""
    return int.from_bytes(block_hash, "big") & _U64


def _hash_bytes(h, name: str) -> bytes:
    """A wire block hash as prefixkv bytes: bytes as they are, an int (signed or unsigned 64-bit)
    as 8 bytes big-endian, so ``_hash_bytes(external_hash(d)) == d[-8:]``."""
    if isinstance(h, (bytes, bytearray)):
        return bytes(h)
    if isinstance(h, int) and not isinstance(h, bool) and -(1 << 63) <= h <= _U64:
        return (h & _U64).to_bytes(8, "big")
    raise ValueError(f"{name}: expected a block hash (bytes or a 64-bit int), got {h!r}")


def _hashes_bytes(hashes, name: str) -> tuple:
    """``_hash_bytes`` of each wire hash; unsigned 64-bit ints (the usual wire) in one pack."""
    if hashes and set(map(type, hashes)) == {int}:
        try:
            packed = struct.pack(f">{len(hashes)}Q", *hashes)
        except struct.error:  # signed (negative) ints, or out of range: one by one
            pass
        else:
            return struct.unpack("8s" * len(hashes), packed)  # 8-byte slices, in one call
    return tuple(_hash_bytes(h, name) for h in hashes)


def _plain(obj):
    """msgpack's ``default``: numpy integers and arrays (token ids) as Python ints."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "iu":
        return obj.tolist()
    raise TypeError(f"cannot encode {type(obj).__name__} in a vLLM event")


def _token_ids(tokens) -> tuple:
    """A stored event's token ids as Python ints (a tuple packs as an array); anything else
    raises naming them, at the event's source rather than when its batch is packed."""
    try:
        if type(sum(tokens, 0)) is int:  # Python ints (the pool's): no copy
            return tokens
        return tuple(operator.index(t) for t in tokens)  # numpy ints
    except TypeError:
        raise TypeError(f"event.token_ids: expected integers, got "
                        f"{type(tokens).__name__} {tokens!r:.80}") from None


def vllm_hash_fn(*, algo: str = "vllm-sha256", seed: str | None = None, lora=None,
                 int_hashes: bool = True):
    """A :class:`~prefixkv.paged.router.Router` ``hash_fn`` giving the hashes a vLLM engine's
    events carry: ``hash_blocks(algo=algo, seed=seed, lora=lora)``. algo: "vllm-sha256" for
    the engine's default ``--prefix-caching-hash-algo sha256``, "vllm-sha256-cbor" for
    ``sha256_cbor``; seed: the engines' PYTHONHASHSEED (None: "vllm-none-hash", vLLM 0.33's
    seed without it; earlier releases draw a random NONE_HASH per process unless
    PYTHONHASHSEED is set, so set it on every engine). The hashes are cut to the 8 bytes
    :class:`VllmEventDecoder` makes of an int hash when ``int_hashes``. With
    ``int_hashes=False`` it continues chains (``parent=``), so a
    :class:`~prefixkv.paged.PrefixCache` keyed by it publishes vLLM's own hashes."""
    from .hashing import hash_blocks
    from .validate import VLLM_ALGOS

    if algo not in VLLM_ALGOS:
        raise ValueError(f"algo: expected one of {VLLM_ALGOS}, got {algo!r}")

    def hash_fn(tokens, block_size, *, salt=None, parent=None, mm_items=None):
        if parent is not None and int_hashes:
            raise ValueError("parent: continuing a vLLM chain needs the parent's full digest, "
                             "which int hashes cut; hash the whole prefix (parent=None), or "
                             "use int_hashes=False")
        hashes = hash_blocks(tokens, block_size, salt=salt, parent=parent, algo=algo,
                             seed=seed, lora=lora, mm_items=mm_items)
        return [h[-8:] for h in hashes] if int_hashes else hashes

    return hash_fn


def encode_frames(seq: int, payload: bytes, topic: str = "") -> tuple[bytes, bytes, bytes]:
    """The ZMQ multipart frames vLLM's publisher sends: ``(topic, seq as 8 bytes big-endian,
    payload)`` (``socket.send_multipart(encode_frames(...))``)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 63:
        raise ValueError(f"seq: expected an int in [0, 2**63), got {seq!r}")
    return topic.encode("utf-8"), seq.to_bytes(8, "big"), bytes(payload)


def decode_frames(frames) -> tuple[int, bytes]:
    """``(seq, payload)`` of a vLLM publisher's multipart message (topic, seq, payload)."""
    frames = list(frames)
    if len(frames) != 3 or len(frames[1]) != 8:
        raise ValueError(f"frames: expected (topic, 8-byte sequence number, payload), got "
                         f"{len(frames)} frames")
    seq = int.from_bytes(bytes(frames[1]), "big", signed=True)
    if seq < 0:  # publishers number batches from 0 up (unsigned on the wire, below 2**63)
        raise ValueError(f"frames: expected a sequence number in [0, 2**63), got bytes "
                         f"{bytes(frames[1]).hex()}")
    return seq, bytes(frames[2])


class VllmEventBatch(NamedTuple):
    """One decoded vLLM ``KVEventBatch``: its timestamp, data-parallel rank and events."""

    ts: float
    data_parallel_rank: int | None
    events: list


class VllmEventEncoder:
    """prefixkv :class:`KVEvent` objects to vLLM ``KVEventBatch`` payloads.

    ``enc = VllmEventEncoder(block_size); cache.events.subscribe(enc)``; after each engine
    step ``payload = enc.take()`` (None when nothing happened) is what vLLM's publisher sends;
    :meth:`encode` does one batch without the buffer.

    block_size: the pool's block size (``BlockStored.block_size``).
    wire: "map" (vLLM's current encoding) or "array" (releases with ``array_like`` structs).
    int_hashes: block hashes as vLLM's 64-bit ints (its default) instead of bytes.
    media: tier name -> ``medium`` (default :data:`MEDIA`; an unlisted tier's name, upper-cased).
    data_parallel_rank: the batch's ``data_parallel_rank`` (None: left out).

    ``"removed"`` and ``"evicted"`` both become ``BlockRemoved``. A ``"cleared"`` event becomes
    ``AllBlocksCleared`` only for a tier whose medium is "GPU": vLLM's consumers read that
    event as the GPU cache emptied, so another tier's is left out (their index of that tier
    keeps stale hints, which a lookup there confirms, instead of losing the GPU's blocks).
    """

    def __init__(self, block_size: int, *, wire: str = "map", int_hashes: bool = True,
                 media: Mapping[str, str] | None = None,
                 data_parallel_rank: int | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
        if wire not in WIRES:
            raise ValueError(f"wire: expected one of {WIRES}, got {wire!r}")
        if data_parallel_rank is not None and (isinstance(data_parallel_rank, bool)
                                               or not isinstance(data_parallel_rank, int)):
            raise TypeError(f"data_parallel_rank: expected an int or None, got "
                            f"{data_parallel_rank!r}")
        self.block_size = block_size
        self.wire = wire
        self.int_hashes = bool(int_hashes)
        self.media = dict(MEDIA if media is None else media)
        self.data_parallel_rank = data_parallel_rank
        self._pending: list = []  # wire events of the current batch
        # _pending between the threads that publish events (tiers publish from the calling
        # thread) and the one taking batches: an event appended to the list being encoded,
        # after its encoding, was in no batch
        self._lock = threading.Lock()
        self._pack = _pack_function()

    def __call__(self, event: KVEvent) -> None:
        """Subscriber: converts ``event`` now (an unencodable one raises here, at its source)
        and keeps it for the next :meth:`take`. Any thread may publish."""
        ev = self._event(event)
        if ev is not None:
            with self._lock:
                self._pending.append(ev)

    def take(self, ts: float | None = None) -> bytes | None:
        """The payload of the events received since the last call (None when there were
        none); ``ts``: the batch time (default ``time.time()``; a bad one raises and keeps the
        events)."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return None
        try:
            return self._batch(pending, ts)
        except BaseException:
            with self._lock:  # kept, before those that came since
                self._pending[:0] = pending
            raise

    def encode(self, events: Iterable[KVEvent], ts: float | None = None) -> bytes:
        """One payload of ``events`` (empty: a batch with no events)."""
        wire = (self._event(e) for e in events)
        return self._batch([e for e in wire if e is not None], ts)

    # ---------------------------------------------------------------------- wire objects
    def _batch(self, events: list, ts) -> bytes:
        if ts is None:
            ts = time.time()
        elif isinstance(ts, bool) or not isinstance(ts, (int, float, np.integer, np.floating)):
            raise TypeError(f"ts: expected a number of seconds or None, got {ts!r}")
        else:
            ts = float(ts)
        rank = self.data_parallel_rank
        if self.wire == "map":
            obj = {"ts": ts, "events": events}
            if rank is not None:
                obj["data_parallel_rank"] = rank
        else:
            obj = [ts, events, rank]
        return self._pack(obj)

    def _hashes(self, hashes) -> list:
        if not self.int_hashes:
            return [bytes(h) for h in hashes]
        if hashes and set(map(len, hashes)) == {32}:  # the usual digests: one numpy pass
            return np.frombuffer(b"".join(hashes), ">u8")[3::4].tolist()
        return [external_hash(h) for h in hashes]

    def _salt(self, event: KVEvent) -> str | None:
        if not event.namespace:
            return None
        try:
            return event.namespace.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"event.namespace: {event.namespace!r} is not UTF-8; vLLM's "
                             f"cache_salt is a str, so salt with a str to publish vLLM "
                             f"events") from None

    def _event(self, event: KVEvent):
        if not isinstance(event, KVEvent):
            raise TypeError(f"event: expected a KVEvent, got {type(event).__name__}")
        salt = self._salt(event)
        medium = self.media.get(event.tier, event.tier.upper())
        if event.kind == CLEARED:
            if medium != MEDIA["device"]:
                return None  # vLLM's AllBlocksCleared is the GPU cache's: see the class doc
            fields = [("type", "AllBlocksCleared")]
        elif event.kind == STORED:
            parent = event.parent_hash
            if parent is not None:
                parent = external_hash(parent) if self.int_hashes else bytes(parent)
            n = len(event.block_hashes)
            fields = [("type", "BlockStored"),
                      ("block_hashes", self._hashes(event.block_hashes)),
                      ("parent_block_hash", parent),
                      ("token_ids", _token_ids(event.token_ids)),
                      ("block_size", self.block_size),
                      ("lora_id", None), ("medium", medium), ("lora_name", None)]
            extra = None
            if salt is not None and event.parent_hash is None and n:
                extra = [[["cache_salt", salt]]] + [None] * (n - 1)
            fields += [("extra_keys", extra), ("group_idx", None), ("kv_cache_spec_kind", None),
                       ("kv_cache_spec_sliding_window", None)]
        elif event.kind in (REMOVED, EVICTED):
            fields = [("type", "BlockRemoved"),
                      ("block_hashes", self._hashes(event.block_hashes)), ("medium", medium),
                      ("group_idx", None)]
        else:
            raise ValueError(f"event.kind: expected one of stored/removed/evicted/cleared, got "
                             f"{event.kind!r}")
        if self.wire == "array":  # every field, as msgspec writes array_like structs
            return [v for _, v in fields]
        # the map drops the optional fields left at their default (omit_defaults)
        out = {k: v for k, v in fields if v is not None or k not in _OPTIONAL}
        if salt is not None:
            out["cache_salt"] = salt
        return out


class VllmEventDecoder:
    """A vLLM engine's ``KVEventBatch`` payloads to prefixkv :class:`KVEvent` objects.

    ``dec = VllmEventDecoder()``, one per engine stream (it remembers the namespace of the
    stream's live blocks, per tier); then
    ``for ev in dec.decode(payload).events: router.apply(worker, ev)``.
    Both wires are read (maps and arrays), hashes of either form (ints become 8 bytes
    big-endian: use :func:`vllm_hash_fn` for the router), unknown fields are skipped.

    tiers: vLLM ``medium`` -> prefixkv tier name (default: the inverse of :data:`MEDIA`; an
        unlisted medium's name, lower-cased; no medium: "device").
    group_idx: the KV-cache group whose events are kept (hybrid models publish one stream of
        stores and removals per group with the same hashes; a sliding-window group drops
        blocks the full-attention group keeps). Events without a group are always kept.
    """

    def __init__(self, *, tiers: Mapping[str, str] | None = None, group_idx: int = 0) -> None:
        if tiers is not None and not (isinstance(tiers, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in tiers.items())):
            raise TypeError(f"tiers: expected a mapping of vLLM medium (str) to tier name "
                            f"(str), got {tiers!r}")
        if isinstance(group_idx, bool) or not isinstance(group_idx, int):
            raise TypeError(f"group_idx: expected an int, got {group_idx!r}")
        self.tiers = {v: k for k, v in MEDIA.items()} if tiers is None else dict(tiers)
        self.group_idx = group_idx
        # tier -> {live block hash: its namespace, or the set of them when a hash that
        # ignores salts stores one hash under several}
        self._ns: dict[str, dict[bytes, bytes | set]] = {}
        # the stream marks every salted event with a top-level "cache_salt" (prefixkv's map
        # wire): an event without one is the shared namespace's, whatever its parent's
        self._marked = False
        # a salted store has been seen (unmarked stream): a continuation whose parent is not
        # live may then be any tenant's
        self._salted = False
        self._block_size = 0  # the stream's, from its stores (num_tokens of removals)
        self._msgpack = _msgpack()

    @property
    def gpu_tier(self) -> str:
        """The tier vLLM's GPU cache maps to (``AllBlocksCleared`` clears it)."""
        return self.tiers.get(MEDIA["device"], "device")

    @property
    def seen_tiers(self) -> tuple:
        """The tiers this stream has stored blocks in."""
        return tuple(self._ns)

    def decode(self, payload: bytes) -> VllmEventBatch:
        """The batch in ``payload``; a malformed payload raises ValueError naming what is
        wrong (a consumer skips it; the decoder's state is unchanged)."""
        try:
            obj = self._msgpack.unpackb(payload, raw=False, strict_map_key=False,
                                        use_list=False)
        except Exception as e:  # noqa: BLE001 - msgpack raises several types
            raise ValueError(f"payload: not msgpack ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict):
            ts, events, rank = obj.get("ts"), obj.get("events"), obj.get(
                "data_parallel_rank", obj.get("dp_rank"))
        elif isinstance(obj, (list, tuple)) and len(obj) >= 2:
            ts, events = obj[0], obj[1]
            rank = obj[2] if len(obj) > 2 else None
        else:
            raise ValueError("payload: expected a KVEventBatch (a map or an array)")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise ValueError(f"payload: ts must be a number, got {ts!r}")
        if not isinstance(events, (list, tuple)):
            raise ValueError(f"payload: events must be an array, got {type(events).__name__}")
        parsed = [self._parse(i, e) for i, e in enumerate(events)]  # all checked, then applied
        if not self._marked:
            self._marked = any(p is not None and p[-1] for p in parsed)
        out: list[KVEvent] = []
        for p in parsed:
            if p is not None:
                out.extend(self._apply(*p))
        return VllmEventBatch(float(ts), rank, out)

    # ----------------------------------------------------------------------------- parsing
    def _parse(self, i: int, e):
        name = f"events[{i}]"
        if isinstance(e, dict):
            tag = e.get("type")
            get = e.get
        elif isinstance(e, (list, tuple)) and e:
            tag = e[0]
            get = None
        else:
            raise ValueError(f"{name}: expected a tagged map or array, got {e!r}")
        if not isinstance(tag, str):
            raise ValueError(f"{name}: expected an event type (a str), got {tag!r}")
        if get is None:
            get = dict(zip(_ARRAY_FIELDS.get(tag, ()), e[1:], strict=False)).get
        if tag == "AllBlocksCleared":  # the GPU cache's
            return (CLEARED, (), None, self.gpu_tier, 0, (), None, False)
        if tag not in ("BlockStored", "BlockRemoved"):
            raise ValueError(f"{name}: unknown event type {tag!r}; expected BlockStored, "
                             f"BlockRemoved or AllBlocksCleared")
        group = get("group_idx")
        if group is not None and group != self.group_idx:
            return None
        hashes = get("block_hashes")
        if not isinstance(hashes, (list, tuple)):
            raise ValueError(f"{name}.block_hashes: expected an array, got {hashes!r}")
        hashes = _hashes_bytes(hashes, f"{name}.block_hashes")
        medium = get("medium")
        if medium is not None and not isinstance(medium, str):
            raise ValueError(f"{name}.medium: expected a str or nil, got {medium!r}")
        tier = "device" if medium is None else self.tiers.get(medium, medium.lower())
        salt = get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise ValueError(f"{name}.cache_salt: expected a str, got {salt!r}")
        marked = salt is not None
        if tag == "BlockRemoved":
            return (REMOVED, hashes, None, tier, 0, (), salt, marked)
        parent = get("parent_block_hash")
        parent = None if parent is None else _hash_bytes(parent, f"{name}.parent_block_hash")
        block_size = get("block_size")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{name}.block_size: expected an int >= 1, got {block_size!r}")
        tokens = get("token_ids") or ()
        try:
            if tokens and isinstance(tokens[0], (list, tuple)):  # EAGLE bigrams (a, b)
                tokens = [p[0] for p in tokens] + [tokens[-1][1]]
            # ints only: a float anywhere makes the sum a float, any other type raises
            ok = isinstance(tokens, (list, tuple)) and type(sum(tokens)) is int
        except (TypeError, IndexError, KeyError):
            ok = False
        if not ok:
            raise ValueError(f"{name}.token_ids: expected an array of ints (or EAGLE pairs)")
        tokens = tuple(tokens)
        extra = self._extra_key_salt(get("extra_keys"), f"{name}.extra_keys")
        return (STORED, hashes, parent, tier, block_size, tokens,
                extra if salt is None else salt, marked)

    @staticmethod
    def _extra_key_salt(extra_keys, name: str) -> str | None:
        """The salt of a ``("cache_salt", salt)`` extra key on any block, else None."""
        if extra_keys is None:
            return None
        if not isinstance(extra_keys, (list, tuple)):
            raise ValueError(f"{name}: expected an array (one entry per block) or nil, got "
                             f"{extra_keys!r}")
        for i, keys in enumerate(extra_keys):
            if keys is None:
                continue
            if not isinstance(keys, (list, tuple)):
                raise ValueError(f"{name}[{i}]: expected an array of keys or nil, got {keys!r}")
            for k in keys:
                if (isinstance(k, (list, tuple)) and len(k) == 2 and k[0] == "cache_salt"
                        and isinstance(k[1], str)):
                    return k[1]
        return None

    def _apply(self, kind, hashes, parent, tier, block_size, tokens, salt,
               marked) -> list[KVEvent]:
        if kind == CLEARED:
            self._ns.pop(tier, None)
            return [KVEvent(CLEARED, (), None, tier, b"", 0)]
        live = self._ns.setdefault(tier, {})
        if kind == STORED:
            if salt is not None:
                ns = salt.encode("utf-8")
                self._salted = True
            elif parent is None or self._marked:
                ns = b""
            else:
                ns = live.get(parent, b"" if not self._salted else None)
                if ns is None or isinstance(ns, set):
                    # the parent's hash is live under several namespaces (a hash that ignores
                    # salts), or no longer live on a stream that carries salts, and nothing
                    # on the wire says which tenant this chain is: leave the blocks out (the
                    # router misses them) rather than count them for a tenant that may not
                    # hold them; their hashes are marked live under an unknown namespace
                    # (None), so the chain's later blocks are left out too
                    for h in hashes:
                        had = live.get(h)
                        if isinstance(had, set):
                            had.add(None)
                        elif had is not None:
                            live[h] = {had, None}
                        else:
                            live[h] = None
                    return []
            for h in hashes:
                had = live.setdefault(h, ns)
                if had != ns:
                    if isinstance(had, set):
                        had.add(ns)
                    else:
                        live[h] = {had, ns}
            self._block_size = block_size
            return [KVEvent(STORED, hashes, parent, tier, ns, len(hashes) * block_size,
                            token_ids=tokens)]
        # removed: each hash in the namespace the event names (its salt; none on a marked
        # stream: the shared one), else in those it was stored under (all of them when the
        # hash is live under several: the router misses rather than keeps a removed block)
        groups: dict[bytes, list[bytes]] = {}
        fixed = (salt.encode("utf-8") if salt is not None else b"" if self._marked else None)
        for h in hashes:
            had = live.get(h)
            if fixed is not None:
                if isinstance(had, set):
                    had.discard(fixed)
                    if len(had) == 1:
                        live[h] = next(iter(had))
                elif had == fixed:
                    del live[h]
                spaces = (fixed,)
            else:
                live.pop(h, None)
                spaces = ((b"",) if had is None else sorted(x for x in had if x is not None)
                          if isinstance(had, set) else (had,))
            for ns in spaces:
                groups.setdefault(ns, []).append(h)
        return [KVEvent(REMOVED, tuple(hs), None, tier, ns, len(hs) * self._block_size)
                for ns, hs in groups.items()]
