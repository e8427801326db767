"""Every Triton kernel variant compiled for sm_80 and sm_90 with no GPU present
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``): catches GPU-only
errors the interpreter misses, and records shared memory, register and stack (spill) use
(printed; run with -s to see the table). Each variant is specialized as the JIT specializes a
launch on contiguous torch tensors (unit strides constant, aligned pointers), so the figures are
those of the kernels that run."""

from __future__ import annotations

import pytest
from cubin_resources import resources

triton = pytest.importorskip("triton")
pytest.importorskip("torch")

from prefixkv.kernels.triton import attention as tattn  # noqa: E402
from prefixkv.kernels.triton import cache as tcache  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

PTR = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "int32": "*i32",
       "int16": "*i16"}
FLOATS = {"scale", "soft_cap"}


def _signature(fn, constexprs: dict, ptr_types: dict, default_ptr: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, default_ptr)
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


#: Attention strides that are 1 for tensors contiguous in head_dim (and lse [T, H]).
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_lh")
#: Strides that are multiples of head_dim (a multiple of 16 at every compiled head_dim).
ALIGNED_STRIDES = ("stride_qt", "stride_qh", "stride_kb", "stride_kt", "stride_kh", "stride_vb",
                   "stride_vt", "stride_vh", "stride_ot", "stride_oh")


def _jit_attrs(fn, sig: dict) -> dict:
    """The divisibility hints the JIT gives a launch on torch tensors: 16-byte aligned data
    pointers and strides that are multiples of 16 elements."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name] != "constexpr" and (name.endswith("_ptr") or name in ALIGNED_STRIDES)}


def _attention_variant(dtype, head_dim, num_q_heads, num_kv_heads, decode, causal, window,
                       soft_cap, splits, fp8=False, sinks=False, full_tiles=None):
    """(kernel, constexprs of cc, pointer types, default pointer type, launch options of cc):
    the launch the torch frontend makes on a device of compute capability cc (x 10). fp8:
    float8_e4m3fn caches read as bytes (*u8 k/v pointers) with k_scale and v_scale. sinks:
    attention sinks read by the kernel (in q's dtype). full_tiles: the kernel's FULL_TILES
    (None: as shipped, tattn.FULL_TILES)."""
    itemsize = 4 if dtype == "float32" else 2

    cfg = tattn.attention_config(num_q_heads, num_kv_heads, head_dim, decode, itemsize=itemsize,
                                 split=splits > 1, fp8=fp8)

    def constexprs(cc):
        upcast = dtype == "float32"
        cx = dict(cfg, BLOCK_SIZE=16, DECODE=decode, CAUSAL=causal, WINDOW=window,
                  SOFT_CAP=soft_cap, NUM_SPLITS=splits, UPCAST=upcast, FP8=fp8, K_SCALED=fp8,
                  V_SCALED=fp8, SINKS=sinks,
                  FULL_TILES=tattn.FULL_TILES if full_tiles is None else full_tiles,
                  DOT_PREC=tattn.dot_precision(4 if upcast else 2, head_dim, cfg["BLOCK_M"],
                                               decode))
        # As the JIT specializes a launch on contiguous tensors: unit strides become constants
        cx.update({name: 1 for name in UNIT_STRIDES})
        return cx

    def options(cc):
        stages = tattn.attention_stages(cfg, decode, itemsize=itemsize, split=splits > 1,
                                        fp8=fp8, cc=cc)
        return {"num_warps": tattn.attention_warps(head_dim, decode, itemsize=itemsize,
                                                   rows=cfg["BLOCK_M"], cc=cc,
                                                   split=splits > 1, fp8=fp8),
                **({"num_stages": stages} if stages else {})}

    out_t = "*fp32" if splits > 1 else PTR[dtype]
    ptrs = {"tables_ptr": "*i32", "kv_lens_ptr": "*i32", "cu_ptr": "*i32", "out_ptr": out_t,
            "lse_ptr": "*fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
            "sinks_ptr": PTR[dtype] if sinks else "*fp32"}
    if fp8:
        ptrs.update(k_ptr="*u8", v_ptr="*u8")
    return tattn._paged_attention_kernel, constexprs, ptrs, PTR[dtype], options


#: write_kv moving bits (caches of the rows' dtype); ks_ptr / vs_ptr then unread
WRITE_BITS = {"FP8": False, "IN_BF16": False}


def _fp8_write_variant(in_bf16: bool, rows_ptr: str) -> tuple:
    """write_kv of 8 heads x 128 into float8_e4m3fn caches (int8), int64 slots, rows of
    ``rows_ptr`` (bfloat16 rows as their int16 bits with ``in_bf16``)."""
    return (tcache._write_kv_kernel,
            {"NUM_HEADS": 8, "HEAD_DIM": 128, "BLOCK_H": 8, "BLOCK_D": 128, "BLOCK_SIZE": 16,
             "FP8": True, "IN_BF16": in_bf16},
            {"k_ptr": "*i8", "v_ptr": "*i8", "slots_ptr": "*i64", "ks_ptr": "*fp32",
             "vs_ptr": "*fp32"}, rows_ptr)

VARIANTS = {
    "attn-decode-bf16-d128-g4": _attention_variant("bfloat16", 128, 32, 8, True, True, False,
                                                   False, 1),
    # 64 keys, 5 stages, 2 warps
    "attn-decode-split8-bf16-d128-g4": _attention_variant("bfloat16", 128, 32, 8, True, True,
                                                          False, False, 8),
    # 2 warps (the split tile's rule) with the most registers: head_dim 128, window, soft cap
    "attn-decode-split8-bf16-d128-g4-window-cap": _attention_variant(
        "bfloat16", 128, 32, 8, True, True, True, True, 8),
    # attention sinks (gpt-oss: 64 q / 8 kv heads, head_dim 64, sliding window on every other
    # layer), split decode and prefill
    "attn-decode-split8-bf16-d64-g8-window-sinks": _attention_variant(
        "bfloat16", 64, 64, 8, True, True, True, False, 8, sinks=True),
    "attn-prefill-bf16-d64-g8-sinks": _attention_variant(
        "bfloat16", 64, 64, 8, False, True, False, False, 1, sinks=True),
    "attn-decode-split4-f16-d64-g8-window-cap": _attention_variant(
        "float16", 64, 64, 8, True, True, True, True, 4),
    "attn-decode-f32-d64-g1": _attention_variant("float32", 64, 8, 8, True, True, False,
                                                 False, 1),
    "attn-decode-split4-f16-d256-g8-window-cap": _attention_variant(
        "float16", 256, 64, 8, True, True, True, True, 4),
    "attn-prefill-bf16-d128-g1": _attention_variant("bfloat16", 128, 8, 8, False, True, False,
                                                    False, 1),
    # the benchmarks' prefill (4 warps: 1.93x faster than 8 on an H200)
    "attn-prefill-bf16-d128-g4": _attention_variant("bfloat16", 128, 32, 8, False, True, False,
                                                    False, 1),
    "attn-prefill-f32-d80-g4-window": _attention_variant("float32", 80, 8, 2, False, True, True,
                                                         False, 1),
    "attn-prefill-f16-d64-g8-noncausal-cap": _attention_variant("float16", 64, 8, 1, False,
                                                                False, False, True, 1),
    "attn-decode-f32-d128-g4": _attention_variant("float32", 128, 32, 8, True, True, False,
                                                  False, 1),
    "attn-prefill-f32-d128-g4": _attention_variant("float32", 128, 32, 8, False, True, False,
                                                   False, 1),
    "attn-prefill-f32-d256-g4": _attention_variant("float32", 256, 32, 8, False, True, False,
                                                   False, 1),
    # shapes that spilled with one program per kv head (stack bytes on sm_90 / sm_80 then):
    # float32 groups past 32 q heads now run as 2-4 programs of up to 32 heads each
    "attn-prefill-f32-d64-g8": _attention_variant("float32", 64, 8, 1, False, True, False,
                                                  False, 1),  # 176 / 152 B at 4 warps
    "attn-decode-f32-d128-g64": _attention_variant("float32", 128, 64, 1, True, True, False,
                                                   False, 1),  # 6504 / 6432 B
    "attn-decode-f32-d256-g32": _attention_variant("float32", 256, 32, 1, True, True, False,
                                                   False, 1),  # 5752 / 0 B
    "attn-prefill-f32-d80-g48-window-cap": _attention_variant(
        "float32", 80, 48, 1, False, True, True, True, 1),
    # 11168 B and 213 KB of shared memory (over sm_80's 163 KB)
    "attn-decode-split4-f32-d256-g128-window-cap": _attention_variant(
        "float32", 256, 128, 1, True, True, True, True, 4),
    "attn-prefill-bf16-d256-g128-window-cap": _attention_variant(
        "bfloat16", 256, 128, 1, False, True, True, True, 1),  # 0 / 32 B with 32 keys
    # float8_e4m3fn caches (vLLM's fp8 KV cache): bytes decoded by integer ops in the kernel
    "attn-decode-fp8-bf16-d128-g4": _attention_variant("bfloat16", 128, 32, 8, True, True,
                                                       False, False, 1, fp8=True),
    "attn-decode-split8-fp8-bf16-d128-g4": _attention_variant(
        "bfloat16", 128, 32, 8, True, True, False, False, 8, fp8=True),
    "attn-decode-split4-fp8-f16-d64-g8-window-cap": _attention_variant(
        "float16", 64, 64, 8, True, True, True, True, 4, fp8=True),
    "attn-prefill-fp8-bf16-d128-g4": _attention_variant("bfloat16", 128, 32, 8, False, True,
                                                        False, False, 1, fp8=True),
    "attn-prefill-fp8-bf16-d256-g128-window-cap": _attention_variant(
        "bfloat16", 256, 128, 1, False, True, True, True, 1, fp8=True),
    "attn-decode-fp8-f32-d128-g4": _attention_variant("float32", 128, 32, 8, True, True, False,
                                                      False, 1, fp8=True),
    "attn-prefill-fp8-f32-d80-g4-window": _attention_variant(
        "float32", 80, 8, 2, False, True, True, False, 1, fp8=True),
    # the key loop with unmasked whole steps first (tattn.FULL_TILES; off as shipped until
    # measured on a GPU): the benchmarks' prefill and decodes, a padded head_dim, fp8
    **{f"{name}-full-tiles": _attention_variant(*args, full_tiles=True) for name, args in (
        ("attn-prefill-bf16-d128-g4", ("bfloat16", 128, 32, 8, False, True, False, False, 1)),
        ("attn-decode-bf16-d128-g4", ("bfloat16", 128, 32, 8, True, True, False, False, 1)),
        ("attn-decode-split8-bf16-d128-g4", ("bfloat16", 128, 32, 8, True, True, False, False,
                                             8)),
        ("attn-decode-f32-d128-g4", ("float32", 128, 32, 8, True, True, False, False, 1)),
        ("attn-prefill-f16-d80-g4-cap", ("float16", 80, 8, 2, False, True, False, True, 1)),
        ("attn-prefill-bf16-d256-g128-window-cap", ("bfloat16", 256, 128, 1, False, True, True,
                                                    True, 1)),
        ("attn-decode-split8-fp8-bf16-d128-g4", ("bfloat16", 128, 32, 8, True, True, False,
                                                 False, 8, True)),
        ("attn-prefill-fp8-bf16-d128-g4", ("bfloat16", 128, 32, 8, False, True, False, False, 1,
                                           True)))},
    "merge-2-states-d128": (tattn._merge_states_kernel,
                            {"HEAD_DIM": 128, "BLOCK_D": 128, "NUM_STATES": 2, "STATES_P2": 2},
                            {"out_ptr": "*bf16", "o_ptr": "*fp32"}, "*fp32"),
    "merge-32-splits-d256": (tattn._merge_states_kernel,
                             {"HEAD_DIM": 256, "BLOCK_D": 256, "NUM_STATES": 32,
                              "STATES_P2": 32}, {"out_ptr": "*bf16", "o_ptr": "*fp32"}, "*fp32"),
    "merge-16-splits-d80": (tattn._merge_states_kernel,
                            {"HEAD_DIM": 80, "BLOCK_D": 128, "NUM_STATES": 16, "STATES_P2": 16},
                            {"out_ptr": "*fp16", "o_ptr": "*fp32"}, "*fp32"),
    "merge-two-bf16-d128": (tattn._merge_two_kernel, {"HEAD_DIM": 128, "BLOCK_D": 128},
                            {"out_ptr": "*bf16", "oa_ptr": "*bf16", "ob_ptr": "*bf16"}, "*fp32"),
    "merge-two-f32-d80": (tattn._merge_two_kernel, {"HEAD_DIM": 80, "BLOCK_D": 128}, {},
                          "*fp32"),
    "write-kv-h8-d128": (tcache._write_kv_kernel,
                         {"NUM_HEADS": 8, "HEAD_DIM": 128, "BLOCK_H": 8, "BLOCK_D": 128,
                          "BLOCK_SIZE": 16, **WRITE_BITS}, {"slots_ptr": "*i32"}, "*i16"),
    # int64 slots (vLLM's slot_mapping dtype): the JIT specializes slots_ptr as *i64
    "write-kv-h8-d128-slots-i64": (tcache._write_kv_kernel,
                                   {"NUM_HEADS": 8, "HEAD_DIM": 128, "BLOCK_H": 8,
                                    "BLOCK_D": 128, "BLOCK_SIZE": 16, **WRITE_BITS},
                                   {"slots_ptr": "*i64"}, "*i16"),
    "write-kv-h32-d128": (tcache._write_kv_kernel,
                          {"NUM_HEADS": 32, "HEAD_DIM": 128,
                           "BLOCK_H": tcache.write_kv_heads_per_program(32, 128), "BLOCK_D": 128,
                           "BLOCK_SIZE": 16, **WRITE_BITS}, {"slots_ptr": "*i32"}, "*i16"),
    "write-kv-h64-d256-f32": (tcache._write_kv_kernel,
                              {"NUM_HEADS": 64, "HEAD_DIM": 256,
                               "BLOCK_H": tcache.write_kv_heads_per_program(64, 256),
                               "BLOCK_D": 256, "BLOCK_SIZE": 16, **WRITE_BITS},
                              {"slots_ptr": "*i32"}, "*i32"),
    # into float8_e4m3fn caches (int8) from bfloat16 rows (int16 bits), as vLLM's fp8 caches,
    # and from float16 and float32 rows (their sign bits read as 16- and 32-bit integers)
    "write-kv-h8-d128-fp8-bf16": _fp8_write_variant(True, "*i16"),
    "write-kv-h8-d128-fp8-f16": _fp8_write_variant(False, "*fp16"),
    "write-kv-h8-d128-fp8-f32": _fp8_write_variant(False, "*fp32"),
    "cascade-order-decode-ids64": (tattn._cascade_order_kernel,
                                   {"DECODE": True, "BLOCK_S": tattn.CASCADE_BLOCK_S,
                                    "BLOCK_T": tattn.CASCADE_BLOCK_T},
                                   {"pid_ptr": "*i64", "cu_ptr": "*i64", "order_ptr": "*i64"},
                                   "*i32"),
    "cascade-order-ragged": (tattn._cascade_order_kernel,
                             {"DECODE": False, "BLOCK_S": tattn.CASCADE_BLOCK_S,
                              "BLOCK_T": tattn.CASCADE_BLOCK_T}, {"order_ptr": "*i64"}, "*i32"),
    "gather-blocks": (tcache._gather_blocks_kernel, {"BLOCK_NUMEL": 16384, "BLOCK": 4096},
                      {"ids_ptr": "*i32"}, "*i16"),
    "scatter-blocks": (tcache._scatter_blocks_kernel, {"BLOCK_NUMEL": 16384, "BLOCK": 4096},
                       {"ids_ptr": "*i32"}, "*i16"),
    # int64 block ids (torch's default, vLLM's block_mapping columns) specialize *i64
    "gather-blocks-ids-i64": (tcache._gather_blocks_kernel,
                              {"BLOCK_NUMEL": 16384, "BLOCK": 4096}, {"ids_ptr": "*i64"}, "*i16"),
    "scatter-blocks-ids-i64": (tcache._scatter_blocks_kernel,
                               {"BLOCK_NUMEL": 16384, "BLOCK": 4096}, {"ids_ptr": "*i64"},
                               "*i16"),
    "mark-read-blocks": (tcache._mark_read_blocks_kernel, {"BLOCK": 1024},
                         {"src_ptr": "*i32", "marks_ptr": "*i8"}, "*i8"),
    "mark-read-blocks-ids-i64": (tcache._mark_read_blocks_kernel, {"BLOCK": 1024},
                                 {"src_ptr": "*i64", "marks_ptr": "*i8"}, "*i8"),
    **{f"copy-blocks{'-staged' if staged else ''}{'-ids-i64' if wide else ''}": (
        tcache._copy_blocks_kernel,
        {"BLOCK_NUMEL": 16384, "BLOCK": 4096, "STAGED": staged},
        {"src_ptr": "*i64" if wide else "*i32", "dst_ptr": "*i64" if wide else "*i32",
         "marks_ptr": "*i8"}, "*i16")
       for staged in (False, True) for wide in (False, True)},
}


#: Spills measured and accepted (most stack bytes allowed, by variant and sm): fp8 caches with
#: float32 q (rare: vLLM's fp8 caches go with 16-bit q) in 32-row prefill tiles spilled
#: 168 / 200 B (sm_80 / sm_90; with 16 keys a step 192 / 208 B: not the key count), and the
#: 128-row bf16 prefill tile at head_dim 256, already at 255 registers on sm_80 without fp8,
#: 96 B on sm_80 (0 on sm_90).
KNOWN_STACK = {("attn-prefill-fp8-f32-d80-g4-window", 80): 256,
               ("attn-prefill-fp8-f32-d80-g4-window", 90): 256,
               ("attn-prefill-fp8-bf16-d256-g128-window-cap", 80): 128,
               # FULL_TILES (off as shipped) over the float32 tf32x3 decode tile, at 255
               # registers without it: 8 B on sm_80
               ("attn-decode-f32-d128-g4-full-tiles", 80): 8,
               # the soft cap's tanh near 0 (a Taylor polynomial beside the exp form, which
               # cancels there: 6.5e-4 off at a cap of 1e4) in the non-causal float16 prefill
               # tile: 16 B on sm_80 (libdevice's tanh spilled 232-296 B in two others)
               ("attn-prefill-f16-d64-g8-noncausal-cap", 80): 16}


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_gpu(name, cc, record_property):
    fn, cx, ptrs, default_ptr, *options = VARIANTS[name]
    cx = cx(cc) if callable(cx) else cx
    options = options[0](cc) if options else {"num_warps": 4}
    sig = _signature(fn, cx, ptrs, default_ptr)
    kernel = triton.compile(ASTSource(fn, sig, cx, _jit_attrs(fn, sig)),
                            target=GPUTarget("cuda", cc, 32), options=options)
    assert kernel.asm["cubin"], "no cubin produced"
    shared = kernel.metadata.shared
    res = resources(kernel.asm["cubin"])
    regs, stack = res.get("REG", "?"), res.get("STACK", "?")
    limit = 227 * 1024 if cc == 90 else 163 * 1024
    assert shared <= limit, f"{name}: {shared} bytes of shared memory > {limit} on sm_{cc}"
    allowed = KNOWN_STACK.get((name, cc), 0)
    assert stack == "?" or stack <= allowed, \
        f"{name}: {stack} bytes of stack (register spills) on sm_{cc}, over {allowed}"
    record_property("shared_bytes", shared)
    record_property("registers", regs)
    record_property("stack_bytes", stack)
    print(f"\n{name} sm_{cc}: shared {shared} B, registers {regs}, stack {stack} B, "
          f"warps {kernel.metadata.num_warps}")


def test_split_kv_factor_follows_the_sm_count():
    # 2 sequences x 8 kv heads = 16 programs: split to fill ~2 programs per SM, at most 32
    # splits and at least 512 keys per split; no split once the programs fill the SMs
    assert tattn.num_kv_splits(2, 8, 8192, True, sms=132) == 16
    assert tattn.num_kv_splits(1, 8, 32768, True, sms=132) == 32  # 256 programs of 1024 keys
    assert tattn.num_kv_splits(1, 1, 65536, True, sms=132) == 32  # the cap
    assert tattn.num_kv_splits(2, 8, 8192, True, sms=64) == 8
    assert tattn.num_kv_splits(2, 8, 2048, True, sms=132) == 4
    assert tattn.num_kv_splits(20, 8, 8192, True, sms=132) == 1
    assert tattn.num_kv_splits(2, 8, 8192, False, sms=132) == 1
    assert tattn.sm_count(None) == 132  # no device to ask: an H100's


def test_warps_per_program():
    """4 warps for 16-row decode tiles and, from sm_90, 16-bit prefill tiles up to 64 rows
    (head_dim <= 128); sm_80 prefill, float32 tiles of 32 rows and wide heads take 8."""
    warps = tattn.attention_warps
    assert warps(128, True, itemsize=2, rows=16, cc=80) == 4
    assert warps(128, False, itemsize=2, rows=64, cc=90) == 4
    assert warps(128, False, itemsize=2, rows=64, cc=80) == 8
    assert warps(128, False, itemsize=2, rows=128, cc=90) == 8
    assert warps(128, False, itemsize=4, rows=32, cc=90) == 8
    assert warps(256, False, itemsize=2, rows=64, cc=90) == 8
    assert warps(64, False, itemsize=2, rows=64, cc=80) == 4
    assert tattn.compute_capability(None) == 90  # no device to ask: an H100's


def test_split_decode_tiles():
    """16-bit split-KV decode: 64 keys a step in 5 stages; fp8 caches half of 128 (64) in
    Triton's default stages, as unsplit decodes, float32 and wide heads."""
    def tiles(itemsize=2, split=True, fp8=False, head_dim=128):
        cfg = tattn.attention_config(32, 8, head_dim, True, itemsize=itemsize, split=split,
                                     fp8=fp8)
        return cfg["BLOCK_N"], tattn.attention_stages(cfg, True, itemsize=itemsize,
                                                      split=split, fp8=fp8)

    assert tiles() == (64, 5)
    assert tiles(head_dim=64) == (64, 5)
    assert tiles(fp8=True) == (64, None)
    assert tiles(split=False) == (64, None)
    assert tiles(itemsize=4) == (64, None)
    assert tiles(head_dim=256) == (32, None)
    cfg = tattn.attention_config(32, 8, 128, True, split=True)
    assert tattn.attention_stages(cfg, True, split=True, cc=0) is None  # ROCm: Triton's own


def test_big_groups_run_as_several_programs():
    """A kv head's q heads past 32 (float32) or 128 (16-bit) per program split into the
    fewest slices within the cap, equal but the last; split-KV sizing counts the programs."""
    def cfg(hq, hkv, itemsize):
        c = tattn.attention_config(hq, hkv, 128, True, itemsize=itemsize)
        return c["GROUP"], c["HEAD_SPLITS"], c["BLOCK_M"]

    assert cfg(256, 8, 4) == (32, 1, 32)
    assert cfg(64, 1, 4) == (32, 2, 32)
    assert cfg(48, 1, 4) == (24, 2, 32)
    assert cfg(37, 1, 4) == (19, 2, 32)  # a prime group: 19 + 18 heads
    assert cfg(71, 1, 4) == (24, 3, 32)  # Falcon-7B's 71 q heads (MQA): 24 + 24 + 23
    assert cfg(128, 1, 2) == (128, 1, 128)
    assert cfg(192, 1, 2) == (96, 2, 128)
    assert tattn.program_heads(128, 2, 4) == 4 and tattn.program_heads(128, 2, 2) == 2
