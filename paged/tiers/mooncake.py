"""Remote tier ("G4") on a Mooncake store: blocks as objects in a Mooncake master's pool of
memory segments, moved by the Mooncake transfer engine (TCP transport on a CPU machine).

Needs the ``mooncake`` package (``pip install mooncake-transfer-engine-non-cuda``, which loads
Debian ``libibverbs1`` even for TCP), imported when a ``MooncakeTier`` is made.

Layout: this client joins the store with no memory of its own (``global_segment_bytes=0`` by
default): the objects live in the segments other nodes mount (a ``mooncake_client`` storage
node, or engines that contribute memory), and every put/get crosses the transfer engine. A
registered staging buffer takes whole batches: ``batch_put`` encodes :func:`encode_record`
records (format version, full key, dtype, shape, checksum) into it and posts one
``batch_upsert_from`` (last write wins, as a Redis SET; ``overwrite=False`` posts
``batch_put_from``, which keeps an existing object and skips its transfer); ``batch_get``
posts one ``batch_get_into`` and verifies each record, so a
record stored under another key or namespace, or with a bad checksum, is a miss and is removed
(so the next put replaces it); one of another shape or dtype than the caller expects is a miss
and is kept. Object names are
``<prefix><namespace digest>/<hash hex>``: the salt is in every name.

Faults: a call never raises for a store fault. A master RPC failure turns the rest of the
batch into misses / ``False`` and marks the store down for ``retry_interval`` seconds; after
that a plain TCP connect to the master (``connect_timeout``) decides whether to try again, so
a dead master costs no more than that connect per interval (the Mooncake client itself waits
~4 s per call on a lost master). A storage node that dies is a per-key transfer failure (a
miss); the master keeps reporting its objects for ``client_ttl`` (10 s) until it notices, so
``batch_exists`` can overcount then - ``BlockOffloader`` fetches and verifies before it
registers anything, so that shortens a hit, never serves a wrong block.

Events: "stored" / "removed" / "cleared" for this client's own calls; the master's own
evictions and lease expiries are not observed (they show up as misses).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import math
import re
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from ..spec import numpy_dtype
from ..validate import check_int
from .base import (
    BlockKey,
    RecordError,
    Tier,
    UnexpectedLayout,
    check_checksum,
    check_get_layout,
    check_keys,
    check_put_values,
    check_seconds,
    decode_record,
    encode_record,
    first_occurrences,
)
from .base import header_size as record_header_size

#: The transfer engine's transports (``protocol``).
PROTOCOLS = ("tcp", "rdma")

#: Mooncake error codes the tier tells apart (mooncake-store ErrorCode).
OBJECT_NOT_FOUND = -704
TRANSFER_FAIL = -800
RPC_FAIL = -900  # the RPC errors are -900 .. -999 (RPC_TIMEOUT -901: a master that stalls)


def _rpc_fault(r) -> bool:
    """Whether a Mooncake return code is an RPC error (the master failed or timed out): -900
    alone was taken as one, so a stalled master's -901 cost each call the client's 30 s wait
    without marking the store down."""
    return -1000 < r <= RPC_FAIL


def _import_mooncake():
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise ImportError("MooncakeTier needs the 'mooncake' package: pip install "
                          "mooncake-transfer-engine-non-cuda (and Debian libibverbs1)") from e
    return MooncakeDistributedStore


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = str(addr).rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"master: expected 'host:port', got {addr!r}")
    return host, int(port)


class MooncakeTier(Tier):
    """Blocks in the Mooncake store whose master is ``master`` ("host:port").

    metadata_server: the transfer engine's metadata service ("http://host:port/metadata", e.g.
    the master's built-in one). local_hostname: this client's address for the transfer engine.
    protocol: "tcp" (or "rdma" with ``device_names``). global_segment_bytes: memory this client
    contributes to the pool (0: none, a pure client). staging_bytes: registered buffer one
    transfer batch goes through (a record larger than it is refused). local_buffer_bytes: the
    Mooncake client's own buffer (used by gets without an expected shape). prefix: object name
    prefix. retry_interval / connect_timeout: see the module docstring. checksum: "crc32" or
    "xxh3_128" (default: xxh3_128 when available). max_batch: keys per master RPC (an int
    >= 1). Every argument is checked before the client is imported (a TypeError / ValueError
    naming it: a bad size or protocol made a store that was down for good).
    overwrite: a put replaces an existing object (True: per-key ``True`` means this value is
    stored) or keeps it (False: cheaper re-offload of blocks already there; content-addressed
    keys make them equal, and a stale one is still never served, only missed).
    """

    name = "mooncake"

    def __init__(self, master: str = "127.0.0.1:50051",
                 metadata_server: str = "http://127.0.0.1:8080/metadata", *,
                 local_hostname: str = "127.0.0.1", protocol: str = "tcp",
                 device_names: str = "", global_segment_bytes: int = 0,
                 staging_bytes: int = 64 << 20, local_buffer_bytes: int = 16 << 20,
                 prefix: str = "prefixkv/", retry_interval: float = 1.0,
                 connect_timeout: float = 0.5, checksum: str | None = None,
                 max_batch: int = 256, overwrite: bool = True):
        super().__init__()
        self.checksum = check_checksum(checksum)
        self.max_batch = check_int("max_batch", max_batch, 1, " (keys per master RPC)")
        self.master = str(master)
        self._master_addr = _split_addr(self.master)
        self.metadata_server = str(metadata_server)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got "
                             f"{protocol!r}")
        self.local_hostname, self.protocol = str(local_hostname), protocol
        self.device_names = str(device_names)
        self.global_segment_bytes = check_int("global_segment_bytes", global_segment_bytes, 0)
        self.local_buffer_bytes = check_int("local_buffer_bytes", local_buffer_bytes, 0)
        staging_bytes = check_int("staging_bytes", staging_bytes, 1)
        self.staging = np.zeros(staging_bytes, dtype=np.uint8)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.retry_interval = check_seconds("retry_interval", retry_interval, zero_ok=True)
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self.overwrite = bool(overwrite)
        self._store_cls = _import_mooncake()  # the arguments checked first, by name
        self.store = None
        self._down_until = 0.0
        self._suspect = False  # a failure was seen: probe the master before the next call
        self._connect()

    # -- connection and fault handling ---------------------------------------------------------
    def _connect(self) -> bool:
        if not self._master_reachable():  # the client's own setup retries for ~90 s
            self._fail()
            return False
        store = self._store_cls()
        try:
            rc = store.setup(self.local_hostname, self.metadata_server,
                             self.global_segment_bytes, self.local_buffer_bytes, self.protocol,
                             self.device_names, self.master)
            if rc == 0:
                rc = store.register_buffer(int(self.staging.ctypes.data), self.staging.nbytes)
        except Exception:  # noqa: BLE001 - a store that cannot start is a down store
            rc = -1
        if rc != 0:
            with contextlib.suppress(Exception):  # best effort cleanup
                store.close()
            self._fail()
            return False
        self.store = store
        return True

    def _master_reachable(self) -> bool:
        try:
            with socket.create_connection(self._master_addr, timeout=self.connect_timeout):
                return True
        except OSError:
            return False

    @property
    def available(self) -> bool:
        """False while the store is marked down after a failure."""
        return time.monotonic() >= self._down_until

    def _usable(self) -> bool:
        if not self.available:
            return False
        if self._suspect:
            if not self._master_reachable():
                self._down_until = time.monotonic() + self.retry_interval
                return False
            self._suspect = False
        if self.store is None:
            return self._connect()
        return True

    def _fail(self) -> None:
        self.stats.errors += 1
        self._suspect = True
        self._down_until = time.monotonic() + self.retry_interval

    def _name(self, key: BlockKey) -> str:
        return self.prefix + key.storage_key()

    def _record_size(self, key: BlockKey, shape, dtype) -> int:
        dt = dtype if dtype is not None else key.namespace.dtype
        # Python ints: np.prod wrapped past int64 (shape (2**62, 3)), a negative size the
        # client refused with a TypeError, taken for a store fault
        nbytes = math.prod(int(d) for d in shape) * numpy_dtype(dt).itemsize
        return record_header_size(key, len(shape), dt) + nbytes

    # -- interface -----------------------------------------------------------------------------
    def batch_exists(self, keys):
        keys = list(check_keys(keys))
        if not keys or not self._usable():
            return 0
        n = 0
        for i in range(0, len(keys), self.max_batch):
            chunk = keys[i:i + self.max_batch]
            try:
                res = self.store.batch_is_exist([self._name(k) for k in chunk])
            except Exception:  # noqa: BLE001 - any client fault is a miss
                res = [RPC_FAIL]
            for r in res:
                if r != 1:
                    if r < 0:
                        self._fail()
                    return n
                n += 1
        return n

    def batch_get(self, keys, *, shape=None, dtype=None):
        keys = list(check_keys(keys))
        shape, dtype = check_get_layout(shape, dtype)
        out: list[np.ndarray | None] = [None] * len(keys)
        if keys and self._usable():
            if shape is None:
                self._get_unsized(keys, out, dtype)
            else:
                self._get_into(keys, out, shape, dtype)
        hits = sum(a is not None for a in out)
        self.stats.hits += hits
        self.stats.misses += len(keys) - hits
        return out

    def _verify(self, key, data, shape, dtype, out, i) -> None:
        try:
            arr = decode_record(key, data, shape=shape, dtype=dtype)
        except UnexpectedLayout as e:  # a good record the caller did not expect: keep it
            self._layout_miss(e)
            return
        except RecordError:
            self.stats.corrupt += 1
            with contextlib.suppress(Exception):  # drop it so the next put replaces it
                if self.store.remove(self._name(key), True) == 0:
                    self._publish("removed", [key])
            return
        arr = arr.copy()  # out of the staging buffer / client buffer
        arr.flags.writeable = False
        out[i] = arr
        self.stats.bytes_read += len(data)

    def _get_into(self, keys, out, shape, dtype) -> None:
        try:
            sizes = [self._record_size(k, shape, dtype) for k in keys]
        except TypeError:
            return  # an unknown dtype: nothing stored can match
        cap = self.staging.nbytes
        base = int(self.staging.ctypes.data)
        pos = 0
        while pos < len(keys):
            idx, offs, used = [], [], 0
            while (pos < len(keys) and len(idx) < self.max_batch
                   and (not idx or used + sizes[pos] <= cap)):
                if not 0 < sizes[pos] <= cap:  # never fits: a miss
                    pos += 1
                    continue
                idx.append(pos)
                offs.append(used)
                used += sizes[pos]
                pos += 1
            if not idx:
                continue
            try:
                res = self.store.batch_get_into([self._name(keys[i]) for i in idx],
                                                [base + o for o in offs],
                                                [sizes[i] for i in idx])
            except Exception:  # noqa: BLE001 - any client fault is a miss
                res = [RPC_FAIL] * len(idx)
            for i, o, r in zip(idx, offs, res, strict=True):
                if r > 0:
                    self._verify(keys[i], self.staging[o:o + r], shape, dtype, out, i)
                elif r == TRANSFER_FAIL:
                    self.stats.errors += 1
            if any(_rpc_fault(r) for r in res):
                self._fail()
                return

    def _get_unsized(self, keys, out, dtype) -> None:
        """``get_batch`` answers ``b""`` per key for a missing object and for a dead master
        alike (after the client's ~4 s RPC timeout, no error): ``batch_is_exist`` first (a
        dead master is -900 at once; only the objects it holds are fetched), and a fetch of
        held objects that comes back empty probes the master."""
        for c in range(0, len(keys), self.max_batch):
            chunk = keys[c:c + self.max_batch]
            try:
                held = self.store.batch_is_exist([self._name(k) for k in chunk])
            except Exception:  # noqa: BLE001 - any client fault is a miss
                held = [RPC_FAIL]
            if any(r < 0 for r in held):
                self._fail()
                return
            pos = [j for j, r in enumerate(held) if r == 1]
            if not pos:
                continue
            try:
                raw = self.store.get_batch([self._name(chunk[j]) for j in pos])
            except Exception:  # noqa: BLE001 - any client fault is a miss
                self._fail()
                return
            for j, data in zip(pos, raw, strict=True):
                if data:
                    self._verify(chunk[j], data, None, dtype, out, c + j)
            if not any(raw) and not self._master_reachable():
                self._fail()
                return

    def batch_put(self, keys, values):
        """Every value's dtype is checked against its key's namespace before anything is staged
        (ValueError, nothing stored). A key repeated in the batch is put once (the first value;
        posted twice in one batch, the store kept a second copy that no remove ever freed),
        and each of its positions reports that result. "stored" goes out once, after the
        bookkeeping, even when the store fails midway."""
        keys, values = check_put_values(keys, values)
        results = [False] * len(keys)
        todo, repeats = first_occurrences(keys)
        if not todo:
            return results
        if not self._usable():
            self.stats.rejected += len(todo)
            return results
        stored: list[BlockKey] = []
        try:
            self._put_staged(keys, values, todo, results, stored)
        finally:
            self._end_put(results, repeats, todo, stored)
        return results

    def _put_staged(self, keys, values, todo, results, stored) -> None:
        cap = self.staging.nbytes
        base = int(self.staging.ctypes.data)
        pos = 0
        while pos < len(todo):
            idx, offs, lens, used = [], [], [], 0
            while pos < len(todo) and len(idx) < self.max_batch:
                i = todo[pos]
                header, payload = encode_record(keys[i], values[i], checksum_alg=self.checksum)
                n = len(header) + payload.nbytes
                if n > cap:  # never fits
                    pos += 1
                    continue
                if used + n > cap:
                    break  # next batch
                self.staging[used:used + len(header)] = np.frombuffer(header, np.uint8)
                self.staging[used + len(header):used + n] = np.frombuffer(payload, np.uint8)
                idx.append(i)
                offs.append(used)
                lens.append(n)
                used += n
                pos += 1
            if not idx:
                continue
            put = self.store.batch_upsert_from if self.overwrite else self.store.batch_put_from
            try:
                res = put([self._name(keys[i]) for i in idx], [base + o for o in offs], lens)
            except Exception:  # noqa: BLE001 - any client fault is a failed put
                res = [RPC_FAIL] * len(idx)
            for i, n, r in zip(idx, lens, res, strict=True):
                if r == 0:
                    results[i] = True
                    stored.append(keys[i])
                    self.stats.puts += 1
                    self.stats.bytes_written += n
                elif r == TRANSFER_FAIL:
                    self.stats.errors += 1
            if any(_rpc_fault(r) for r in res):
                self._fail()
                return

    def batch_remove(self, keys):
        keys = list(check_keys(keys))
        if not keys or not self._usable():
            return 0
        try:
            res = self.store.batch_remove([self._name(k) for k in keys], True)
        except Exception:  # noqa: BLE001 - a fault removes nothing
            res = [RPC_FAIL]
        if any(_rpc_fault(r) for r in res):
            self._fail()
        gone = [k for k, r in zip(keys, res, strict=False) if r == 0]
        self._publish("removed", gone)
        return len(gone)

    def clear(self):
        """Remove every object under this tier's prefix, then publish "cleared". Tried even
        while the store is marked down (an operator's explicit request: skipped during the
        back-off, it was silently lost; RedisTier.clear tries too); a store still down or
        that fails (an error code, an RPC fault) is counted in ``errors`` and publishes
        nothing (objects may remain, so "cleared" would be untrue). A closed tier does
        nothing."""
        if self._down_until == float("inf"):  # closed
            return
        self._down_until = 0.0
        errors = self.stats.errors
        if not self._usable():  # the master probed (and a reconnect tried) at once
            if self.stats.errors == errors:  # a failed probe counts none of its own
                self.stats.errors += 1
            return
        try:
            rc = self.store.remove_by_regex("^" + re.escape(self.prefix), True)
        except Exception:  # noqa: BLE001 - best effort
            rc = RPC_FAIL
        if rc < 0:
            if _rpc_fault(rc):
                self._fail()
            else:
                self.stats.errors += 1
            return
        self._publish_cleared()

    def close(self):
        store, self.store = self.store, None
        if store is not None:
            with contextlib.suppress(Exception):  # best effort cleanup
                store.unregister_buffer(int(self.staging.ctypes.data))
            with contextlib.suppress(Exception):  # best effort cleanup
                store.close()
        self._down_until = float("inf")  # closed: every call is a miss


# --------------------------------------------------------------------------------------------
# A private store on 127.0.0.1 for tests and benchmarks.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mooncake_binary(name: str) -> Path | None:
    """Path of a binary shipped in the ``mooncake`` wheel (mooncake_master, mooncake_client),
    or None when the package is not installed."""
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = Path(d) / name
        if p.is_file():
            return p
    return None


class LocalMooncakeStore:
    """A private Mooncake store on 127.0.0.1 (free ports): ``mooncake_master`` with its built-in
    HTTP metadata server, plus one ``mooncake_client`` storage node mounting
    ``segment_bytes`` of memory (16 MiB at least: the storage node aborts on less).
    ``with LocalMooncakeStore() as st: MooncakeTier(st.master, st.metadata_server)``.

    ``kill_master()`` / ``kill_storage()`` SIGKILL one process (crash tests); ``stop()`` both.
    Raises FileNotFoundError when the binaries are absent (package not installed).
    """

    def __init__(self, segment_bytes: int = 256 << 20):
        master, client = mooncake_binary("mooncake_master"), mooncake_binary("mooncake_client")
        if master is None or client is None:
            raise FileNotFoundError("mooncake_master / mooncake_client not found (pip install "
                                    "mooncake-transfer-engine-non-cuda)")
        self.master_bin, self.client_bin = master, client
        self.segment_bytes = int(segment_bytes)
        self.rpc_port, self.http_port = _free_port(), _free_port()
        self.metrics_port, self.client_port = _free_port(), _free_port()
        self.master = f"127.0.0.1:{self.rpc_port}"
        self.metadata_server = f"http://127.0.0.1:{self.http_port}/metadata"
        self.master_proc = self.storage_proc = None

    @staticmethod
    def _spawn(args: list[str]):
        log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        proc.log = log  # its stderr, quoted when it dies at start
        return proc

    @staticmethod
    def _wait_port(proc, port: int, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = b""
                with contextlib.suppress(Exception):  # best effort diagnostics
                    proc.log.seek(0)
                    tail = proc.log.read()[-600:]
                raise RuntimeError(f"{what} exited with {proc.returncode} (port {port} taken?): "
                                   f"{tail.decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")

    def _metric(self, name: str) -> int:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=1) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return int(float(line.split()[1]))
        return 0

    def capacity(self) -> int:
        """Bytes the master has mounted (0 until the storage node has joined)."""
        return self._metric("master_total_capacity_bytes")

    def allocated_bytes(self) -> int:
        """Bytes the master has allocated to objects (leak checks: back to its value before a
        put once the put's objects are removed)."""
        return self._metric("master_allocated_bytes")

    def key_count(self) -> int:
        """Objects the master holds."""
        return self._metric("master_key_count")

    def start(self, timeout: float = 20.0) -> LocalMooncakeStore:
        deadline = time.monotonic() + timeout
        atexit.register(self.stop)  # no orphan servers when the caller dies without stop()
        try:
            if self.master_proc is None or self.master_proc.poll() is not None:
                self.master_proc = self._spawn(
                    [str(self.master_bin), f"--rpc_port={self.rpc_port}",
                     "--rpc_address=127.0.0.1", "--rpc_thread_num=2",
                     "--enable_http_metadata_server=true",
                     "--http_metadata_server_host=127.0.0.1",
                     f"--http_metadata_server_port={self.http_port}",
                     "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}"])
                for port in (self.rpc_port, self.http_port, self.metrics_port):
                    self._wait_port(self.master_proc, port, deadline, "mooncake_master")
            if self.storage_proc is None or self.storage_proc.poll() is not None:
                self.storage_proc = self._spawn(
                    [str(self.client_bin), "--host=127.0.0.1", f"--port={self.client_port}",
                     f"--global_segment_size={self.segment_bytes}", "--protocol=tcp",
                     f"--master_server_address={self.master}",
                     f"--metadata_server={self.metadata_server}"])
                self._wait_port(self.storage_proc, self.client_port, deadline,
                                "mooncake_client")
            while time.monotonic() < deadline:  # until the storage node's segment is mounted
                with contextlib.suppress(OSError, ValueError):
                    if self.capacity() > 0:
                        return self
                time.sleep(0.02)
            raise RuntimeError("mooncake storage node did not mount its segment")
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _kill(proc) -> None:
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            with contextlib.suppress(Exception):  # best effort cleanup
                proc.log.close()

    def kill_master(self) -> None:
        self._kill(self.master_proc)
        self.master_proc = None

    def kill_storage(self) -> None:
        self._kill(self.storage_proc)
        self.storage_proc = None

    def stop(self) -> None:
        self.kill_storage()
        self.kill_master()
        atexit.unregister(self.stop)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
