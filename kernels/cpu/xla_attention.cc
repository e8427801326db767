// Decode paged attention for XLA:CPU, as an XLA FFI custom call (one thread).
//
// q: [num_seqs, num_q_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
// num_kv_heads, head_dim] (NHD; or any strides between blocks, tokens and heads with each
// head's head_dim elements dense: HND [num_blocks, num_kv_heads, block_size, head_dim], views)
// (float32, bfloat16 or float16, q's dtype; or float8_e4m3fn with q
// float32, bfloat16 or float16, read as float32(cache) * k_scale or v_scale, vLLM's fp8 KV
// cache: k_scale folds into q's scale, v_scale into the final 1 / sum); block_tables:
// s32[num_seqs, max_blocks]; kv_lens: s32[num_seqs]. Returns out (q's dtype, same shape as q)
// and lse f32[num_seqs, num_q_heads] (natural log). The query of sequence s sits at position
// kv_lens[s] - 1 and sees keys t < kv_lens[s], and t >= kv_lens[s] - sliding_window when
// sliding_window > 0. Logits are (scale q) . k, soft-capped as cap tanh(x / cap) when
// logits_soft_cap > 0. q head h reads kv head h / (num_q_heads / num_kv_heads). A sequence
// that sees no key gets out 0 and lse -inf.
//
// Walk: per sequence, its keys [lo, kv_len) in chunks of consecutive keys (across block
// boundaries: the chunk's row pointers are looked up in the table once). Per chunk, q.k of
// every kv head's group, key tile by key tile, so the chunk's K rows are read front to back
// (each K row loaded and converted to float32 once for all q heads of its group); then per kv
// head an online-softmax update per q head (max, rescale of the accumulator only when the max
// grew, exp, sum) and the group's p.V into float32 accumulators (each V row converted once).
// Only keys in [lo, kv_len) are read, so whatever the cache holds elsewhere (NaN included)
// never reaches the result. Software prefetch keeps the memory busy while the core computes:
// a chunk's V rows are prefetched during its q.k, the next chunk's K rows during its p.V,
// spread over the inner loops (a chunk's rows come from blocks anywhere in the cache, which
// the hardware prefetchers do not follow, and they stop at 4 KiB pages).
//
// Two implementations of the inner loops: AVX2 + FMA + F16C intrinsics (compiled with target
// attributes, chosen at run time when the CPU has them and head_dim is a multiple of 8), and a
// portable one written for the compiler's auto-vectorizer. The portable attribute forces the
// latter (tests). With bfloat16 q and caches, head_dim % 32 == 0 and a CPU with AVX512-BF16,
// q.k runs as vdpbf16ps dot products (Avx512Bf16; PREFIXKV_CPU_AVX512=0: the AVX2 loops).
//
// Inputs are validated by the frontend; here nothing is read outside the buffers anyway:
// kv_len is clamped into [0, 2^31), block indices past the table read its last entry and block
// ids are clamped into [0, num_blocks), like the XLA path (take_along_axis of the clamped
// index, then clip).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PREFIXKV_X86 1
#else
#define PREFIXKV_X86 0
#endif

#ifndef PREFIXKV_NO_XLA_FFI
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
#endif

namespace {

// Keys per softmax chunk (a whole block when block_size <= kChunk).
constexpr int kChunk = 64;

// Bytes of K rows (all kv heads) per chunk. Measured on decode 8 x 4096 keys, 8 kv heads,
// head_dim 128, blocks of 16 in random order, one thread (AMD EPYC, AVX2): float32 ran
// 25 / 31 / 38 ms (min of 14) with 32 / 64 / 128 KiB chunks (8 / 16 / 32 keys) and 28 ms with
// 16 KiB; bfloat16 23 / 21 / 18.7 ms with 32 / 64 / 128 KiB (16 / 32 / 64 keys), the same
// with 256 KiB. Reading K front to back (all heads of a row, then the next row) took f32 from
// 26.0 to 22.7 ms (min of 10), bf16 18.3 to 17.9. Software prefetch (the next block, the next
// chunk, or the chunk's V rows during q.k; T0 or T2 hints) changed nothing or made it slower.
//
// Those prefetches were issued a block or chunk at a time. Spread over the inner loops
// (class Prefetch: a chunk's V rows during its q.k, the next chunk's K rows during its p.V),
// on the same shapes, min of 12 interleaved runs on a shared machine: caches from torch.empty
// (4 KiB pages) float32 46.7 -> 41.1 ms, bfloat16 35.4 -> 24.7 ms; on numpy's huge pages
// float32 35.6 -> 33.7, bfloat16 31.8 -> 21.7. Prefetching two or four chunks ahead, or to L2
// only (T2 hint), was no better (on a loaded machine; but see below); with prefetch, bfloat16 chunks of 64 KiB ran at least as
// well as 128 KiB. With the 16-wide tiles (AvxLoad16) and the p.V prefetches spread over the
// tiles, bfloat16 and fp8 chunks of 16 to 64 KiB ran within the noise of each other; prefetching
// V in the order p.V reads it (head by head) was slower than in address order.
//
// Prefetching into L2 (prefetcht1) instead of L1 (prefetcht0), with the same spread, on a quiet
// machine (AMD EPYC Zen 4, one thread, the kernel alone through ctypes, interleaved A/B, min
// of 18): float32 27.2 -> 14.5 ms, bfloat16 15.6 -> 10.8 ms; two threads 15.1 -> 9.9 and
// 9.7 -> 7.7 ms. A core has few L1 miss buffers, far fewer than L2's: prefetches to L1 capped
// the misses in flight, so the memory ran at about half its rate; L2 prefetches keep more in
// flight, and the loads then hit L2. The T2 hint (also L2 on these cores) ran the same; chunk
// sizes were re-swept with it (float32 16 / 32 / 64 / 128 KiB: 19.8 / 14.8 / 15.9 / 15.7 ms;
// 16-bit 32 to 256 KiB within 0.1 ms).
template <class S>
constexpr int64_t kChunkBytes = sizeof(S) == 4 ? int64_t{32} << 10 : int64_t{64} << 10;

// The cache lines of a list of rows, prefetched a few at a time: Issue(m) prefetches the next
// m lines into L2 (prefetcht1; see above), in row order. A row is `segs` segments of
// `seg_bytes`, `seg_stride` bytes apart (a key's kv heads: one dense segment in NHD, one per
// head in HND).
class Prefetch {
 public:
  template <class S>
  void Reset(const S* const* rows, int nrows, int64_t seg_bytes, int64_t segs = 1,
             int64_t seg_stride = 0) {
    rows_ = reinterpret_cast<const char* const*>(rows);
    lines_per_seg_ = (seg_bytes + 63) / 64;
    segs_ = std::max<int64_t>(1, segs);
    seg_stride_ = seg_stride;
    total_ = lines_per_seg_ * segs_ * nrows;
    next_ = row_ = seg_ = line_ = 0;
  }
  // Lines still to issue.
  int64_t left() const { return total_ - next_; }
  void Issue(int64_t m) {
    const int64_t end = std::min(total_, next_ + m);
    // the position as (row, segment, line) in locals: no division or store per line
    int64_t row = row_, seg = seg_, line = line_;
    if (segs_ == 1) {  // dense rows (NHD): the loop without the segment step
      for (int64_t i = next_; i < end; ++i) {
        __builtin_prefetch(rows_[row] + line * 64, 0, 2);
        if (++line == lines_per_seg_) {
          line = 0;
          ++row;
        }
      }
      row_ = row;
      line_ = line;
      next_ = std::max(next_, end);
      return;
    }
    for (int64_t i = next_; i < end; ++i) {
      // locality 2: prefetcht1
      __builtin_prefetch(rows_[row] + seg * seg_stride_ + line * 64, 0, 2);
      if (++line == lines_per_seg_) {
        line = 0;
        if (++seg == segs_) {
          seg = 0;
          ++row;
        }
      }
    }
    row_ = row;
    seg_ = seg;
    line_ = line;
    next_ = std::max(next_, end);
  }

 private:
  const char* const* rows_ = nullptr;
  int64_t lines_per_seg_ = 1, segs_ = 1, seg_stride_ = 0, total_ = 0, next_ = 0, row_ = 0,
          seg_ = 0, line_ = 0;
};

// ------------------------------------------------------------------ scalar conversions

inline float BitsToF32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t F32ToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float Bf16ToF32(uint16_t b) { return BitsToF32(uint32_t{b} << 16); }

// Round to nearest even; NaN stays NaN (quiet).
inline uint16_t F32ToBf16(float f) {
  uint32_t u = F32ToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Exact (every half is a float): zeros, subnormals, normals, inf, NaN (payload kept).
inline float F16ToF32(uint16_t h) {
  const uint32_t sign = (uint32_t{h} & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;  // man * 2^-24
    return BitsToF32(F32ToBits(mag) | sign);
  }
  if (exp == 31) return BitsToF32(sign | 0x7f800000u | (man << 13));
  return BitsToF32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even; overflow to inf, subnormals rounded, NaN stays NaN (quiet).
inline uint16_t F32ToF16(float f) {
  const uint32_t u = F32ToBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((a >> 13) & 0x3ffu);
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                        // >= 2^-14: a normal half
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
    return sign | static_cast<uint16_t>((r >> 13) - (112u << 10));
  }
  // subnormal half: the integer nearest |f| * 2^24 (ties to even), 1024 meaning 2^-14
  const float scaled = BitsToF32(a) * 16777216.0f;
  return sign | static_cast<uint16_t>(std::nearbyint(scaled));
}

struct F32Tag {
  using Storage = float;
  static float ToF32(float x) { return x; }
  static float FromF32(float x) { return x; }
};
struct BF16Tag {
  using Storage = uint16_t;
  static float ToF32(uint16_t x) { return Bf16ToF32(x); }
  static uint16_t FromF32(float x) { return F32ToBf16(x); }
};
struct F16Tag {
  using Storage = uint16_t;
  static float ToF32(uint16_t x) { return F16ToF32(x); }
  static uint16_t FromF32(float x) { return F32ToF16(x); }
};

// float8_e4m3fn (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no inf, 0x7f / 0xff NaN),
// exactly. As a cache element only: nothing is stored in it here.
inline float F8E4M3ToF32(uint8_t b) {
  const uint32_t sign = (uint32_t{b} & 0x80u) << 24;
  const uint32_t exp = (b >> 3) & 0xfu;
  const uint32_t man = b & 0x7u;
  if ((b & 0x7fu) == 0x7fu) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return BitsToF32(F32ToBits(static_cast<float>(man) * 0.001953125f) | sign);
  return BitsToF32(sign | ((exp + 120u) << 23) | (man << 20));  // man * 2^-9 above
}

struct F8E4M3Tag {
  using Storage = uint8_t;
  static float ToF32(uint8_t x) { return F8E4M3ToF32(x); }
};

// ------------------------------------------------------------------ portable inner loops

// The shapes every inner-loop implementation sees: q rows and accumulators [group][head_dim]
// (float32), s / p [group][kChunk], n keys: key t's head_dim values at rows[t] + head_off
// (the keys of a chunk may come from several blocks).
struct Portable {
  static constexpr bool kDp = false;  // see Avx512Bf16
  template <class Tag>
  static constexpr float Unit() { return 1.0f; }
  template <class Tag>
  static bool Interleaved(int, int) { return false; }

  template <class Tag>
  static void Qk(const float* q, int group, int d, const typename Tag::Storage* const* rows,
                 int64_t head_off, int n, float* s, float* row) {
    for (int t = 0; t < n; ++t) {
      const typename Tag::Storage* k = rows[t] + head_off;
      for (int i = 0; i < d; ++i) row[i] = Tag::ToF32(k[i]);
      for (int g = 0; g < group; ++g) {
        const float* qg = q + static_cast<int64_t>(g) * d;
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorizes
        int i = 0;
        for (; i + 8 <= d; i += 8)
          for (int j = 0; j < 8; ++j) part[j] += qg[i + j] * row[i + j];
        float sum = 0.0f;
        for (; i < d; ++i) sum += qg[i] * row[i];
        s[g * kChunk + t] =
            sum + ((part[0] + part[4]) + (part[1] + part[5])) +
            ((part[2] + part[6]) + (part[3] + part[7]));
      }
    }
  }

  template <class Tag>
  static void Pv(const float* p, int group, int d, const typename Tag::Storage* const* rows,
                 int64_t head_off, int n, float* acc, float* row, Prefetch* pf, int64_t lines) {
    pf->Issue(lines);
    for (int t = 0; t < n; ++t) {
      const typename Tag::Storage* v = rows[t] + head_off;
      for (int i = 0; i < d; ++i) row[i] = Tag::ToF32(v[i]);
      for (int g = 0; g < group; ++g) {
        const float pg = p[g * kChunk + t];
        float* a = acc + static_cast<int64_t>(g) * d;
        for (int i = 0; i < d; ++i) a[i] += pg * row[i];
      }
    }
  }

  template <class Tag>
  static void QkAll(const float* q, int num_kv_heads, int group, int d, int64_t head_stride,
                    const typename Tag::Storage* const* rows, int n, float* s, float* row,
                    Prefetch* pf) {
    const int64_t per = (pf->left() + num_kv_heads - 1) / num_kv_heads;
    for (int h = 0; h < num_kv_heads; ++h) {
      pf->Issue(per);
      Qk<Tag>(q + static_cast<int64_t>(h) * group * d, group, d, rows, h * head_stride, n,
              s + static_cast<int64_t>(h) * group * kChunk, row);
    }
  }

  static float Max(const float* s, int n) {
    float m = s[0];
    for (int i = 1; i < n; ++i) m = std::max(m, s[i]);
    return m;
  }

  // s[i] = exp(s[i] - m) for i < n; returns the sum.
  static float ExpSum(float* s, int n, float m) {
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) {
      s[i] = std::exp(s[i] - m);
      sum += s[i];
    }
    return sum;
  }
};

// ------------------------------------------------------------------ AVX2 + FMA + F16C

#if PREFIXKV_X86
#define PREFIXKV_AVX2 __attribute__((target("avx2,fma,f16c")))

template <class Tag>
struct AvxLoad;

// Load8: 8 elements as float32, times kUnit.
template <>
struct AvxLoad<F32Tag> {
  static constexpr float kUnit = 1.0f;
  PREFIXKV_AVX2 static inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
};

template <>
struct AvxLoad<BF16Tag> {
  static constexpr float kUnit = 1.0f;
  PREFIXKV_AVX2 static inline __m256 Load8(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

template <>
struct AvxLoad<F16Tag> {
  static constexpr float kUnit = 1.0f;
  PREFIXKV_AVX2 static inline __m256 Load8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

// Through half precision: the byte's exponent and mantissa bits moved under a half's (shifted
// by 7, sign to bit 15) give the value * 2^-8 exactly, subnormals included (F16C converts
// them exactly whatever MXCSR's DAZ says); 0x7f / 0xff (NaN) become a half NaN. Load8 returns
// value * kUnit (2^-8): the caller folds 2^8 into the scales (exact, a power of two).
template <>
struct AvxLoad<F8E4M3Tag> {
  static constexpr float kUnit = 1.0f / 256.0f;
  PREFIXKV_AVX2 static inline __m256 Load8(const uint8_t* p) {
    // sign-extended bytes << 7: bits 0-6 to 7-13, the sign to 14 and 15; bit 14 cleared
    const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(-16512));  // 0xbf80
    // bits 7-13 all set (NaN, 0x3f80) and only then: + 0x80 carries into bit 14, which
    // makes the half's exponent all ones (a NaN: its mantissa is not 0)
    const __m128i carry = _mm_and_si128(_mm_add_epi16(h, _mm_set1_epi16(0x80)),
                                        _mm_set1_epi16(0x4000));
    return _mm256_cvtph_ps(_mm_or_si128(h, carry));
  }
};

// Load16: 16 elements as two float32 vectors (times kUnit). kPairs false: in order
// (p[0..7], p[8..15]); true: the even elements, then the odd ones (bfloat16: one 32-byte load,
// a shift and a mask, where two Load8 take two widening loads and two shifts). Callers walking
// head_dim 16 at a time keep q and the accumulators in the same order (see Interleave16).
template <class Tag>
struct AvxLoad16 {
  static constexpr bool kPairs = false;
  PREFIXKV_AVX2 static inline void Load(const typename Tag::Storage* p, __m256* lo, __m256* hi) {
    *lo = AvxLoad<Tag>::Load8(p);
    *hi = AvxLoad<Tag>::Load8(p + 8);
  }
};

template <>
struct AvxLoad16<BF16Tag> {
  static constexpr bool kPairs = true;
  PREFIXKV_AVX2 static inline void Load(const uint16_t* p, __m256* lo, __m256* hi) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    *hi = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(-65536)));
  }
};

// 16 bytes at once: the integer steps of AvxLoad<F8E4M3Tag> on 16 lanes, two conversions.
template <>
struct AvxLoad16<F8E4M3Tag> {
  static constexpr bool kPairs = false;
  PREFIXKV_AVX2 static inline void Load(const uint8_t* p, __m256* lo, __m256* hi) {
    const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(-16512));
    const __m256i carry = _mm256_and_si256(_mm256_add_epi16(h, _mm256_set1_epi16(0x80)),
                                           _mm256_set1_epi16(0x4000));
    const __m256i x = _mm256_or_si256(h, carry);
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(x));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(x, 1));
  }
};

// [sum(a[0]), ..., sum(a[7])] of eight vectors.
PREFIXKV_AVX2 inline __m256 Reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  const __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  const __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // lanes: a0..a3 low halves | a0..a3 high halves
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) to ~1 ulp over [-87.3, 88.3] (inputs clamped there: exp of a very negative x is
// ~1e-38, not 0; callers zero what must be zero); NaN stays NaN (the clamps return their
// second operand, x, when it is NaN). Cephes' expf polynomial.
PREFIXKV_AVX2 inline __m256 Exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.37626f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// v[0..N) <- 8 * N elements of a cache row from p, as floats: 8 at a time (AvxLoad), or, Wide,
// 16 at a time in AvxLoad16's order (N even).
template <class Tag, int N, bool Wide>
PREFIXKV_AVX2 inline void LoadVecs(const typename Tag::Storage* p, __m256* v) {
  if constexpr (Wide) {
    static_assert(N % 2 == 0, "16 elements a load");
    _Pragma("GCC unroll 8") for (int j = 0; j < N / 2; ++j)
      AvxLoad16<Tag>::Load(p + 16 * j, &v[2 * j], &v[2 * j + 1]);
  } else {
    _Pragma("GCC unroll 8") for (int j = 0; j < N; ++j) v[j] = AvxLoad<Tag>::Load8(p + 8 * j);
  }
}

// NH q heads x NK keys (NH * NK == 8 accumulators): out[h * NK + k] = q_h . k_k. Wide: head_dim
// walked 16 at a time (head_dim % 16 == 0), q in AvxLoad16's order.
template <class Tag, int NH, int NK, bool Wide = false>
PREFIXKV_AVX2 inline void QkTile(const float* q, int d, const typename Tag::Storage* const* rows,
                                 float* out) {
  static_assert(NH * NK == 8, "eight accumulators");
  constexpr int P = Wide ? 2 : 1;  // vectors of 8 a step
  __m256 acc[8];
  _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8 * P) {
    __m256 kv[NK][P];
    _Pragma("GCC unroll 8") for (int k = 0; k < NK; ++k) LoadVecs<Tag, P, Wide>(rows[k] + i, kv[k]);
    _Pragma("GCC unroll 8") for (int h = 0; h < NH; ++h) {
      __m256 qv[P];
      _Pragma("GCC unroll 2") for (int j = 0; j < P; ++j) {
        qv[j] = _mm256_loadu_ps(q + static_cast<int64_t>(h) * d + i + 8 * j);
        // one load of q for the NK keys: without this the compiler folds the load into every
        // FMA, and the tile becomes bound by loads (10 per 8 FMAs instead of 6)
        __asm__("" : "+x"(qv[j]));
      }
      _Pragma("GCC unroll 8") for (int k = 0; k < NK; ++k)
        _Pragma("GCC unroll 2") for (int j = 0; j < P; ++j)
          acc[h * NK + k] = _mm256_fmadd_ps(qv[j], kv[k][j], acc[h * NK + k]);
    }
  }
  _mm256_storeu_ps(out, Reduce8(acc));
}

// q.k of every kv head's group, key tile by key tile: the chunk's K rows are read front to back
// (all kv heads of a row in order) instead of one head's slice of every row at a time. Head h
// of key row t is at key_rows[t] + h * head_stride.
// pf's lines are issued spread over the key tiles. Tile::Run(q of kNH heads, d, kNK key rows,
// out) writes the kNH x kNK dot products; the logits are those times `scale`. (No target
// attribute here: Tile::Run carries its instruction set, a call per tile.)
template <class Tile, class Q, class S>
void QkWalk(const Q* q, int num_kv_heads, int group, int d, int64_t head_stride,
            const S* const* key_rows, int n, float* s, Prefetch* pf, float scale) {
  constexpr int NH = Tile::kNH, NK = Tile::kNK;
  float out[NH * NK];
  const S* rows[NK];
  const int64_t steps = static_cast<int64_t>((n + NK - 1) / NK) * num_kv_heads;
  const int64_t per = (pf->left() + steps - 1) / steps;
  for (int t = 0; t < n; t += NK) {
    for (int h = 0; h < num_kv_heads; ++h) {
      pf->Issue(per);
      const int64_t head_off = h * head_stride;
      // a key tile past n repeats the last key (read, never stored)
      for (int k = 0; k < NK; ++k) rows[k] = key_rows[std::min(t + k, n - 1)] + head_off;
      for (int g = 0; g < group; g += NH) {
        Tile::Run(q + (static_cast<int64_t>(h) * group + g) * d, d, rows, out);
        float* sg = s + (static_cast<int64_t>(h) * group + g) * kChunk;
        for (int hh = 0; hh < NH; ++hh)
          for (int k = 0; k < NK && t + k < n; ++k)
            sg[hh * kChunk + t + k] = out[hh * NK + k] * scale;
      }
    }
  }
}

template <class Tag, int NH, int NK, bool Wide = false>
struct Avx2QkTile {
  static constexpr int kNH = NH, kNK = NK;
  PREFIXKV_AVX2 static void Run(const float* q, int d, const typename Tag::Storage* const* rows,
                                float* out) {
    QkTile<Tag, NH, NK, Wide>(q, d, rows, out);
  }
};

// acc[h][i + 8j] += sum_t p[h][t] v_t[i + 8j] for NH heads, NDV vectors of head_dim at i
// (Wide: read 16 at a time, the accumulators in AvxLoad16's order).
template <class Tag, int NH, int NDV, bool Wide = false>
PREFIXKV_AVX2 inline void PvTile(const float* p, int d, int i,
                                 const typename Tag::Storage* const* rows, int64_t head_off,
                                 int n, float* acc) {
  __m256 a[NH][NDV];
  _Pragma("GCC unroll 8") for (int h = 0; h < NH; ++h)
    _Pragma("GCC unroll 8") for (int j = 0; j < NDV; ++j) a[h][j] = _mm256_loadu_ps(acc + static_cast<int64_t>(h) * d + i + 8 * j);
  for (int t = 0; t < n; ++t) {
    __m256 vv[NDV];
    LoadVecs<Tag, NDV, Wide>(rows[t] + head_off + i, vv);
    _Pragma("GCC unroll 8") for (int h = 0; h < NH; ++h) {
      const __m256 ph = _mm256_broadcast_ss(p + h * kChunk + t);
      _Pragma("GCC unroll 8") for (int j = 0; j < NDV; ++j) a[h][j] = _mm256_fmadd_ps(ph, vv[j], a[h][j]);
    }
  }
  _Pragma("GCC unroll 8") for (int h = 0; h < NH; ++h)
    _Pragma("GCC unroll 8") for (int j = 0; j < NDV; ++j) _mm256_storeu_ps(acc + static_cast<int64_t>(h) * d + i + 8 * j, a[h][j]);
}

template <class Tag, int NH, int NDV>
PREFIXKV_AVX2 void PvGroup(const float* p, int group, int d,
                           const typename Tag::Storage* const* rows, int64_t head_off, int n,
                           float* acc) {
  for (int g = 0; g < group; g += NH) {
    const float* pg = p + g * kChunk;
    float* ag = acc + static_cast<int64_t>(g) * d;
    int i = 0;
    for (; i + 8 * NDV <= d; i += 8 * NDV)
      PvTile<Tag, NH, NDV>(pg, d, i, rows, head_off, n, ag);
    for (; i < d; i += 8) PvTile<Tag, NH, 1>(pg, d, i, rows, head_off, n, ag);
  }
}

struct Avx2 {
  static constexpr bool kDp = false;  // see Avx512Bf16
  // What the inner loops read a cache element as, over its value.
  template <class Tag>
  static constexpr float Unit() { return AvxLoad<Tag>::kUnit; }

  // head_dim walked 16 at a time (AvxLoad16) for groups of 4 heads.
  static bool Wide(int group, int d) { return group % 4 == 0 && d % 16 == 0; }
  // q and the accumulators in Interleave16's order.
  template <class Tag>
  static bool Interleaved(int group, int d) { return AvxLoad16<Tag>::kPairs && Wide(group, d); }

  template <class Tag>
  static void QkAll(const float* q, int num_kv_heads, int group, int d, int64_t hs,
                    const typename Tag::Storage* const* rows, int n, float* s, float*,
                    Prefetch* pf) {
    if (Wide(group, d))
      QkWalk<Avx2QkTile<Tag, 4, 2, true>>(q, num_kv_heads, group, d, hs, rows, n, s, pf, 1.0f);
    else if (group % 4 == 0)
      QkWalk<Avx2QkTile<Tag, 4, 2>>(q, num_kv_heads, group, d, hs, rows, n, s, pf, 1.0f);
    else if (group % 2 == 0)
      QkWalk<Avx2QkTile<Tag, 2, 4>>(q, num_kv_heads, group, d, hs, rows, n, s, pf, 1.0f);
    else
      QkWalk<Avx2QkTile<Tag, 1, 8>>(q, num_kv_heads, group, d, hs, rows, n, s, pf, 1.0f);
  }

  template <class Tag>
  static void Pv(const float* p, int group, int d, const typename Tag::Storage* const* rows,
                 int64_t head_off, int n, float* acc, float*, Prefetch* pf, int64_t lines) {
    if (Wide(group, d)) {
      const int64_t tiles = (group / 4) * (d / 16);
      const int64_t per = (lines + tiles - 1) / tiles;
      for (int g = 0; g < group; g += 4)
        for (int i = 0; i < d; i += 16) {
          pf->Issue(per);
          PvTile<Tag, 4, 2, true>(p + g * kChunk, d, i, rows, head_off, n,
                                  acc + static_cast<int64_t>(g) * d);
        }
      return;
    }
    pf->Issue(lines);
    if (group % 4 == 0) PvGroup<Tag, 4, 2>(p, group, d, rows, head_off, n, acc);
    else if (group % 2 == 0) PvGroup<Tag, 2, 4>(p, group, d, rows, head_off, n, acc);
    else PvGroup<Tag, 1, 8>(p, group, d, rows, head_off, n, acc);
  }

  PREFIXKV_AVX2 static float Max(const float* s, int n) {
    __m256 m = _mm256_set1_ps(s[0]);
    int i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + i));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    float r = _mm_cvtss_f32(h);
    for (; i < n; ++i) r = std::max(r, s[i]);
    return r;
  }

  PREFIXKV_AVX2 static float ExpSum(float* s, int n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv));
      _mm256_storeu_ps(s + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (i < n) {  // tail: lanes past n contribute 0 and are not stored
      float tmp[8];
      for (int j = 0; j < 8; ++j) tmp[j] = i + j < n ? s[i + j] : m;
      const __m256 live = _mm256_cmp_ps(
          _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(static_cast<float>(n - i)),
          _CMP_LT_OQ);
      const __m256 e =
          _mm256_and_ps(Exp8(_mm256_sub_ps(_mm256_loadu_ps(tmp), mv)), live);
      _mm256_storeu_ps(tmp, e);
      for (int j = 0; i + j < n; ++j) s[i + j] = tmp[j];
      sum = _mm256_add_ps(sum, e);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
  }
};

bool CpuHasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

// ------------------------------------------------------------------ AVX512-BF16 q.k

// bfloat16 q and caches on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids and later): q.k by
// vdpbf16ps, 32 bfloat16 pairs a step straight from q and the K rows (no conversion to
// float32; the products are exact in float32 and summed in float32, as the FMA loops do, only
// in another order), the logits' scale applied to the sums. Two differences from the AVX2 loops, both past any real activation: a bfloat16
// subnormal (below 1.2e-38) counts as 0, and a q.k past float32's range before the scale is
// +-inf (the AVX2 loops scale q first). Measured on decode 8 x 4096 (Zen 4, one thread, the
// kernel alone, interleaved A/B, min of 18): 10.6 -> 9.5 ms; two threads 5.5 -> 5.0 ms. NH x NK
// tiles of 2 x 4 and 4 x 2 ran the same. PREFIXKV_CPU_AVX512=0 turns it off (tests).
//
// p.V by vdpbf16ps as well (p rounded to bfloat16 pairs, as FlashAttention rounds p to v's
// dtype) ran 9.3 -> 8.4 ms, but its error grows with |V| (not with the output): V of standard
// deviation 10 broke the bfloat16 tolerance in 9 of 24576 outputs, 100 in 494, where these
// loops break it in none. Not kept.
#if defined(__clang__) ? __clang_major__ >= 9 : __GNUC__ >= 10  // compilers that know it
#define PREFIXKV_DP 1
#define PREFIXKV_AVX512BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512bf16")))

// NH q heads x NK keys (8 accumulators): out[h * NK + k] = q_h . k_k, head_dim % 32 == 0.
template <int NH, int NK>
PREFIXKV_AVX512BF16 inline void QkTileDp(const uint16_t* q, int d, const uint16_t* const* rows,
                                         float* out) {
  static_assert(NH * NK == 8, "eight accumulators");
  __m512 acc[8];
  _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
  for (int i = 0; i < d; i += 32) {
    __m512bh kv[NK];
    _Pragma("GCC unroll 8") for (int k = 0; k < NK; ++k)
      kv[k] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(rows[k] + i));
    _Pragma("GCC unroll 8") for (int h = 0; h < NH; ++h) {
      const __m512bh qv =
          reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + static_cast<int64_t>(h) * d + i));
      _Pragma("GCC unroll 8") for (int k = 0; k < NK; ++k)
        acc[h * NK + k] = _mm512_dpbf16_ps(acc[h * NK + k], qv, kv[k]);
    }
  }
  __m256 half[8];
  _Pragma("GCC unroll 8") for (int i = 0; i < 8; ++i)
    half[i] = _mm256_add_ps(_mm512_castps512_ps256(acc[i]),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1)));
  _mm256_storeu_ps(out, Reduce8(half));
}

template <int NH, int NK>
struct DpQkTile {
  static constexpr int kNH = NH, kNK = NK;
  PREFIXKV_AVX512BF16 static void Run(const uint16_t* q, int d, const uint16_t* const* rows,
                                      float* out) {
    QkTileDp<NH, NK>(q, d, rows, out);
  }
};

// The AVX2 loops, with q.k by DpQkTile tiles: RunRaw picks it for bfloat16 q and caches with
// head_dim % 32 == 0 only.
struct Avx512Bf16 : Avx2 {
  static constexpr bool kDp = true;
  static void QkDp(const uint16_t* q, int num_kv_heads, int group, int d, int64_t hs,
                   const uint16_t* const* rows, int n, float* s, Prefetch* pf, float scale) {
    if (group % 2 == 0)
      QkWalk<DpQkTile<2, 4>>(q, num_kv_heads, group, d, hs, rows, n, s, pf, scale);
    else
      QkWalk<DpQkTile<1, 8>>(q, num_kv_heads, group, d, hs, rows, n, s, pf, scale);
  }
};

bool CpuHasAvx512Bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  const char* env = std::getenv("PREFIXKV_CPU_AVX512");  // read per call: tests flip it
  return has && !(env != nullptr && std::strcmp(env, "0") == 0);
}
#else
#define PREFIXKV_DP 0
#endif  // AVX512-BF16 compilers
#else
bool CpuHasAvx2() { return false; }
#endif  // PREFIXKV_X86

// ------------------------------------------------------------------ the walk

struct Shape {
  int64_t num_seqs, num_q_heads, head_dim, num_blocks, block_size, num_kv_heads, max_blocks;
  // Elements from one block of a cache to the next (0: block_size * num_kv_heads * head_dim,
  // a dense cache; more for a view of a stacked [num_blocks, 2, ...] cache).
  int64_t block_stride = 0;
  // Elements from one token of a block to the next and from one kv head of a token to the
  // next (0: NHD's num_kv_heads * head_dim and head_dim; HND: head_dim and block_size *
  // head_dim). A head's head_dim elements are dense.
  int64_t token_stride = 0, head_stride = 0;
};

// Scalar arguments of a call: the logits' scale, the sliding window (0: none), the soft cap
// (0: none) and the fp8 caches' scales (1 for the others).
struct Params {
  float scale = 1.0f;
  int64_t window = 0;
  float cap = 0.0f;
  float k_scale = 1.0f, v_scale = 1.0f;
  // non-null: the output is float32 here, not q's type (a 16-bit q's cascade own part, kept
  // unrounded for its merge with the prefix part); `out` is then not written
  float* out32 = nullptr;
};

// x[16j .. 16j + 15] reordered to its even elements, then its odd ones, for every j (n % 16
// == 0; tmp holds 16 floats): the order AvxLoad16<BF16Tag> reads a cache row's elements in;
// ``back``: the inverse.
inline void Interleave16(float* x, int64_t n, float* tmp, bool back = false) {
  for (int64_t j = 0; j < n; j += 16) {
    for (int i = 0; i < 8; ++i) {
      if (back) {
        tmp[2 * i] = x[j + i];
        tmp[2 * i + 1] = x[j + 8 + i];
      } else {
        tmp[i] = x[j + 2 * i];
        tmp[8 + i] = x[j + 2 * i + 1];
      }
    }
    std::memcpy(x + j, tmp, 16 * sizeof(float));
  }
}

// Tag: q and out's element type; KvTag: the caches'.
template <class Tag, class KvTag, class Ops>
void DecodeAttention(const Shape& sh, const typename Tag::Storage* q,
                     const typename KvTag::Storage* kc, const typename KvTag::Storage* vc,
                     const int32_t* tables, const int32_t* kv_lens, typename Tag::Storage* out,
                     float* lse, const Params& prm) {
  using S = typename KvTag::Storage;
  using QS = typename Tag::Storage;
  // (scale q) . (k_scale k) with k read as k * unit (a power of two): exact folds
  const float unit = Ops::template Unit<KvTag>();
  const float scale = prm.scale * prm.k_scale / unit;
  const float acc_unit = 1.0f / unit;  // acc * acc_unit * (v_scale / l): no overflow of v_scale
  const int64_t window = prm.window;
  const float cap = prm.cap;
  const int hq = static_cast<int>(sh.num_q_heads);
  const int hkv = static_cast<int>(sh.num_kv_heads);
  const int d = static_cast<int>(sh.head_dim);
  const int group = hq / hkv;
  const int64_t bs = sh.block_size;
  const int64_t row_elems = sh.num_kv_heads * sh.head_dim;  // a key's elements, all heads
  // elements between key rows (tokens) and between a key's heads
  const int64_t row_stride = sh.token_stride > 0 ? sh.token_stride : row_elems;
  const int64_t head_stride = sh.head_stride > 0 ? sh.head_stride : sh.head_dim;
  const int64_t block_step = sh.block_stride > 0 ? sh.block_stride : bs * row_elems;
  std::vector<float> qf(static_cast<size_t>(hq) * d), acc(static_cast<size_t>(hq) * d);
  std::vector<float> m(hq), l(hq), s(static_cast<size_t>(hq) * kChunk), row(d);
  // this chunk's rows and the next one's
  std::vector<const S*> krows(kChunk), vrows(kChunk), next_krows(kChunk), next_vrows(kChunk);
  Prefetch pf;
  // Keys per chunk: the chunk's K rows (all kv heads) span about kChunkBytes<S>; the chunk is
  // walked once per kv head.
  const int64_t key_row_bytes = std::max<int64_t>(1, row_elems * static_cast<int64_t>(sizeof(S)));
  const int64_t chunk =
      std::max<int64_t>(1, std::min<int64_t>(kChunk, kChunkBytes<S> / key_row_bytes));
  // a key row's bytes as the prefetcher walks them: one segment when its heads are dense
  const bool dense_heads = head_stride == sh.head_dim;
  auto prefetch_rows = [&](const S* const* rows, int n) {
    if (dense_heads)
      pf.Reset(rows, n, key_row_bytes);
    else
      pf.Reset(rows, n, sh.head_dim * static_cast<int64_t>(sizeof(S)), hkv,
               head_stride * static_cast<int64_t>(sizeof(S)));
  };
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool interleaved = Ops::template Interleaved<KvTag>(group, d);
  // q.k by AVX512-BF16 dot products from the bfloat16 q itself (Avx512Bf16)
  constexpr bool dp = Ops::kDp;
  static_assert(!dp || (std::is_same_v<Tag, BF16Tag> && std::is_same_v<KvTag, BF16Tag>),
                "Avx512Bf16 runs bfloat16 q and caches only");

  for (int64_t seq = 0; seq < sh.num_seqs; ++seq) {
    const QS* qs = q + seq * hq * d;
    QS* os = out + seq * hq * d;
    float* os32 = prm.out32 != nullptr ? prm.out32 + seq * hq * d : nullptr;
    auto put = [&](int64_t i, float x) {
      if (os32 != nullptr)
        os32[i] = x;
      else
        os[i] = Tag::FromF32(x);
    };
    float* ls = lse + seq * hq;
    const int64_t kv_len = std::max<int64_t>(kv_lens[seq], 0);
    const int64_t lo = window > 0 ? std::max<int64_t>(kv_len - window, 0) : 0;
    if (kv_len == 0 || sh.max_blocks == 0 || sh.num_blocks == 0) {
      for (int64_t i = 0; i < static_cast<int64_t>(hq) * d; ++i) put(i, 0.0f);
      for (int h = 0; h < hq; ++h) ls[h] = neg_inf;
      continue;
    }
    if constexpr (!dp) {
      for (int64_t i = 0; i < static_cast<int64_t>(hq) * d; ++i)
        qf[i] = Tag::ToF32(qs[i]) * scale;
      if (interleaved) Interleave16(qf.data(), hq * d, row.data());
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(m.begin(), m.end(), neg_inf);
    std::fill(l.begin(), l.end(), 0.0f);
    const int32_t* table = tables + seq * sh.max_blocks;
    auto block_base = [&](int64_t b) {
      const int64_t tb = std::min<int64_t>(b, sh.max_blocks - 1);
      const int64_t id = std::min<int64_t>(std::max<int64_t>(table[tb], 0), sh.num_blocks - 1);
      return id * block_step;
    };
    // the K and V row pointers of keys [c, c + n)
    auto fill_rows = [&](int64_t c, int n, const S** kr, const S** vr) {
      for (int t = 0; t < n;) {
        const int64_t b = (c + t) / bs;
        const int64_t base = block_base(b);
        const int64_t end = std::min<int64_t>(n, (b + 1) * bs - c);  // this block's keys
        for (int64_t off = base + ((c + t) - b * bs) * row_stride; t < end;
             ++t, off += row_stride) {
          kr[t] = kc + off;
          vr[t] = vc + off;
        }
      }
    };
    fill_rows(lo, static_cast<int>(std::min<int64_t>(chunk, kv_len - lo)), krows.data(),
              vrows.data());
    // chunks of kChunk consecutive keys [c, c + n), across block boundaries
    for (int64_t c = lo; c < kv_len; c += chunk) {
      const int n = static_cast<int>(std::min<int64_t>(chunk, kv_len - c));
      prefetch_rows(vrows.data(), n);  // this chunk's V rows, during q.k
      if constexpr (dp)
        Ops::QkDp(qs, hkv, group, d, head_stride, krows.data(), n, s.data(), &pf, scale);
      else
        Ops::template QkAll<KvTag>(qf.data(), hkv, group, d, head_stride, krows.data(), n,
                                   s.data(), row.data(), &pf);
      const int next_n = static_cast<int>(std::max<int64_t>(
          0, std::min<int64_t>(chunk, kv_len - c - chunk)));
      fill_rows(c + chunk, next_n, next_krows.data(), next_vrows.data());
      prefetch_rows(next_krows.data(), next_n);  // the next chunk's K, during p.V
      const int64_t per_head = (pf.left() + hkv - 1) / hkv;
      for (int h = 0; h < hkv; ++h) {
        const int64_t head_off = h * head_stride;  // in the cache
        float* ah = acc.data() + static_cast<int64_t>(h) * d * group;
        float* mh = m.data() + h * group;
        float* lh = l.data() + h * group;
        float* sh_ = s.data() + static_cast<int64_t>(h) * group * kChunk;
        for (int g = 0; g < group; ++g) {
          float* sg = sh_ + g * kChunk;
          if (cap > 0.0f)
            for (int t = 0; t < n; ++t) sg[t] = cap * std::tanh(sg[t] / cap);
          const float m_new = std::max(mh[g], Ops::Max(sg, n));
          if (m_new > mh[g]) {  // rescale only when the running max grew
            const float alpha = std::exp(mh[g] - m_new);  // 0 for the first chunk
            float* a = ah + static_cast<int64_t>(g) * d;
            for (int i = 0; i < d; ++i) a[i] *= alpha;
            lh[g] *= alpha;
            mh[g] = m_new;
          }
          lh[g] += Ops::ExpSum(sg, n, mh[g]);
        }
        Ops::template Pv<KvTag>(sh_, group, d, vrows.data(), head_off, n, ah, row.data(), &pf,
                                per_head);
      }
      krows.swap(next_krows);
      vrows.swap(next_vrows);
    }
    if (interleaved) Interleave16(acc.data(), hq * d, row.data(), /*back=*/true);
    for (int h = 0; h < hq; ++h) {
      // Keys were walked, so a running max of +-inf means a logit past float32's range
      // (+inf: an answer skipping that key, lse +inf, which a merge reads as an empty state;
      // -inf everywhere: exp(-inf - -inf), whatever the vector exp makes of NaN): NaN. A NaN
      // logit (a NaN in a K row read) makes the sum NaN (the lanes' max may drop it, the
      // exp keeps it): NaN too, never an answer that skips that key.
      if (m[h] == -neg_inf || m[h] == neg_inf || std::isnan(m[h]) || std::isnan(l[h])) {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        for (int i = 0; i < d; ++i) put(h * d + i, nan);
        ls[h] = nan;
        continue;
      }
      const bool seen = l[h] > 0.0f;
      const float inv = seen ? prm.v_scale / l[h] : 0.0f;
      for (int i = 0; i < d; ++i) put(h * d + i, acc[h * d + i] * acc_unit * inv);
      ls[h] = seen ? m[h] + std::log(l[h]) : neg_inf;
    }
  }
}

// run(0), ..., run(parts - 1), on the calling thread and on `helpers` tasks handed to
// schedule(task): every participant takes the next part until none is left, and the call
// returns when all parts are done. A task that starts after that finds no part and returns
// without touching the caller's state (it holds only the shared counters), so a pool that is
// busy or slow to start tasks never blocks the call: the calling thread does the parts itself.
template <class Schedule>
void ParallelFor(int64_t parts, int64_t helpers, const std::function<void(int64_t)>& run,
                 Schedule&& schedule) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t parts = 0;
    const std::function<void(int64_t)>* run = nullptr;
  };
  auto shared = std::make_shared<Shared>();
  shared->parts = parts;
  shared->run = &run;
  auto drain = [shared] {
    for (int64_t p; (p = shared->next.fetch_add(1)) < shared->parts;) {
      (*shared->run)(p);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 0; i < helpers; ++i) schedule(drain);
  drain();
  while (shared->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// Sequences split over up to `threads` participants (ParallelFor) in contiguous ranges of
// about equal keys; each sequence is computed exactly as on one thread, so the result does not
// depend on the thread count.
template <class Tag, class KvTag, class Ops, class Schedule>
void DecodeParallel(int64_t threads, Schedule&& schedule, const Shape& sh,
                    const typename Tag::Storage* q, const typename KvTag::Storage* kc,
                    const typename KvTag::Storage* vc, const int32_t* tables,
                    const int32_t* kv_lens, typename Tag::Storage* out, float* lse,
                    const Params& prm) {
  const int64_t n = sh.num_seqs;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (parts == 1) {
    DecodeAttention<Tag, KvTag, Ops>(sh, q, kc, vc, tables, kv_lens, out, lse, prm);
    return;
  }
  // range boundaries at equal shares of the keys (a sequence counts at least one)
  std::vector<int64_t> cum(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i)
    cum[i + 1] = cum[i] + std::max<int64_t>(1, std::max<int64_t>(kv_lens[i], 0));
  std::vector<int64_t> bound(static_cast<size_t>(parts) + 1, n);
  bound[0] = 0;
  for (int64_t p = 1, i = 0; p < parts; ++p) {
    const int64_t target = cum[n] * p / parts;
    while (i < n && cum[i] < target) ++i;
    bound[p] = std::max(bound[p - 1], i);
  }
  const int64_t qs = sh.num_q_heads * sh.head_dim;
  const std::function<void(int64_t)> run = [&](int64_t p) {
    const int64_t s0 = bound[p], s1 = bound[p + 1];
    if (s1 <= s0) return;
    Shape sub = sh;
    sub.num_seqs = s1 - s0;
    Params part = prm;
    if (prm.out32 != nullptr) part.out32 = prm.out32 + s0 * qs;
    DecodeAttention<Tag, KvTag, Ops>(sub, q + s0 * qs, kc, vc, tables + s0 * sh.max_blocks,
                                     kv_lens + s0, out + s0 * qs, lse + s0 * sh.num_q_heads,
                                     part);
  };
  ParallelFor(parts, parts - 1, run, schedule);
}

template <class Tag, class KvTag, class Schedule>
void RunRaw(bool portable, int64_t threads, Schedule&& schedule, const Shape& sh, const void* q,
            const void* k, const void* v, const int32_t* tables, const int32_t* kv_lens,
            void* out, float* lse, const Params& prm) {
  using S = typename Tag::Storage;
  using KS = typename KvTag::Storage;
  const S* qp = static_cast<const S*>(q);
  const KS* kp = static_cast<const KS*>(k);
  const KS* vp = static_cast<const KS*>(v);
  S* op = static_cast<S*>(out);
#if PREFIXKV_X86
#if PREFIXKV_DP
  if constexpr (std::is_same_v<Tag, BF16Tag> && std::is_same_v<KvTag, BF16Tag>) {
    if (!portable && sh.head_dim % 32 == 0 && CpuHasAvx2() && CpuHasAvx512Bf16()) {
      DecodeParallel<Tag, KvTag, Avx512Bf16>(threads, schedule, sh, qp, kp, vp, tables, kv_lens,
                                             op, lse, prm);
      return;
    }
  }
#endif
  if (!portable && sh.head_dim % 8 == 0 && CpuHasAvx2()) {
    DecodeParallel<Tag, KvTag, Avx2>(threads, schedule, sh, qp, kp, vp, tables, kv_lens, op, lse,
                                     prm);
    return;
  }
#endif
  DecodeParallel<Tag, KvTag, Portable>(threads, schedule, sh, qp, kp, vp, tables, kv_lens, op,
                                       lse, prm);
}

// RunRaw with caches of q's element type or of float8_e4m3fn (fp8).
template <class Tag, class Schedule>
void RunKv(bool fp8, bool portable, int64_t threads, Schedule&& schedule, const Shape& sh,
           const void* q, const void* k, const void* v, const int32_t* tables,
           const int32_t* kv_lens, void* out, float* lse, const Params& prm) {
  if (fp8)
    RunRaw<Tag, F8E4M3Tag>(portable, threads, schedule, sh, q, k, v, tables, kv_lens, out, lse,
                           prm);
  else
    RunRaw<Tag, Tag>(portable, threads, schedule, sh, q, k, v, tables, kv_lens, out, lse, prm);
}

// RunKv on up to `threads` std::threads (the calling one included), all joined before it
// returns; a thread that cannot be started leaves its share to the others.
template <class Tag>
void RunOnThreads(bool fp8, bool portable, int64_t threads, const Shape& sh, const void* q,
                  const void* k, const void* v, const int32_t* tables, const int32_t* kv_lens,
                  void* out, float* lse, const Params& prm) {
  std::vector<std::thread> pool;
  auto schedule = [&pool](std::function<void()> task) {
    try {
      pool.emplace_back(std::move(task));
    } catch (...) {  // no thread: the calling thread takes its parts
    }
  };
  RunKv<Tag>(fp8, portable, threads, schedule, sh, q, k, v, tables, kv_lens, out, lse, prm);
  for (auto& t : pool) t.join();
}

#ifndef PREFIXKV_NO_XLA_FFI
template <class Tag>
void Dispatch(bool fp8, bool portable, ffi::ThreadPool& pool, const Shape& sh,
              const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
              const int32_t* tables, const int32_t* kv_lens, ffi::AnyBuffer* out, float* lse,
              const Params& prm) {
  // the sequences over XLA:CPU's intra-op pool (its size: NPROC / the PjRt client's threads)
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  auto schedule = [&pool](std::function<void()> task) { pool.Schedule(std::move(task)); };
  RunKv<Tag>(fp8, portable, threads, schedule, sh, q.untyped_data(), k.untyped_data(),
             v.untyped_data(), tables, kv_lens, out->untyped_data(), lse, prm);
}

// kv_scales: null (caches of q's type), or [k_scale, v_scale] for float8_e4m3fn caches.
ffi::Error DecodeImpl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                      ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> kv_lens,
                      const float* kv_scales, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                      int64_t sliding_window, float logits_soft_cap, int64_t portable,
                      int64_t hnd, ffi::ThreadPool pool) {
  auto qd = q.dimensions();
  auto kd = k_cache.dimensions();
  auto td = block_tables.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument("paged_attention_decode: bad ranks");
  const auto dtype = q.element_type();
  const bool fp8 = kv_scales != nullptr;
  const auto kv_dtype = fp8 ? ffi::DataType::F8E4M3FN : dtype;
  // out: q's dtype, or float32 (a 16-bit q's partial result, unrounded for a merge)
  if (k_cache.element_type() != kv_dtype || v_cache.element_type() != kv_dtype ||
      (out->element_type() != dtype && out->element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument(
        fp8 ? "paged_attention_decode_fp8: caches must be float8_e4m3fn, out q's dtype or "
              "float32"
            : "paged_attention_decode: dtypes differ");
  // hnd: caches [num_blocks, num_kv_heads, block_size, head_dim]
  Shape sh{qd[0], qd[1], qd[2], kd[0], hnd ? kd[2] : kd[1], hnd ? kd[1] : kd[2], td[1]};
  if (hnd) {
    sh.token_stride = kd[3];
    sh.head_stride = kd[2] * kd[3];
  }
  auto vd = v_cache.dimensions();
  for (size_t i = 0; i < 4; ++i)
    if (vd[i] != kd[i])
      return ffi::Error::InvalidArgument("paged_attention_decode: k and v caches differ");
  if (kd[3] != sh.head_dim || sh.head_dim < 1 || sh.num_kv_heads < 1 || sh.block_size < 1 ||
      sh.num_q_heads % sh.num_kv_heads != 0 || td[0] != sh.num_seqs || static_cast<int64_t>(kv_lens.element_count()) != sh.num_seqs ||
      out->element_count() != q.element_count() ||
      static_cast<int64_t>(lse->element_count()) != sh.num_seqs * sh.num_q_heads)
    return ffi::Error::InvalidArgument("paged_attention_decode: shapes do not match");
  const int32_t* tables = block_tables.typed_data();
  const int32_t* lens = kv_lens.typed_data();
  float* lp = lse->typed_data();
  const bool port = portable != 0;
  ffi::AnyBuffer* op = &(*out);
  Params prm;
  prm.scale = scale;
  prm.window = sliding_window;
  prm.cap = logits_soft_cap;
  if (fp8) {
    prm.k_scale = kv_scales[0];
    prm.v_scale = kv_scales[1];
  }
  if (out->element_type() != dtype) prm.out32 = static_cast<float*>(out->untyped_data());
  switch (dtype) {
    case ffi::DataType::F32:
      Dispatch<F32Tag>(fp8, port, pool, sh, q, k_cache, v_cache, tables, lens, op, lp, prm);
      break;
    case ffi::DataType::BF16:
      Dispatch<BF16Tag>(fp8, port, pool, sh, q, k_cache, v_cache, tables, lens, op, lp, prm);
      break;
    case ffi::DataType::F16:
      Dispatch<F16Tag>(fp8, port, pool, sh, q, k_cache, v_cache, tables, lens, op, lp, prm);
      break;
    default:
      return ffi::Error::InvalidArgument(
          "paged_attention_decode: dtype must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error PagedAttentionDecodeImpl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                    ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> block_tables,
                                    ffi::Buffer<ffi::S32> kv_lens,
                                    ffi::Result<ffi::AnyBuffer> out,
                                    ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                                    int64_t sliding_window, float logits_soft_cap,
                                    int64_t portable, int64_t hnd, ffi::ThreadPool pool) {
  return DecodeImpl(q, k_cache, v_cache, block_tables, kv_lens, nullptr, out, lse, scale,
                    sliding_window, logits_soft_cap, portable, hnd, pool);
}

// The same over float8_e4m3fn caches, their scales in a f32[2] operand (traced values).
ffi::Error PagedAttentionDecodeFp8Impl(ffi::AnyBuffer q, ffi::AnyBuffer k_cache,
                                       ffi::AnyBuffer v_cache,
                                       ffi::Buffer<ffi::S32> block_tables,
                                       ffi::Buffer<ffi::S32> kv_lens,
                                       ffi::Buffer<ffi::F32> kv_scales,
                                       ffi::Result<ffi::AnyBuffer> out,
                                       ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale,
                                       int64_t sliding_window, float logits_soft_cap,
                                       int64_t portable, int64_t hnd,
                                       ffi::ThreadPool pool) {
  if (kv_scales.element_count() != 2)
    return ffi::Error::InvalidArgument("paged_attention_decode_fp8: kv_scales must be f32[2]");
  return DecodeImpl(q, k_cache, v_cache, block_tables, kv_lens, kv_scales.typed_data(), out,
                    lse, scale, sliding_window, logits_soft_cap, portable, hnd, pool);
}

#endif  // PREFIXKV_NO_XLA_FFI

}  // namespace

// Plain C entry (no XLA): the same kernel on raw buffers, for the PyTorch CPU path
// (kernels/cpu/decode.py, through ctypes). dims: num_seqs, num_q_heads, head_dim, num_blocks,
// block_size, num_kv_heads, max_blocks, block_stride, token_stride, head_stride (the caches'
// strides in elements between blocks, a block's tokens, a token's kv heads; 0: NHD's dense
// ones; with token_stride and head_stride 0, block_stride is 0 or at least a block's
// elements; each head's head_dim elements dense); dtype (q's and out's): 0 float32, 1 bfloat16,
// 2 float16; kv_dtype (the caches'): dtype, or 3 float8_e4m3fn read as value * k_scale
// (v_scale); threads: the most threads to split the sequences over; out_f32: out is float32
// whatever q's dtype (a 16-bit q's partial result, unrounded for a merge). Returns 0, or 1
// for a bad dtype or shape.
extern "C" int PrefixkvDecodeAttentionRaw(int dtype, const int64_t* dims, const void* q,
                                          const void* k_cache, const void* v_cache,
                                          const int32_t* block_tables, const int32_t* kv_lens,
                                          void* out, float* lse, float scale,
                                          int64_t sliding_window, float logits_soft_cap,
                                          int portable, int threads, int kv_dtype,
                                          float k_scale, float v_scale, int out_f32) {
  Shape sh{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8],
           dims[9]};
  if (sh.num_kv_heads < 1 || sh.num_q_heads % sh.num_kv_heads != 0 || sh.head_dim < 1 ||
      sh.block_size < 1)  // positions divide by it
    return 1;
  if (sh.block_stride < 0 || sh.token_stride < 0 || sh.head_stride < 0) return 1;
  if (sh.token_stride == 0 && sh.head_stride == 0 && sh.block_stride != 0 &&
      sh.block_stride < sh.block_size * sh.num_kv_heads * sh.head_dim)
    return 1;  // dense blocks would overlap
  if (kv_dtype != dtype && kv_dtype != 3) return 1;
  const bool fp8 = kv_dtype == 3;
  const bool port = portable != 0;
  Params prm;
  prm.scale = scale;
  prm.window = sliding_window;
  prm.cap = logits_soft_cap;
  if (fp8) {
    prm.k_scale = k_scale;
    prm.v_scale = v_scale;
  }
  if (out_f32 != 0) prm.out32 = static_cast<float*>(out);
  switch (dtype) {
    case 0:
      RunOnThreads<F32Tag>(fp8, port, threads, sh, q, k_cache, v_cache, block_tables, kv_lens,
                           out, lse, prm);
      return 0;
    case 1:
      RunOnThreads<BF16Tag>(fp8, port, threads, sh, q, k_cache, v_cache, block_tables, kv_lens,
                            out, lse, prm);
      return 0;
    case 2:
      RunOnThreads<F16Tag>(fp8, port, threads, sh, q, k_cache, v_cache, block_tables, kv_lens,
                           out, lse, prm);
      return 0;
    default:
      return 1;
  }
}

#ifndef PREFIXKV_NO_XLA_FFI
namespace {
// The decode handlers' results, attributes and context after their operands.
template <class Binding>
auto DecodeResultsAndAttrs(Binding b) {
  return std::move(b).template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<float>("scale")
      .template Attr<int64_t>("sliding_window")
      .template Attr<float>("logits_soft_cap")
      .template Attr<int64_t>("portable")
      .template Attr<int64_t>("hnd")
      .template Ctx<ffi::ThreadPool>();
}

// q, k_cache, v_cache, block_tables, kv_lens
auto DecodeOperands() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvPagedAttentionDecode, PagedAttentionDecodeImpl,
                              DecodeResultsAndAttrs(DecodeOperands()));

// the same operands, then kv_scales f32[2]
XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvPagedAttentionDecodeFp8, PagedAttentionDecodeFp8Impl,
                              DecodeResultsAndAttrs(
                                  DecodeOperands().Arg<ffi::Buffer<ffi::F32>>()));
#endif  // PREFIXKV_NO_XLA_FFI
