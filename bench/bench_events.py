"""vLLM's KV event wire format (prefixkv.paged.vllm_events): one engine step's batch of events
encoded and decoded, against what a user would otherwise write with msgspec and vLLM's structs.

The batch: 32 prefills of 2048 tokens (128 blocks of 16) stored in one step, so 32
``BlockStored`` events, 4096 int block hashes and 65536 token ids (a 400 KB payload).

- ``events-encode``: ``VllmEventEncoder.encode`` of the 32 ``KVEvent`` objects (packed by
  msgspec, installed with vLLM; msgpack's Packer otherwise), against building vLLM's msgspec
  structs from them (the int hash of each digest, the tokens) and ``msgspec.msgpack.encode``
  (baseline). The two payloads are checked equal first.
- ``events-decode``: ``VllmEventDecoder.decode`` (msgpack, checks of every field, the namespace
  of each block, ``KVEvent`` objects a Router applies), against ``msgspec.msgpack.decode`` of the
  payload into vLLM's structs (baseline: typed and checked, but no namespaces, no events).

extra_info: events/s, blocks/s and tokens/s, and the ratio to the baseline (time of baseline /
time of prefixkv; above 1 is faster).

Run: OMP_NUM_THREADS=1 .venv/bin/pytest bench/bench_events.py --benchmark-only
"""

from __future__ import annotations

import numpy as np
import pytest
from prefixkv.paged.events import KVEvent

from bench.conftest import seconds

msgspec = pytest.importorskip("msgspec")
pytest.importorskip("msgpack")

from prefixkv.paged.vllm_events import (  # noqa: E402
    VllmEventDecoder,
    VllmEventEncoder,
    external_hash,
)

from tests.vllm_wire import vllm_schema  # noqa: E402

NUM_EVENTS = 32
BLOCKS = 128
BLOCK_SIZE = 16

_times: dict = {}


@pytest.fixture(scope="module")
def events():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(NUM_EVENTS):
        hashes = tuple(rng.bytes(32) for _ in range(BLOCKS))
        toks = tuple(int(t) for t in rng.integers(0, 128_000, BLOCKS * BLOCK_SIZE))
        out.append(KVEvent("stored", hashes, None, "device", b"", BLOCKS * BLOCK_SIZE,
                           token_ids=toks))
    return out


def _msgspec_encode(batch_cls, stored_cls, events):
    return msgspec.msgpack.encode(batch_cls(ts=1.0, events=[
        stored_cls([external_hash(h) for h in e.block_hashes], None, list(e.token_ids),
                   BLOCK_SIZE, None, "GPU", None) for e in events]))


def _info(benchmark, name, group):
    t = seconds(benchmark, "min")
    _times[(group, name)] = t
    info = benchmark.extra_info
    info["events_per_s"] = NUM_EVENTS / t
    info["blocks_per_s"] = NUM_EVENTS * BLOCKS / t
    info["tokens_per_s"] = NUM_EVENTS * BLOCKS * BLOCK_SIZE / t
    if name == "msgspec-vllm-structs":
        info["baseline"] = True
    base = _times.get((group, "msgspec-vllm-structs"))
    if base is not None and name != "msgspec-vllm-structs":
        info["x_baseline"] = base / t


@pytest.mark.benchmark(group="events-encode")
@pytest.mark.parametrize("name", ["msgspec-vllm-structs", "prefixkv"])
def test_encode_step(benchmark, events, name):
    Batch, Stored, _, _ = vllm_schema(False)
    enc = VllmEventEncoder(BLOCK_SIZE)
    want = _msgspec_encode(Batch, Stored, events)
    if name == "prefixkv":
        assert enc.encode(events, ts=1.0) == want
        benchmark.pedantic(enc.encode, args=(events,), kwargs={"ts": 1.0}, rounds=30,
                           warmup_rounds=2)
    else:
        benchmark.pedantic(_msgspec_encode, args=(Batch, Stored, events), rounds=30,
                           warmup_rounds=2)
    _info(benchmark, name, "encode")


@pytest.mark.benchmark(group="events-decode")
@pytest.mark.parametrize("name", ["msgspec-vllm-structs", "prefixkv"])
def test_decode_step(benchmark, events, name):
    Batch, _, _, _ = vllm_schema(False)
    payload = VllmEventEncoder(BLOCK_SIZE).encode(events, ts=1.0)
    if name == "prefixkv":
        dec = VllmEventDecoder()
        got = dec.decode(payload).events
        assert [e.block_hashes for e in got] == [tuple(h[-8:] for h in e.block_hashes)
                                                 for e in events]
        assert [e.token_ids for e in got] == [e.token_ids for e in events]
        benchmark.pedantic(dec.decode, args=(payload,), rounds=30, warmup_rounds=2)
    else:
        assert len(msgspec.msgpack.decode(payload, type=Batch).events) == NUM_EVENTS
        benchmark.pedantic(msgspec.msgpack.decode, args=(payload,), kwargs={"type": Batch},
                           rounds=30, warmup_rounds=2)
    _info(benchmark, name, "decode")
