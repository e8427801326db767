"""vLLM's KV event wire format (prefixkv.paged.vllm_events) against msgspec structs laid out as
vLLM's ``vllm/distributed/kv_events.py`` declares them (the map wire of current releases and
the array wire of releases with ``array_like`` structs), and end to end: a PrefixCache publishing
vLLM events that a Router fed by the decoder routes on, and the frames over a ZMQ PUB/SUB pair
on 127.0.0.1."""

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prefixkv.paged import PrefixCache, Router
from prefixkv.paged.events import KVEvent
from prefixkv.paged.hashing import hash_blocks
from prefixkv.paged.pool import NoFreeBlocksError
from prefixkv.paged.vllm_events import (
    VllmEventDecoder,
    VllmEventEncoder,
    decode_frames,
    encode_frames,
    external_hash,
    vllm_hash_fn,
)
from vllm_wire import vllm_schema as _schema

msgpack = pytest.importorskip("msgpack")
msgspec = pytest.importorskip("msgspec")

H = [bytes([i]) * 24 + i.to_bytes(8, "big") for i in range(1, 9)]  # 32-byte digests


def _stored(hashes, parent=None, ns=b"", tier="device", bs=4):
    toks = tuple(range(100, 100 + len(hashes) * bs))
    return KVEvent("stored", tuple(hashes), parent, tier, ns, len(hashes) * bs, token_ids=toks)


@pytest.mark.parametrize("packer", ["msgspec", "msgpack"])
@pytest.mark.parametrize("wire", ["map", "array"])
@pytest.mark.parametrize("int_hashes", [True, False])
def test_encoder_bytes_equal_vllms_own_encoding(wire, int_hashes, packer, monkeypatch):
    """Unsalted events encode to exactly the bytes msgspec gives vLLM's structs: a consumer of
    vLLM's stream cannot tell the publisher apart. The encoder packs with msgspec where it is
    installed, else with msgpack's Packer: the same bytes."""
    if packer == "msgpack":
        from prefixkv.paged import vllm_events

        monkeypatch.setattr(vllm_events, "_msgspec", lambda: None)
    Batch, Stored, Removed, Cleared = _schema(wire == "array")
    x = external_hash if int_hashes else bytes
    evs = [_stored(H[:2]), _stored(H[2:3], parent=H[1], tier="host"),
           KVEvent("evicted", (H[0],), None, "device", b"", 4),
           KVEvent("removed", (H[2],), None, "host", b"", 4),
           KVEvent("cleared", (), None, "device", b"", 0)]
    want = Batch(ts=12.5, events=[
        Stored([x(H[0]), x(H[1])], None, list(range(100, 108)), 4, None, "GPU", None),
        Stored([x(H[2])], x(H[1]), list(range(100, 104)), 4, None, "CPU", None),
        Removed([x(H[0])], "GPU"), Removed([x(H[2])], "CPU"), Cleared()],
        data_parallel_rank=3)
    enc = VllmEventEncoder(4, wire=wire, int_hashes=int_hashes, data_parallel_rank=3)
    assert enc.encode(evs, ts=12.5) == msgspec.msgpack.encode(want)
    want.data_parallel_rank = None
    got = VllmEventEncoder(4, wire=wire, int_hashes=int_hashes).encode(evs, ts=12.5)
    assert got == msgspec.msgpack.encode(want)


@pytest.mark.parametrize("packer", ["msgspec", "msgpack"])
def test_numpy_token_ids_encode_as_ints(packer, monkeypatch):
    if packer == "msgpack":
        from prefixkv.paged import vllm_events

        monkeypatch.setattr(vllm_events, "_msgspec", lambda: None)
    toks = np.arange(8, dtype=np.int32)
    evs = [KVEvent("stored", tuple(H[:2]), None, "device", b"", 8, token_ids=toks),
           KVEvent("stored", (H[2],), H[1], "device", b"", 4, token_ids=tuple(toks[:4]))]
    raw = msgpack.unpackb(VllmEventEncoder(4).encode(evs, ts=0.0))
    assert [e["token_ids"] for e in raw["events"]] == [list(range(8)), list(range(4))]
    bad = KVEvent("stored", (H[0],), None, "device", b"", 4, token_ids=np.zeros(4))
    with pytest.raises(TypeError, match="event.token_ids: expected integers"):
        VllmEventEncoder(4).encode([bad])


def test_int_hashes_are_vllms_low_64_bits():
    d = bytes(range(32))
    assert external_hash(d) == int.from_bytes(d, "big") & ((1 << 64) - 1)
    assert external_hash(d) == int.from_bytes(d[-8:], "big")


@pytest.mark.parametrize("wire", ["map", "array"])
def test_salted_events_keep_their_namespace_on_the_wire(wire):
    """A salted chain start carries vLLM's ("cache_salt", salt) extra key on its first block;
    the map wire adds a top-level cache_salt on every salted event; vLLM's own decoder reads
    the payload (unknown keys skipped)."""
    Batch, Stored, Removed, _ = _schema(wire == "array")
    evs = [_stored(H[:2], ns=b"tenant-a"), _stored(H[2:3], parent=H[1], ns=b"tenant-a"),
           KVEvent("removed", (H[2],), None, "device", b"tenant-a", 4)]
    payload = VllmEventEncoder(4, wire=wire).encode(evs, ts=1.0)
    batch = msgspec.msgpack.decode(payload, type=Batch)
    first, cont, rem = batch.events
    assert first.extra_keys == [(["cache_salt", "tenant-a"],), None]
    assert cont.extra_keys is None and cont.parent_block_hash == external_hash(H[1])
    assert rem.block_hashes == [external_hash(H[2])]
    raw = msgpack.unpackb(payload)
    if wire == "map":
        assert [e.get("cache_salt") for e in raw["events"]] == ["tenant-a"] * 3
    dec = VllmEventDecoder().decode(payload)
    assert [(e.kind, e.namespace) for e in dec.events] == [
        ("stored", b"tenant-a"), ("stored", b"tenant-a"), ("removed", b"tenant-a")]


def test_encoder_refuses_and_skips():
    enc = VllmEventEncoder(4)
    with pytest.raises(ValueError, match="namespace.*not UTF-8"):
        enc(_stored(H[:1], ns=b"\xff\xfe"))
    with pytest.raises(ValueError, match="kind: expected one of"):  # no such event is made
        enc(KVEvent("moved", (), None, "device", b"", 0))
    with pytest.raises(TypeError, match="event: expected a KVEvent"):
        enc.encode([("stored", H[:1])])
    with pytest.raises(ValueError, match="wire"):
        VllmEventEncoder(4, wire="json")
    with pytest.raises(ValueError, match="block_size"):
        VllmEventEncoder(0)
    assert enc.take() is None  # the refused events were not kept
    # another tier's "cleared" is not vLLM's AllBlocksCleared (the GPU cache's)
    enc(KVEvent("cleared", (), None, "disk", b"", 0))
    assert enc.take() is None
    enc(KVEvent("cleared", (), None, "device", b"", 0))
    assert msgpack.unpackb(enc.take(ts=2.0)) == {"ts": 2.0,
                                                 "events": [{"type": "AllBlocksCleared"}]}
    assert enc.take() is None


@pytest.mark.parametrize("wire", ["map", "array"])
def test_decoder_reads_vllm_payloads(wire):
    """Payloads msgspec makes of vLLM's structs: int (signed and unsigned) and bytes hashes,
    the salt from block 0's extra key passed down the parent chain, removals grouped by the
    namespace each hash was stored under, other KV-cache groups skipped, medium -> tier."""
    Batch, Stored, Removed, Cleared = _schema(wire == "array")
    u = [external_hash(h) for h in H]
    signed = u[3] - (1 << 64) if u[3] >= 1 << 63 else u[3]
    batch = Batch(ts=5.0, events=[
        Stored(u[:2], None, list(range(8)), 4, None, "GPU", None,
               extra_keys=[(("cache_salt", "t1"),), None], group_idx=0),
        Stored([signed], u[1], list(range(8, 12)), 4, None, "GPU", None, group_idx=0),
        Stored([H[4]], None, list(range(4)), 4, None, "GPU", "lora-x"),  # bytes hash, no salt
        Stored(u[5:6], None, list(range(4)), 4, None, "GPU", None, group_idx=1),  # other group
        Stored(u[6:7], None, list(range(4)), 4, None, "CPU", None),
        Removed([u[0], H[4], u[3]], "GPU"),
        Cleared()], data_parallel_rank=1)
    got = VllmEventDecoder().decode(msgspec.msgpack.encode(batch))
    assert got.ts == 5.0 and got.data_parallel_rank == 1
    e = got.events
    assert [(x.kind, x.tier, x.namespace) for x in e] == [
        ("stored", "device", b"t1"), ("stored", "device", b"t1"), ("stored", "device", b""),
        ("stored", "host", b""), ("removed", "device", b"t1"), ("removed", "device", b""),
        ("cleared", "device", b"")]
    assert e[0].block_hashes == (H[0][-8:], H[1][-8:]) and e[0].num_tokens == 8
    assert e[1].block_hashes == (H[3][-8:],) and e[1].parent_hash == H[1][-8:]
    assert e[1].token_ids == tuple(range(8, 12))
    assert e[2].block_hashes == (H[4],)
    assert e[4].block_hashes == (H[0][-8:], H[3][-8:]) and e[5].block_hashes == (H[4],)
    assert e[4].num_tokens == 8


def test_decoder_reads_older_and_eagle_payloads():
    """An array payload of a release without lora_name/extra_keys, and EAGLE's bigram
    token_ids (pairs (t_i, t_i+1)), as vLLM publishes them with speculative decoding."""
    payload = msgpack.packb([1.5, [["BlockStored", [7, 8], None, [[1, 2], [2, 3], [3, 4],
                                                                   [4, 5]], 2, None]]])
    (ev,) = VllmEventDecoder().decode(payload).events
    assert ev.token_ids == (1, 2, 3, 4, 5) and ev.block_hashes == ((7).to_bytes(8, "big"),
                                                                   (8).to_bytes(8, "big"))


@pytest.mark.parametrize("payload, match", [
    (b"\xc1", "not msgpack"),
    (msgpack.packb([1.0]), "expected a KVEventBatch"),
    (msgpack.packb({"ts": "x", "events": []}), "ts must be a number"),
    (msgpack.packb({"ts": 1.0, "events": 3}), "events must be an array"),
    (msgpack.packb([1.0, [["Moved", []]]]), r"events\[0\]: unknown event type"),
    (msgpack.packb([1.0, [5]]), r"events\[0\]: expected a tagged map or array"),
    (msgpack.packb([1.0, [["BlockRemoved", [1.5], None]]]), r"events\[0\].block_hashes"),
    (msgpack.packb([1.0, [["BlockRemoved", [True], None]]]), r"events\[0\].block_hashes"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2], 0, None]]]),
     r"events\[0\].block_size"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, ["a", 2], 2, None]]]),
     r"events\[0\].token_ids"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2.0], 2, None]]]),
     r"events\[0\].token_ids"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, [1, None], 2, None]]]),
     r"events\[0\].token_ids"),
    (msgpack.packb({"ts": 1.0, "events": [{"type": "BlockRemoved", "block_hashes": [1],
                                           "medium": None, "cache_salt": 5}]}),
     r"events\[0\].cache_salt"),
    # a wrong type anywhere is a ValueError naming the field too, never a TypeError
    (msgpack.packb([1.0, [[{"a": 1}, [1], None]]]), r"events\[0\]: expected an event type"),
    (msgpack.packb([1.0, [["BlockRemoved", [1], {"a": 1}]]]), r"events\[0\].medium"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2], 2, None, None, None, 7]]]),
     r"events\[0\].extra_keys: expected an array"),
    (msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2], 2, None, None, None, [7]]]]),
     r"events\[0\].extra_keys\[0\]: expected an array of keys"),
])
def test_decoder_names_what_is_malformed_and_keeps_its_state(payload, match):
    dec = VllmEventDecoder()
    good = msgpack.packb([1.0, [["BlockStored", [9], None, [1, 2], 2, None, "GPU", None,
                                 [[["cache_salt", "s"]]]]]])
    dec.decode(good)
    with pytest.raises(ValueError, match=match):
        dec.decode(payload)
    # the good event's namespace is still known: a continuation inherits it
    (ev,) = dec.decode(msgpack.packb([2.0, [["BlockStored", [10], 9, [3, 4], 2, None]]])).events
    assert ev.namespace == b"s"


def test_a_bad_event_applies_none_of_its_batch():
    dec = VllmEventDecoder()
    bad = msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2], 2, None, None, None,
                                [[["cache_salt", "s"]]]], ["Nope"]]])
    with pytest.raises(ValueError, match="unknown event type"):
        dec.decode(bad)
    (ev,) = dec.decode(msgpack.packb([2.0, [["BlockStored", [2], 1, [3, 4], 2, None]]])).events
    assert ev.namespace == b""  # block 1 was never applied


def test_cleared_goes_to_the_tier_the_gpu_maps_to():
    """AllBlocksCleared empties the tier "GPU" maps to under custom ``tiers``, not "device"."""
    dec = VllmEventDecoder(tiers={"GPU": "gpu", "CPU": "cpu"})
    router = Router(2, tiers=("gpu",),
                    hash_fn=lambda t, bs, salt=None, parent=None: [(1).to_bytes(8, "big")])
    router.add_worker("w")
    for ev in dec.decode(msgpack.packb([1.0, [["BlockStored", [1], None, [1, 2], 2, None,
                                                "GPU", None]]])).events:
        router.apply("w", ev)
    assert dec.gpu_tier == "gpu" and router.overlaps([5, 6, 7]) == {"w": 1}
    (ev,) = dec.decode(msgpack.packb([2.0, [["AllBlocksCleared"]]])).events
    assert (ev.kind, ev.tier) == ("cleared", "gpu")
    router.apply("w", ev)
    assert router.overlaps([5, 6, 7]) == {"w": 0} and dec.seen_tiers == ()


def test_decoder_and_encoder_arguments_are_checked():
    with pytest.raises(TypeError, match="group_idx: expected an int"):
        VllmEventDecoder(group_idx="0")  # would have dropped every group-0 event
    with pytest.raises(TypeError, match="tiers: expected a mapping"):
        VllmEventDecoder(tiers={"GPU": 1})
    enc = VllmEventEncoder(2)
    enc(KVEvent("stored", (H[0],), None, "device", b"", 2, token_ids=(1, 2)))
    with pytest.raises(TypeError, match="event.token_ids: expected integers"):
        enc(KVEvent("stored", (H[1],), None, "device", b"", 2, token_ids=(1.0, 2.0)))
    with pytest.raises(TypeError, match="event.token_ids: expected integers"):
        enc(KVEvent("stored", (H[1],), None, "device", b"", 2,
                    token_ids=(np.float32(1), np.float32(2))))
    with pytest.raises(TypeError, match="ts: expected a number"):
        enc.take(ts="now")
    # the refused calls lost nothing: the good event is still there, alone
    (ev,) = msgpack.unpackb(enc.take(ts=1.0))["events"]
    assert ev["token_ids"] == [1, 2]
    assert enc.take() is None


def _saltless(tokens, block_size, *, salt=None, parent=None):
    return hash_blocks(np.asarray(tokens, np.int32), block_size, parent=parent,
                       algo="sglang-sha256")


@pytest.mark.parametrize("wire", ["map", "array"])
def test_a_hash_that_ignores_salts_never_crosses_namespaces_on_the_wire(wire):
    """With a hash that ignores salts, one hash is live under two namespaces. The map wire
    marks every salted event, so a router fed through it holds what the direct one does; the
    array wire cannot tell whose a continuation of such a hash is, so the decoder leaves it
    out: the router misses it, never counts it for the other tenant."""
    bs = 4
    pc = PrefixCache(num_blocks=32, block_size=bs, hash_fn=_saltless)
    direct = Router(bs, hash_fn=_saltless)
    direct.add_worker("w", pc.events)
    enc, dec = VllmEventEncoder(bs, wire=wire, int_hashes=False), VllmEventDecoder()
    pc.events.subscribe(enc)
    wired = Router(bs, hash_fn=_saltless)
    wired.add_worker("w")

    def run(rid, toks, salt):
        done = pc.add_request(rid, toks, salt=salt)
        pc.step([(rid, len(toks) - done)])
        for ev in dec.decode(enc.take(ts=0.0)).events:
            wired.apply("w", ev)

    head, tail = list(range(4)), list(range(50, 54))
    run("u0", head + [99], None)  # block H0 in the shared namespace
    run("t0", head + [99], "t")  # the same H0 under tenant t
    run("u1", head + tail + [99], None)  # the shared chain goes on: H1, parent H0
    q = head + tail + [99]
    assert direct.pick(q, salt="t").overlaps == {"w": 1}
    assert wired.pick(q, salt="t").overlaps == {"w": 1}  # never 2: H1 is not tenant t's
    assert wired.pick(q).overlaps == ({"w": 2} if wire == "map" else {"w": 1})
    # the shared H0 removed: the map wire says whose; the array wire's removal goes to every
    # namespace the hash is live under (a miss for tenant t, never a stale hit)
    h0 = _saltless(head, bs)[0]
    removed = dec.decode(enc.encode([KVEvent("removed", (h0,), None, "device", b"", bs)]))
    assert sorted(e.namespace for e in removed.events) == (
        [b""] if wire == "map" else [b"", b"t"])
    assert all(e.block_hashes == (h0,) for e in removed.events)
    for ev in removed.events:
        wired.apply("w", ev)
    assert wired.pick(q, salt="t").overlaps == {"w": 0 if wire == "array" else 1}


def test_a_chain_left_out_on_the_array_wire_stays_out():
    """The array wire, a hash that ignores salts: tenant "b" stores blocks A, B, C that the
    shared namespace holds as A, B (same hashes). b's A is marked (the chain's first block);
    its B is left out (A is live under two namespaces); its C, whose parent B the decoder
    knew only as the shared namespace's, had been counted for the shared namespace, which
    never held it (a fuzzer's find). A left-out store marks its hashes of an unknown
    namespace, so the chain's later blocks stay out too, and a removal still reaches the
    known ones."""
    bs = 2
    pc = PrefixCache(num_blocks=32, block_size=bs, hash_fn=_saltless)
    enc, dec = VllmEventEncoder(bs, wire="array", int_hashes=False), VllmEventDecoder()
    pc.events.subscribe(enc)
    router = Router(bs, hash_fn=_saltless)
    router.add_worker("w")

    def pump():
        payload = enc.take()
        if payload is not None:
            for ev in dec.decode(payload).events:
                router.apply("w", ev)

    pc.add_request("x", [1, 2, 3, 4, 5])  # the shared namespace: A = [1, 2], B = [3, 4]
    pc.step([("x", 5)])
    pump()
    pc.add_request("y", [1, 2, 3, 4, 5, 6, 7], salt="b")  # tenant b: A, B, then C = [5, 6]
    for _ in range(3):
        pc.step([("y", 2)])
        pump()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    truth = {ns: set(hs) for ns, hs in pc.pool.cached_hashes().items()}
    seen = router.cached_hashes("w")
    assert all(seen[ns] <= truth.get(ns, set()) for ns in seen)  # never a block not held
    assert router.pick(prompt).overlaps["w"] == len(pc.match(prompt)[0]) == 2
    # the shared B removed (nothing on the wire says whose): every known namespace misses it
    b_hash = _saltless([1, 2, 3, 4], bs)[1]
    removed = dec.decode(enc.encode([KVEvent("removed", (b_hash,), None, "device", b"", bs)]))
    assert [(e.namespace, e.block_hashes) for e in removed.events] == [(b"", (b_hash,))]


def test_a_continuation_of_a_removed_parent_is_left_out_on_a_salted_array_stream():
    """The array wire carries a salt on a chain's first block only. Once the stream has
    carried salts, a continuation whose parent is no longer live may be any tenant's: the
    decoder leaves it out. It had put it in the shared namespace, so with a hash that ignores
    salts the router counted tenant "a"'s block for tenant "" (found by a fuzzer). A stream
    that never carried a salt keeps such continuations in the shared namespace."""
    bs = 2
    for salted in (True, False):
        pc = PrefixCache(num_blocks=6, block_size=bs, hash_fn=_saltless)
        enc, dec = VllmEventEncoder(bs, wire="array", int_hashes=False), VllmEventDecoder()
        pc.events.subscribe(enc)
        router = Router(bs, hash_fn=_saltless)
        router.add_worker("w")

        def pump(enc=enc, dec=dec, router=router):
            payload = enc.take()
            if payload is not None:
                for ev in dec.decode(payload).events:
                    router.apply("w", ev)

        salt = "a" if salted else None
        pc.add_request("r1", [1, 2, 9], salt=salt)
        pc.add_request("r2", [1, 2, 9], salt=salt)  # a duplicate of r1's block, unregistered
        pc.step([("r1", 3), ("r2", 3)])
        pump()
        pc.free("r1")
        pc.add_request("x", [7, 7, 7, 7, 7], salt=salt)  # evicts r1's block: its hash removed
        pc.step([("x", 5)])
        pump()
        pc.free("x")
        pc.append_tokens("r2", [5, 6])  # r2's next block: stored with the removed parent
        pc.step([("r2", 2)])
        pump()
        q = [1, 2, 9, 5, 6]
        if salted:
            pc.add_request("s", [1, 2, 3])  # the first block again, for tenant ""
            pc.step([("s", 3)])
            pump()
            assert len(pc.match(q)[0]) == 1
            assert router.overlaps(q)["w"] == 1  # never 2: the continuation is tenant a's
        else:
            assert router.overlaps(q)["w"] == 0  # the parent is gone: no chain to count
            assert _saltless(q, bs)[1] in router.cached_hashes("w")[b""]


def test_frames():
    frames = encode_frames(7, b"payload", topic="kv")
    assert frames == (b"kv", (7).to_bytes(8, "big"), b"payload")
    assert decode_frames(frames) == (7, b"payload")
    with pytest.raises(ValueError, match="seq"):
        encode_frames(-1, b"")
    with pytest.raises(ValueError, match="frames"):
        decode_frames([b"", b"\0"])
    # a number with its top bit set (garbage: publishers count from 0 up) is refused, not
    # read as a negative number (a subscriber asked a replay from it and raised)
    with pytest.raises(ValueError, match=r"frames: expected a sequence number in \[0, 2\*\*63\)"):
        decode_frames([b"", b"\xff" * 8, b"payload"])
    assert decode_frames([b"", (2**63 - 1).to_bytes(8, "big"), b""]) == (2**63 - 1, b"")


def _prompt(n, base=0):
    return list(range(base, base + n))


@pytest.mark.parametrize("wire", ["map", "array"])
def test_router_routes_over_vllm_events_end_to_end(wire):
    """Two workers hash with vLLM's sha256_cbor (a PrefixCache keyed by vllm_hash_fn), publish
    vLLM payloads (int hashes), and a Router fed by the decoders picks the worker holding a
    request's prefix, within its salt only, and forgets evicted blocks."""
    bs = 4
    workers = {}
    for w in ("w0", "w1"):
        pc = PrefixCache(num_blocks=32, block_size=bs, hash_fn=vllm_hash_fn(int_hashes=False))
        enc = VllmEventEncoder(bs, wire=wire)
        pc.events.subscribe(enc)
        workers[w] = (pc, enc, VllmEventDecoder())
    router = Router(bs, hash_fn=vllm_hash_fn())
    for w in workers:
        router.add_worker(w)

    def step():
        for w, (_, enc, dec) in workers.items():
            payload = enc.take()
            if payload is not None:
                for ev in dec.decode(payload).events:
                    router.apply(w, ev)

    def run(w, rid, tokens, salt=None):
        pc = workers[w][0]
        done = pc.add_request(rid, tokens, salt=salt)
        pc.step([(rid, len(tokens) - done)])

    doc = _prompt(4 * bs + 1, base=1000)
    run("w1", "a", doc)
    run("w0", "b", doc, salt="tenant")
    step()
    pick = router.pick(doc + [1, 2, 3])
    assert pick.worker == "w1" and pick.overlaps == {"w0": 0, "w1": 4}
    assert router.pick(doc + [5], salt="tenant").overlaps == {"w0": 4, "w1": 0}
    assert router.pick(doc, salt="other").overlaps == {"w0": 0, "w1": 0}
    # vLLM's own hashes: what a vLLM engine with sha256_cbor publishes for the same prompt
    want = [external_hash(h) for h in hash_blocks(doc[:4 * bs], bs, algo="vllm-sha256")]
    assert router.request_hashes(doc) == [x.to_bytes(8, "big") for x in want]
    # evict w1's blocks: free them and make the pool reuse every block
    pc1 = workers["w1"][0]
    pc1.free("a")
    run("w1", "c", _prompt(30 * bs + 1, base=50_000))
    step()
    assert router.pick(doc + [1]).overlaps["w1"] == 0


def test_vllm_hash_fn_continues_chains_only_with_full_digests():
    toks = np.arange(12, dtype=np.int32)
    full = vllm_hash_fn(int_hashes=False)
    whole = full(toks, 4)
    assert full(toks[8:], 4, parent=whole[1]) == whole[2:]
    assert vllm_hash_fn()(toks, 4) == [h[-8:] for h in whole]
    with pytest.raises(ValueError, match="parent"):
        vllm_hash_fn()(toks[8:], 4, parent=whole[1][-8:])
    # vLLM's default sha256 (pickle) unless told sha256_cbor
    assert whole == hash_blocks(toks, 4, algo="vllm-sha256")
    assert vllm_hash_fn(algo="vllm-sha256-cbor", int_hashes=False)(toks, 4) == hash_blocks(
        toks, 4, algo="vllm-sha256-cbor") != whole
    with pytest.raises(ValueError, match="algo"):
        vllm_hash_fn(algo="xxhash")


def test_frames_over_zmq_pub_sub():
    """A publisher sends vLLM's frames on 127.0.0.1; a subscriber decodes them in order."""
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.connect(f"tcp://127.0.0.1:{port}")
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        enc, dec = VllmEventEncoder(4), VllmEventDecoder()
        sub.setsockopt(zmq.RCVTIMEO, 100)
        # PUB drops messages until the subscription arrives: resend until one is received
        deadline = time.monotonic() + 10
        seq, got = 0, None
        while got is None and time.monotonic() < deadline:
            pub.send_multipart(encode_frames(seq, enc.encode([_stored(H[:1])], ts=1.0), "kv"))
            seq += 1
            try:
                got = sub.recv_multipart()
            except zmq.Again:
                continue
        assert got is not None
        s, payload = decode_frames(got)
        assert 0 <= s < seq
        (ev,) = dec.decode(payload).events
        assert ev.block_hashes == (H[0][-8:],) and ev.token_ids == tuple(range(100, 104))
    finally:
        pub.close(0)
        sub.close(0)
        ctx.term()


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.sampled_from([None, "a", "b"]),
                              st.integers(0, 40), st.booleans()), min_size=1, max_size=25),
       wire=st.sampled_from(["map", "array"]), int_hashes=st.booleans())
def test_wire_is_lossless_for_a_router(ops, wire, int_hashes):
    """Random requests (shared prefixes, three salts, frees, evictions of a small pool): a
    Router fed through the wire (encode, decode) holds what one fed the PrefixCache's events
    directly holds (hashes cut to vLLM's 64 bits when int), namespaces included."""
    bs = 4
    pc = PrefixCache(num_blocks=24, block_size=bs, hash_fn=vllm_hash_fn(int_hashes=False))
    enc, dec = VllmEventEncoder(bs, wire=wire, int_hashes=int_hashes), VllmEventDecoder()
    direct = Router(bs, hash_fn=vllm_hash_fn(int_hashes=False))
    direct.add_worker("w", pc.events)
    pc.events.subscribe(enc)
    wired = Router(bs, hash_fn=vllm_hash_fn(int_hashes=int_hashes))
    wired.add_worker("w")
    prefixes = [list(range(p * 100, p * 100 + 12)) for p in range(3)]
    live = []
    for i, (p, salt, extra, free) in enumerate(ops):
        prompt = prefixes[p % 3] + list(range(1000 + i * 50, 1000 + i * 50 + extra))
        try:
            done = pc.add_request(i, prompt, salt=salt)
            pc.step([(i, len(prompt) - done)])
            live.append(i)
        except NoFreeBlocksError:
            pc.free(i)
        if free and live:
            pc.free(live.pop(0))
        payload = enc.take(ts=float(i))
        if payload is not None:
            for ev in dec.decode(payload).events:
                wired.apply("w", ev)
    cut = (lambda h: h[-8:]) if int_hashes else (lambda h: h)
    want = {ns: {cut(h) for h in hs} for ns, hs in direct.cached_hashes("w").items()}
    assert wired.cached_hashes("w") == want
    for p in range(3):
        for salt in (None, "a", "b"):
            prompt = prefixes[p] + [1]
            assert (wired.pick(prompt, salt=salt).overlaps
                    == direct.pick(prompt, salt=salt).overlaps)
