"""Multimodal prompts: PrefixCache / Router / hash_blocks(mm_items=) key blocks by their images.

Two prompts whose image placeholder tokens are equal but whose images differ must share only the
blocks before the first image (docs/hashing.md, "Multimodal prompts"); text-only hashes do not
change; the vLLM mode keys blocks as vLLM's ``_gen_mm_extra_hash_keys`` does.
"""

import functools
import hashlib
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from prefixkv.paged import PrefixCache, Router, hash_blocks
from prefixkv.paged.hashing import check_mm_items, mm_extra_words

blake3 = pytest.importorskip("blake3")

ROOT = Path(__file__).resolve().parents[1]
IMG = 32000  # an image placeholder token id
BS = 8


def prompt(text_before=20, image=8, text_after=3):
    return list(range(100, 100 + text_before)) + [IMG] * image + list(range(1, 1 + text_after))


# ------------------------------------------------------------------ an independent oracle


def oracle_v1(tokens, bs, items, salt=b"", parent=bytes(32)):
    """docs/hashing.md's multimodal rule, with the blake3 package, block by block."""
    k0 = blake3.blake3(salt, derive_key_context="prefixkv v1 block hash").digest()
    kx = blake3.blake3(salt, derive_key_context="prefixkv v1 block hash with extra words").digest()
    items = sorted(items)
    m = items[0][0] // bs if items else None
    prev, out = parent, []
    for i in range(len(tokens) // bs):
        msg = prev + struct.pack(f"<{bs}I", *tokens[i * bs:(i + 1) * bs])
        if m is None or i < m:
            prev = blake3.blake3(msg, key=k0).digest()
        else:
            material = b""
            for off, n, ident in items:
                if off < (i + 1) * bs and off + n > i * bs:
                    d = ident.encode() if isinstance(ident, str) else ident
                    material += struct.pack("<qQQ", off - i * bs, n, len(d)) + d
            words = bytes(16) if not material else blake3.blake3(
                material, derive_key_context="prefixkv v1 multimodal block extra").digest()[:16]
            prev = blake3.blake3(msg + words, key=kx).digest()
        out.append(prev)
    return out


# ------------------------------------------------------------------ the audit's case


def test_other_image_shares_only_the_text_blocks_before_it():
    toks = prompt()  # 20 text tokens, the image at 20..27: block 2 (16..23) holds both
    pc = PrefixCache(num_blocks=32, block_size=BS)
    pc.add_request("cat", toks, salt="t", mm_items=[(20, 8, "cat")])
    pc.step([("cat", len(toks))])
    assert pc.add_request("dog", toks, salt="t", mm_items=[(20, 8, "dog")]) == 16
    assert pc.blocks("dog") == pc.blocks("cat")[:2]
    cat, dog = pc.request_hashes("cat"), pc.request_hashes("dog")
    assert cat[:2] == dog[:2]
    assert not set(cat[2:]) & set(dog[2:])
    # the text prefix before the image is the text-only prompt's: a text request hits it
    assert pc.add_request("txt", toks, salt="t") == 16


def test_image_at_a_block_start_leaves_every_earlier_block_shared():
    toks = prompt(text_before=16)  # the image fills block 2 exactly
    pc = PrefixCache(num_blocks=32, block_size=BS)
    pc.add_request("cat", toks, mm_items=[(16, 8, b"\x01" * 32)])
    pc.step([("cat", len(toks))])
    assert pc.add_request("dog", toks, mm_items=[(16, 8, b"\x02" * 32)]) == 16
    assert pc.add_request("cat2", toks, mm_items=[(16, 8, b"\x01" * 32)]) == 24


def test_same_image_hits_everything():
    toks = prompt(text_after=13)
    pc = PrefixCache(num_blocks=32, block_size=BS)
    pc.add_request("a", toks, salt="t", mm_items=[(20, 8, "cat")])
    pc.step([("a", len(toks))])
    assert pc.add_request("b", toks, salt="t", mm_items=[[20, 8, bytearray(b"cat")]]) == 40
    assert pc.request_hashes("a") == pc.request_hashes("b")
    assert pc.add_request("c", toks, salt="u", mm_items=[(20, 8, "cat")]) == 0  # salts still


@pytest.mark.parametrize("a,b", [
    ([(16, 8, "x"), (24, 8, "y")], [(16, 8, "y"), (24, 8, "x")]),   # images swapped
    ([(16, 4, "x"), (20, 4, "y")], [(16, 4, "y"), (20, 4, "x")]),   # swapped in one block
    ([(18, 6, "x")], [(20, 4, "x")]),                              # same image, moved
    ([(16, 16, "x")], [(16, 8, "x"), (24, 8, "x")]),               # one item vs two
])
def test_items_elsewhere_never_hit(a, b):
    toks = list(range(100, 116)) + [IMG] * 16 + [1, 2, 3]
    pc = PrefixCache(num_blocks=32, block_size=BS)
    pc.add_request("a", toks, mm_items=a)
    pc.step([("a", len(toks))])
    assert pc.add_request("b", toks, mm_items=b) == 16
    assert pc.request_hashes("a")[:2] == pc.request_hashes("b")[:2]
    assert pc.request_hashes("a")[2] != pc.request_hashes("b")[2]


# ------------------------------------------------------------------ text-only unchanged


def test_text_only_hashes_are_the_spec_vectors():
    # docs/hashing.md V1 and V2: a PrefixCache without items hashes exactly as before
    pc = PrefixCache(num_blocks=8, block_size=16)
    assert [h.hex() for h in pc.block_hashes(range(32), salt="tenant-a")] == [
        "c4273153c00d8997ef70174fe296932660e6ceb87fadcc868f90518818eaec47",
        "1a7b9071307e26aa58eb7b3d18b060e5b8c7e9fdf8b6356410bce45e36a1441d"]
    assert pc.block_hashes(range(16))[0].hex() == (
        "0ae9a6e2bdeffd163a424745a6947aac211cbe7f4aba58856861e85674230fed")
    assert pc.block_hashes(range(32), "tenant-a", mm_items=[]) == pc.block_hashes(range(32),
                                                                                 "tenant-a")
    assert hash_blocks(range(32), 16, mm_items=()) == hash_blocks(range(32), 16)
    # the blocks before the first item are the text prompt's
    toks = prompt(text_before=40, text_after=9)
    mm = pc.block_hashes(toks, "s", mm_items=[(40, 8, "cat")])
    text = pc.block_hashes(toks, "s")
    assert mm[:2] == text[:2] and mm[2] != text[2]


# ------------------------------------------------------------------ the spec and its vector


def doc_vector():
    text = (ROOT / "docs" / "hashing.md").read_text()
    section = text[text.index("### Multimodal prompts"):text.index("## Implementations")]
    return re.findall(r"^\| (\d) \| (.*?) \| `([0-9a-f]{64})` \|$", section, flags=re.M)


def test_doc_vector():
    toks, items = list(range(64)), [(20, 16, "cat"), (40, 4, "dog")]
    rows = doc_vector()
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    want = [r[2] for r in rows]
    assert [h.hex() for h in oracle_v1(toks, 16, items)] == want
    assert [h.hex() for h in hash_blocks(toks, 16, mm_items=items)] == want
    assert [h.hex() for h in PrefixCache(8, 16).block_hashes(toks, mm_items=items)] == want
    words = mm_extra_words(check_mm_items(items), 1, 4, 16)
    assert [w.astype("<u4").tobytes().hex() for w in words[:2]] == [
        r[1].strip("`") for r in rows[1:3]]
    assert not words[2].any()


@pytest.mark.parametrize("salt", [None, "tenant-a", b"\x00\xff"])
@pytest.mark.parametrize("items", [
    [(0, 3, "a")], [(5, 30, b"long")], [(16, 16, "edge")], [(7, 1, "a"), (8, 1, "b")],
    [(60, 4, "late")], [(3, 2, "a"), (9, 2, "b"), (40, 20, "c")],
])
def test_hash_blocks_matches_the_oracle_and_continues(salt, items):
    toks = list(range(1000, 1070))
    sb = b"" if salt is None else salt.encode() if isinstance(salt, str) else salt
    want = oracle_v1(toks, 16, items, salt=sb)
    assert hash_blocks(toks, 16, salt=salt, mm_items=items) == want
    for cut in (16, 32, 48):  # continued with parent=, items shifted to the call's first token
        head = hash_blocks(toks[:cut], 16, salt=salt, mm_items=items)
        tail = hash_blocks(toks[cut:], 16, salt=salt, parent=head[-1],
                           mm_items=[(o - cut, n, i) for o, n, i in items])
        assert head + tail == want


def test_extra_words_backends_agree():
    from prefixkv.paged.reference.hashing import derive_key

    material = struct.pack("<qQQ", -3, 9, 3) + b"cat"
    want = blake3.blake3(material, derive_key_context="prefixkv v1 multimodal block extra").digest()
    assert derive_key("prefixkv v1 multimodal block extra", material) == want
    words = mm_extra_words(((5, 9, "cat"),), 1, 2, 8)
    assert words.astype("<u4").tobytes() == want[:16]


@pytest.mark.parametrize("backend", ["blake3", "reference"])
def test_fallback_backends_give_the_vector(backend, monkeypatch):
    import sys

    import prefixkv.kernels.cpu.hashing as kernel
    from prefixkv.paged import hashing

    monkeypatch.setattr(kernel, "load_extension", lambda: None)  # as if the C kernel was not built
    if backend == "reference":
        monkeypatch.setitem(sys.modules, "blake3", None)  # nor the blake3 package installed
    hashing._mm_derive.cache_clear()
    try:
        assert hashing.host_backend() == backend
        got = hash_blocks(list(range(64)), 16, mm_items=[(20, 16, "cat"), (40, 4, "dog")])
    finally:
        hashing._mm_derive.cache_clear()
    assert [h.hex() for h in got] == [r[2] for r in doc_vector()]


# ------------------------------------------------------------------ incremental = one call


def test_incremental_hashing_equals_one_call():
    pc = PrefixCache(num_blocks=256, block_size=BS)
    reqs = {
        "mm-a": (prompt(text_after=5), [(20, 8, "cat")], "t"),
        "mm-b": (prompt(text_after=5), [(20, 8, "dog")], "t"),
        "mm-tail": (prompt(text_before=3, image=4, text_after=0), [(3, 4, "short")], "t"),
        "mm-late": (list(range(200, 230)) + [IMG] * 5, [(30, 5, "late")], "t"),
        # fills block 4 (the image's last 3 tokens) in the same decode step as mm-late
        "mm-late2": (list(range(300, 330)) + [IMG] * 5, [(30, 5, "late2")], "t"),
        "txt": (prompt(text_after=5), None, "t"),
        "mm-u": (prompt(text_after=5), [(20, 8, "cat")], "u"),
    }
    for rid, (toks, items, salt) in reqs.items():
        pc.add_request(rid, toks, salt=salt, mm_items=items)
    batch = [(r, min(7, len(t) - pc.num_computed(r))) for r, (t, _, _) in reqs.items()]
    while any(n for _, n in batch):  # chunked prefill, 7 tokens a step
        pc.step(batch)
        batch = [(r, min(7, len(t) - pc.num_computed(r))) for r, (t, _, _) in reqs.items()]
    for step in range(20):  # decode: blocks fill together (the batched hashing path)
        for rid in reqs:
            pc.append_tokens(rid, [step])
        pc.step([(rid, 1) for rid in reqs])
    for rid, (_, items, salt) in reqs.items():
        whole = pc.tokens(rid)
        assert pc.request_hashes(rid) == pc.block_hashes(whole, salt, mm_items=items)
        if items:
            assert pc.request_hashes(rid) == oracle_v1(whole, BS, items, salt=salt.encode())
    # truncate into the text before the image, then the same tokens again: the chain switches
    # to extra words inside the refilled chunk, and still equals one call
    pc.truncate("mm-a", 12)
    pc.truncate("mm-b", 12)
    for rid in ("mm-a", "mm-b"):
        pc.append_tokens(rid, reqs[rid][0][12:])
    pc.step([("mm-a", len(pc.tokens("mm-a")) - 12), ("mm-b", len(pc.tokens("mm-b")) - 12)])
    for rid in ("mm-a", "mm-b"):
        assert pc.request_hashes(rid) == pc.block_hashes(pc.tokens(rid), "t",
                                                         mm_items=reqs[rid][1])


def test_decode_blocks_after_an_image_stay_apart():
    toks = prompt(text_after=4)  # 32 tokens
    pc = PrefixCache(num_blocks=64, block_size=BS)
    pc.add_request("cat", toks, mm_items=[(20, 8, "cat")])
    pc.add_request("dog", toks, mm_items=[(20, 8, "dog")])
    pc.step([("cat", 32), ("dog", 32)])
    for _ in range(8):  # both fill block 4 with the same decode tokens
        for rid in ("cat", "dog"):
            pc.append_tokens(rid, [5])
        pc.step([("cat", 1), ("dog", 1)])
    assert pc.request_hashes("cat")[4] != pc.request_hashes("dog")[4]
    longer = toks + [5] * 8 + [6]
    assert pc.add_request("dog2", longer, mm_items=[(20, 8, "dog")]) == 40
    assert pc.blocks("dog2")[2:] == pc.blocks("dog")[2:]  # (blocks 0, 1: the first cached)


# ------------------------------------------------------------------ fork, preemption


def test_fork_keeps_the_items():
    toks = prompt(text_after=5)
    pc = PrefixCache(num_blocks=64, block_size=BS)
    pc.add_request("p", toks, salt="t", mm_items=[(20, 8, "cat")])
    pc.step([("p", len(toks))])
    pc.fork("p", "c")
    assert pc.mm_items("c") == pc.mm_items("p") == ((20, 8, "cat"),)
    for _ in range(12):
        pc.append_tokens("c", [9])
        pc.step([("c", 1)])
    assert pc.request_hashes("c") == oracle_v1(pc.tokens("c"), BS, [(20, 8, "cat")],
                                               salt=b"t")
    tokens, items = pc.tokens("c"), pc.mm_items("c")
    pc.free("c")  # preempted: back with its tokens and items, every full block hits
    assert pc.add_request("c", tokens, salt="t", mm_items=items) == (len(tokens) - 1) // BS * BS
    assert pc.mm_items("c") == items


def test_mm_items_query_of_a_text_request_is_empty():
    pc = PrefixCache(num_blocks=8, block_size=BS)
    pc.add_request("a", [1, 2, 3])
    assert pc.mm_items("a") == ()
    with pytest.raises(KeyError, match="request_id"):
        pc.mm_items("nope")


# ------------------------------------------------------------------ router


def test_router_overlaps_equal_the_workers_match():
    pcs = {w: PrefixCache(num_blocks=64, block_size=BS) for w in ("w0", "w1")}
    router = Router(BS)
    for w, pc in pcs.items():
        router.add_worker(w, pc.events)
    toks = prompt(text_after=13)
    pcs["w0"].add_request("cat", toks, salt="t", mm_items=[(20, 8, "cat")])
    pcs["w0"].step([("cat", len(toks))])
    pcs["w1"].add_request("txt", toks, salt="t")
    pcs["w1"].step([("txt", len(toks))])
    for items in ([(20, 8, "cat")], [(20, 8, "dog")], None, [(20, 4, "cat"), (24, 4, "x")]):
        d = router.pick(toks, "t", mm_items=items)
        for w, pc in pcs.items():
            assert d.overlaps[w] * BS == pc.match(toks, "t", mm_items=items)[1]
        assert router.overlaps(toks, "t", mm_items=items) == d.overlaps
        assert router.request_hashes(toks, "t", mm_items=items) == pcs["w0"].block_hashes(
            toks[:(len(toks) - 1) // BS * BS], "t", mm_items=items)
    assert router.pick(toks, "t", mm_items=[(20, 8, "cat")]).worker == "w0"
    assert router.pick(toks, "t", mm_items=[(20, 8, "dog")]).overlaps == {"w0": 2, "w1": 2}
    assert router.pick(toks, "t").worker == "w1"


# ------------------------------------------------------------------ bad items


BAD = [
    (5, TypeError, r"mm_items: expected a sequence"),
    ("img", TypeError, r"mm_items: expected a sequence"),
    ([(20, 8)], TypeError, r"mm_items\[0\]: expected an \(offset, length, identifier\)"),
    ([(20.0, 8, "a")], TypeError, r"mm_items\[0\]: offset: expected an int"),
    ([(True, 8, "a")], TypeError, r"mm_items\[0\]: offset: expected an int"),
    ([(20, "8", "a")], TypeError, r"mm_items\[0\]: length: expected an int"),
    ([(20, 0, "a")], ValueError, r"mm_items\[0\]: length: expected >= 1"),
    ([(-1, 4, "a")], ValueError, r"mm_items\[0\]: placeholder range \[-1, 3\) is not inside"),
    ([(0, 4, "a"), (28, 4, "b")], ValueError,
     r"mm_items\[1\]: placeholder range \[28, 32\) is not inside the prompt's 31"),
    ([(20, 8, 7)], TypeError, r"mm_items\[0\]: identifier: expected bytes or str"),
    ([(20, 8, b"")], ValueError, r"mm_items\[0\]: identifier: expected a non-empty"),
    ([(20, 8, "a"), (16, 5, "b")], ValueError,
     r"mm_items\[1\]: placeholder range \[16, 21\) overlaps mm_items\[0\]'s \[20, 28\)"),
]


@pytest.mark.parametrize("items,exc,msg", BAD)
def test_bad_mm_items(items, exc, msg):
    toks = prompt()  # 31 tokens
    pc = PrefixCache(num_blocks=32, block_size=BS)
    router = Router(BS)
    router.add_worker("w0", pc.events)
    calls = [lambda: pc.add_request("a", toks, mm_items=items),
             lambda: pc.match(toks, mm_items=items),
             lambda: pc.block_hashes(toks, mm_items=items),
             lambda: router.pick(toks, mm_items=items),
             lambda: router.request_hashes(toks, mm_items=items)]
    for call in calls:
        with pytest.raises(exc, match=msg):
            call()
    assert "a" not in pc


def test_hash_blocks_mm_argument_errors():
    toks = list(range(32))
    for algo in ("sglang-sha256", "dynamo-xxh3", "dynamo-kvbm"):
        with pytest.raises(ValueError, match=f"mm_items: {algo} has no multimodal keys"):
            hash_blocks(toks, 16, algo=algo, mm_items=[(0, 4, "a")])
    with pytest.raises(ValueError, match="mm_items: expected one sequence"):
        hash_blocks(toks, 16, cu_lens=[0, 16, 32], mm_items=[(0, 4, "a")])
    with pytest.raises(ValueError, match="mm_items: pass extra"):
        hash_blocks(toks, 16, extra=np.zeros((2, 4), np.uint32), mm_items=[(0, 4, "a")])
    # relative offsets (a continuation) may lie outside the call's tokens
    assert len(hash_blocks(toks, 16, mm_items=[(-40, 8, "a"), (100, 3, "b")])) == 2


# ------------------------------------------------------------------ custom hash_fn


def sglang_fn(tokens, block_size, salt=None, parent=None):
    return hash_blocks(tokens, block_size, parent=parent, algo="sglang-sha256")


def dropping_fn(tokens, block_size, salt=None, parent=None, **_):  # drops mm_items
    return hash_blocks(tokens, block_size, salt=salt, parent=parent)


def first_block_only_fn(tokens, block_size, salt=None, parent=None, mm_items=None):
    # keys items by absolute position only (breaks when continued with shifted items)
    items = [i for i in (mm_items or ()) if i[0] >= 0]
    return hash_blocks(tokens, block_size, salt=salt, parent=parent, mm_items=items or None)


@pytest.mark.parametrize("fn,msg", [
    (sglang_fn, r"mm_items: hash_fn cannot take multimodal items .*TypeError"),
    (functools.partial(hash_blocks, algo="sglang-sha256"),
     r"mm_items: hash_fn cannot take multimodal items .*has no multimodal keys"),
    (dropping_fn, r"mm_items: hash_fn ignores mm_items"),
    (first_block_only_fn, r"mm_items: hash_fn with parent="),
])
def test_a_hash_fn_without_items_is_refused(fn, msg):
    toks = prompt()
    pc = PrefixCache(num_blocks=32, block_size=BS, hash_fn=fn)
    router = Router(BS, hash_fn=fn)
    router.add_worker("w0", pc.events)
    for call in (lambda: pc.add_request("a", toks, mm_items=[(20, 8, "cat")]),
                 lambda: pc.match(toks, mm_items=[(20, 8, "cat")]),
                 lambda: router.pick(toks, mm_items=[(20, 8, "cat")])):
        with pytest.raises(ValueError, match=msg):
            call()
    assert "a" not in pc
    assert pc.add_request("b", toks) == 0  # text-only requests still work
    assert router.pick(toks).worker == "w0"


# ------------------------------------------------------------------ vLLM mode, bit-exact


def sha256_cbor(x):
    import cbor2

    return hashlib.sha256(cbor2.dumps(x, canonical=True)).digest()


def vllm_oracle(tokens, bs, items, salt=None, lora=None, seed="vllm-none-hash"):
    """vLLM's request block hasher as its kv_cache_utils describes it (features sorted by
    offset; a running item index; (identifier, offset - block start) per overlapping item;
    extra keys = lora + mm + cache_salt on block 0), all prompt blocks at once."""
    feats = sorted(items)
    prev, out, idx = sha256_cbor(seed), [], 0
    for start in range(0, len(tokens) - bs + 1, bs):
        end = start + bs
        mm = []
        while idx < len(feats):
            off, n, ident = feats[idx]
            if end <= off:
                break  # the block has not reached this item
            if start >= off + n:
                idx += 1  # passed
                continue
            mm.append((ident, off - start))
            if end >= off + n:
                idx += 1
            else:
                break
        keys = ([("lora",) + tuple(lora)] if lora else []) + mm + (
            [("cache_salt", salt)] if start == 0 and salt else [])
        prev = sha256_cbor((prev, tuple(tokens[start:end]), tuple(keys) if keys else None))
        out.append(prev)
    return out


VLLM_ITEMS = [
    [(20, 8, "9f2c" * 16)], [(16, 8, "a")], [(0, 40, "video")], [(3, 2, "a"), (5, 2, "b")],
    [(3, 2, "a"), (9, 20, "b"), (29, 3, "c")], [(7, 1, b"raw")],
]


@pytest.mark.parametrize("items", VLLM_ITEMS)
@pytest.mark.parametrize("salt,lora", [(None, None), ("tenant", None), ("t", ("sql", "/p"))])
def test_vllm_mode_mm_keys_bit_exact(items, salt, lora):
    pytest.importorskip("cbor2")
    toks = list(range(40))
    want = vllm_oracle(toks, BS, items, salt=salt, lora=lora)
    assert hash_blocks(toks, BS, algo="vllm-sha256-cbor", salt=salt, lora=lora,
                       mm_items=items) == want
    if lora is None:  # through a PrefixCache
        pc = PrefixCache(num_blocks=32, block_size=BS,
                         hash_fn=functools.partial(hash_blocks, algo="vllm-sha256-cbor"))
        pc.add_request("b", toks, salt=salt, mm_items=items)
        assert pc.request_hashes("b") == want
        assert pc.match(toks, salt, mm_items=items) == ([], 0)


@pytest.mark.parametrize("salt", [None, "t"])
def test_vllm_mode_decode_fills_a_block_with_an_item(salt):
    # the prompt ends inside block 2, which holds one item: decode fills it, and vLLM (which
    # then looks at the last item only) keys it as one call over the whole sequence does
    pytest.importorskip("cbor2")
    toks = list(range(22))
    items = [(3, 4, "a"), (17, 5, "x")]
    pc = PrefixCache(num_blocks=32, block_size=BS,
                     hash_fn=functools.partial(hash_blocks, algo="vllm-sha256-cbor"))
    pc.add_request("r", toks, salt=salt, mm_items=items)
    pc.step([("r", 22)])
    for t in range(3):
        pc.append_tokens("r", [t])
        pc.step([("r", 1)])
    assert pc.request_hashes("r") == vllm_oracle(toks + [0, 1, 2], BS, items, salt=salt)


def test_vllm_mode_keys_every_item_of_a_block_decode_fills():
    # two items in the prompt's last, partial block: prefixkv keys both (vLLM would key the
    # last only, so other first images could share that block: docs/hashing.md)
    pytest.importorskip("cbor2")
    fn = functools.partial(hash_blocks, algo="vllm-sha256-cbor")
    hashes = []
    for first in ("cat", "dog"):
        pc = PrefixCache(num_blocks=32, block_size=BS, hash_fn=fn)
        pc.add_request("r", list(range(20)), mm_items=[(16, 2, first), (18, 2, "same")])
        pc.step([("r", 20)])
        for t in range(4):
            pc.append_tokens("r", [t])
            pc.step([("r", 1)])
        hashes.append(pc.request_hashes("r"))
    assert hashes[0][:2] == hashes[1][:2] and hashes[0][2] != hashes[1][2]


def test_vllm_mode_keeps_images_apart_in_a_prefix_cache():
    pytest.importorskip("cbor2")
    fn = functools.partial(hash_blocks, algo="vllm-sha256-cbor")
    toks = prompt()
    pc = PrefixCache(num_blocks=32, block_size=BS, hash_fn=fn)
    pc.add_request("cat", toks, salt="t", mm_items=[(20, 8, "cat")])
    pc.step([("cat", len(toks))])
    for _ in range(9):  # decode blocks: no item, vLLM's keys are cache_salt-free there
        pc.append_tokens("cat", [4])
        pc.step([("cat", 1)])
    assert pc.request_hashes("cat") == vllm_oracle(pc.tokens("cat"), BS, [(20, 8, "cat")],
                                                   salt="t")
    assert pc.add_request("dog", toks, salt="t", mm_items=[(20, 8, "dog")]) == 16
    assert pc.add_request("cat2", toks, salt="t", mm_items=[(20, 8, "cat")]) == 24
