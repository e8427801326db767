"""Remote tier ("G4") on NIXL: blocks in a peer agent's registered memory, moved by one-sided
READ/WRITE transfers (UCX backend; DRAM-to-DRAM works on a CPU-only machine).

Needs the ``nixl`` package (``pip install --no-deps nixl nixl-cu12``: the plain install pulls
a CUDA torch), imported when a peer or tier is made.

- :class:`NixlPeer` is the memory side: an agent that registers a slab of ``num_slots`` slots of
  ``slot_bytes`` host memory and publishes :meth:`NixlPeer.descriptor` (agent metadata, slab
  address, slot geometry). It runs no code per transfer.
- :class:`NixlTier` is the client: its own agent, a registered staging buffer, the peer's
  metadata loaded, descriptor lists for staging and remote slots prepared once. It keeps the
  index of which slot holds which key (the peer's slab is this client's remote pool, as in a
  KVBM G4 / disaggregated prefill pool), LRU over slots. ``batch_put`` encodes records into
  staging and WRITEs them to free slots; ``batch_get`` READs slots back into staging and
  verifies each record (format version, key, dtype, shape, checksum): a slot overwritten or
  corrupted on the peer is a miss, never a wrong block, and its slot is freed (a re-put
  rewrites it). A transfer error or timeout is a miss / ``False``, never an exception; after
  ``close()`` every call is a miss / ``False`` / 0.

On a machine with the system libibverbs installed, set ``UCX_MODULES=^ib`` unless RDMA is
wanted: the UCX bundled with the nixl wheels then loads a second libnl-route, and the two clash
at process exit (SIGSEGV in ``rtnl_tc_unregister``; the tests and benchmarks set it).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from ..validate import check_int
from .base import (
    RecordError,
    Tier,
    UnexpectedLayout,
    UnreadableHere,
    check_checksum,
    check_get_layout,
    check_keys,
    check_put_values,
    check_seconds,
    decode_record,
    encode_record,
    first_occurrences,
)

_counter = itertools.count()


def _import_nixl():
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise ImportError("NixlTier needs the 'nixl' package: pip install --no-deps nixl "
                          "nixl-cu12 (nixl-cu13 on CUDA 13)") from e
    return nixl_agent, nixl_agent_config


def _agent(prefix: str, backend: str):
    nixl_agent, nixl_agent_config = _import_nixl()
    name = f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:8]}"
    # The progress thread lets a passive peer's UCX worker answer without Python calls.
    cfg = nixl_agent_config(enable_prog_thread=True, enable_listen_thread=False,
                            backends=[backend])
    agent = nixl_agent(name, cfg)
    if backend not in agent.backends:
        raise RuntimeError(f"NIXL backend {backend!r} unavailable; plugins: "
                           f"{agent.get_plugin_list()}")
    return name, agent


class NixlPeer:
    """Memory side of the NIXL tier: ``num_slots * slot_bytes`` registered host bytes."""

    def __init__(self, num_slots: int, slot_bytes: int, *, backend: str = "UCX"):
        self.num_slots = check_int("num_slots", num_slots, 1)
        self.slot_bytes = check_int("slot_bytes", slot_bytes, 1)
        self.name, self.agent = _agent("prefixkv-peer", backend)
        self.slab = np.zeros(self.num_slots * self.slot_bytes, dtype=np.uint8)
        self._reg = self.agent.register_memory(
            [(self.slab.ctypes.data, self.slab.nbytes, 0, "")], "DRAM")

    def descriptor(self) -> dict:
        """What a client needs (picklable: could cross a process boundary by any channel)."""
        if self.agent is None:
            raise RuntimeError("NixlPeer: closed (its agent and registered slab are released)")
        return {"name": self.name, "metadata": self.agent.get_agent_metadata(),
                "base": int(self.slab.ctypes.data), "num_slots": self.num_slots,
                "slot_bytes": self.slot_bytes}

    def slot(self, i: int) -> np.ndarray:
        """Raw bytes of slot ``i`` (tests corrupt them to check verification)."""
        return self.slab[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def close(self) -> None:
        """Deregister the slab and drop the agent: its UCX progress thread and sockets go
        with it (held until the peer was collected: a closed peer still referenced kept
        them for the life of the process)."""
        if self._reg is not None:
            with contextlib.suppress(Exception):  # best effort cleanup
                self.agent.deregister_memory(self._reg)
            self._reg = None
        self.agent = None


_DESCRIPTOR_KEYS = ("name", "metadata", "base", "num_slots", "slot_bytes")


def _descriptor(peer) -> dict:
    """A ``NixlPeer.descriptor()`` dict checked: its keys, and ``num_slots`` / ``slot_bytes``
    ints >= 1 (TypeError / ValueError naming ``peer``; a non-mapping, a missing key or zero
    slots failed later with errors naming nothing)."""
    if not isinstance(peer, Mapping):
        raise TypeError(f"peer: expected a NixlPeer or its descriptor() dict, got "
                        f"{type(peer).__name__}")
    missing = [k for k in _DESCRIPTOR_KEYS if k not in peer]
    if missing:
        raise ValueError(f"peer: a descriptor() dict has the keys {', '.join(_DESCRIPTOR_KEYS)}; "
                         f"missing {', '.join(missing)}")
    desc = dict(peer)
    for k in ("num_slots", "slot_bytes"):
        desc[k] = check_int(f"peer[{k!r}]", desc[k], 1)
    return desc


class NixlTier(Tier):
    """Client of a :class:`NixlPeer`'s slab.

    peer: a ``NixlPeer.descriptor()`` dict (or the peer object). staging_slots: blocks per
    transfer batch (an int >= 1: the registered staging buffer holds this many slots).
    timeout_s: bound on one transfer. checksum: "crc32" or "xxh3_128" (default: xxh3_128 when
    available). Both are checked before any agent is made (a ValueError naming them).
    """

    name = "nixl"
    _closed = False  # close() sets it: every later call is a miss / False / 0

    def __init__(self, peer, *, staging_slots: int = 32, timeout_s: float = 2.0,
                 backend: str = "UCX", checksum: str | None = None):
        super().__init__()
        self.staging_slots = check_int("staging_slots", staging_slots, 1,
                                       " (blocks per transfer)")
        self.checksum = check_checksum(checksum)
        desc = peer.descriptor() if isinstance(peer, NixlPeer) else _descriptor(peer)
        self.peer_name = desc["name"]
        self.num_slots, self.slot_bytes = desc["num_slots"], desc["slot_bytes"]
        self.timeout_s = check_seconds("timeout_s", timeout_s)
        self.agent_name, self.agent = _agent("prefixkv-tier", backend)
        self.staging = np.zeros((self.staging_slots, self.slot_bytes), dtype=np.uint8)
        self._reg = self.agent.register_memory(
            [(self.staging.ctypes.data, self.staging.nbytes, 0, "")], "DRAM")
        remote = self.agent.add_remote_agent(desc["metadata"])
        if isinstance(remote, bytes):
            remote = remote.decode()
        self._remote = remote
        sb, base, stage = self.slot_bytes, int(desc["base"]), int(self.staging.ctypes.data)
        local = np.array([(stage + i * sb, sb, 0) for i in range(self.staging_slots)],
                         dtype=np.uint64)
        far = np.array([(base + i * sb, sb, 0) for i in range(self.num_slots)], dtype=np.uint64)
        self._local_h = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", local, "DRAM")
        self._remote_h = self.agent.prep_xfer_dlist(self._remote, far, "DRAM")
        self._index: OrderedDict[str, tuple] = OrderedDict()  # storage key -> (key, slot, len)
        self._free = list(range(self.num_slots - 1, -1, -1))

    # -- transfers -----------------------------------------------------------------------------
    def _transfer(self, op: str, slots: list[int]) -> bool:
        """Move staging rows [0, len(slots)) <-> remote ``slots``; True when done."""
        handle = None
        try:
            handle = self.agent.make_prepped_xfer(op, self._local_h, list(range(len(slots))),
                                                  self._remote_h, [int(s) for s in slots])
            state = self.agent.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            while state == "PROC":
                if time.monotonic() > deadline:
                    self.stats.errors += 1
                    return False
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                self.stats.errors += 1
                return False
            return True
        except Exception:  # noqa: BLE001 - any transport fault is a miss
            self.stats.errors += 1
            return False
        finally:
            if handle is not None:
                with contextlib.suppress(Exception):  # best effort cleanup
                    self.agent.release_xfer_handle(handle)

    def _lookup(self, key):
        e = self._index.get(key.storage_key())
        return None if e is None or e[0] != key else e

    # -- interface -----------------------------------------------------------------------------
    def batch_exists(self, keys):
        n = 0
        keys = check_keys(keys)
        if self._closed:
            return 0
        for k in keys:
            if self._lookup(k) is None:
                break
            n += 1
        return n

    def batch_get(self, keys, *, shape=None, dtype=None):
        keys = check_keys(keys)
        shape, dtype = check_get_layout(shape, dtype)
        out: list[np.ndarray | None] = [None] * len(keys)
        found = ([] if self._closed else
                 [(i, e) for i, k in enumerate(keys) if (e := self._lookup(k)) is not None])
        for c in range(0, len(found), self.staging_slots):
            chunk = found[c:c + self.staging_slots]
            if not self._transfer("READ", [e[1] for _, e in chunk]):
                continue
            for j, (i, (key, _slot, length)) in enumerate(chunk):
                try:
                    arr = decode_record(key, self.staging[j, :length], shape=shape, dtype=dtype)
                except UnreadableHere:
                    # another version or checksum algorithm in a slot this tier wrote itself:
                    # its bytes changed (a shared store keeps such records, a slot is ours)
                    self.stats.corrupt += 1
                    self._drop(key, (key, _slot, length))
                    continue
                except UnexpectedLayout as e:  # a good record the caller did not expect: kept
                    self._layout_miss(e)
                    continue
                except RecordError:  # corrupt or overwritten: drop it so a re-put rewrites it
                    self.stats.corrupt += 1
                    self._drop(key, (key, _slot, length))
                    continue
                arr = arr.copy()  # staging is reused by the next transfer
                arr.flags.writeable = False  # read-only, as Tier.batch_get promises
                out[i] = arr
                self._index.move_to_end(key.storage_key())
                self.stats.bytes_read += length
        hits = sum(a is not None for a in out)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        return out

    def _drop(self, key, entry) -> None:
        """Forget ``key``'s slot (a record that failed verification), once: a key repeated in
        one get reads the same slot twice."""
        sk = key.storage_key()
        if self._index.get(sk) == entry:
            del self._index[sk]
            self._free.append(entry[1])
            self._publish("removed", [key])

    def _take_slot(self, protect: set[str]) -> int | None:
        """A free slot, else the least recently used entry's, else None. The entries a put
        protects (its own, and the ones it found stored: moved to the end) are the newest, so
        the oldest entry is protected only when all are: no scan of the index per block."""
        if self._free:
            return self._free.pop()
        sk = next(iter(self._index), None)
        if sk is None or sk in protect:
            return None
        key, slot, _ = self._index.pop(sk)
        self.stats.evictions += 1
        self._publish("evicted", [key])
        return slot

    def batch_put(self, keys, values):
        """Every value's dtype is checked against its key's namespace before anything is
        stored. A key repeated in the batch is written once (one slot); each of its positions
        reports that result."""
        keys, values = check_put_values(keys, values)
        results = [False] * len(keys)
        if self._closed:
            self.stats.rejected += len(first_occurrences(keys)[0])
            return results
        protect: set[str] = set()
        firsts, repeats = first_occurrences(keys)
        todo = []  # positions to write: first occurrences of keys not stored yet
        for i in firsts:
            k = keys[i]
            if self._lookup(k) is not None:  # content-addressed: already there
                sk = k.storage_key()
                self._index.move_to_end(sk)
                protect.add(sk)
                results[i] = True
            else:
                todo.append(i)
        for c in range(0, len(todo), self.staging_slots):
            chunk, slots, lens = [], [], []
            for i in todo[c:c + self.staging_slots]:
                header, payload = encode_record(keys[i], values[i], checksum_alg=self.checksum)
                n = len(header) + payload.nbytes
                if n > self.slot_bytes:
                    self.stats.rejected += 1
                    continue
                sk = keys[i].storage_key()
                # a stale entry under this name gives its slot back
                slot = (self._index.pop(sk)[1] if sk in self._index
                        else self._take_slot(protect))
                if slot is None:
                    self.stats.rejected += 1
                    continue
                row = self.staging[len(chunk)]
                row[:len(header)] = np.frombuffer(header, dtype=np.uint8)
                row[len(header):n] = np.frombuffer(payload, dtype=np.uint8)
                chunk.append(i)
                slots.append(slot)
                lens.append(n)
                protect.add(sk)
            if not chunk:
                continue
            if self._transfer("WRITE", slots):
                self._publish("stored", [keys[i] for i in chunk])
                for i, slot, n in zip(chunk, slots, lens, strict=False):
                    self._index[keys[i].storage_key()] = (keys[i], slot, n)
                    results[i] = True
                    self.stats.puts += 1
                    self.stats.bytes_written += n
            else:
                self._free.extend(slots)
                self.stats.rejected += len(chunk)
        for i, j in repeats:
            results[i] = results[j]
        return results

    def batch_remove(self, keys):
        removed = []
        keys = check_keys(keys)
        if self._closed:
            return 0
        for k in keys:
            if self._lookup(k) is not None:
                self._free.append(self._index.pop(k.storage_key())[1])
                removed.append(k)
        self._publish("removed", removed)
        return len(removed)

    def clear(self):
        if self._closed:
            return
        self._publish_cleared()
        self._index.clear()
        self._free = list(range(self.num_slots - 1, -1, -1))

    def close(self):
        """Release the agent's handles and registrations, then the agent itself (its UCX
        progress thread and sockets: a closed tier still referenced, e.g. by a closed
        TieredStore, kept them for the life of the process). The index goes too (the slots
        are out of reach): every later call is a miss / ``False`` / 0, and a "cleared" event
        tells subscribers (an index of where blocks live) when it held any block."""
        if getattr(self, "agent", None) is None:  # closed already (or never made)
            self._closed = True
            return
        held = not self._closed and bool(getattr(self, "_index", None))
        self._closed = True
        if held:
            self._index.clear()
        self._free = []
        for h in (getattr(self, "_local_h", None), getattr(self, "_remote_h", None)):
            if h is not None:
                with contextlib.suppress(Exception):  # best effort cleanup
                    self.agent.release_dlist_handle(h)
        self._local_h = self._remote_h = None
        if getattr(self, "_reg", None) is not None:
            with contextlib.suppress(Exception):  # best effort cleanup
                self.agent.deregister_memory(self._reg)
            self._reg = None
        with contextlib.suppress(Exception):  # best effort cleanup
            self.agent.remove_remote_agent(self._remote)
        self.agent = None
        if held:  # last: a subscriber that raises leaves nothing unreleased
            self._publish_cleared()
