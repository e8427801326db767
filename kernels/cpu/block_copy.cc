// Whole-block copies between host buffers, one pass, for the PyTorch frontend's CPU cache
// ops (swap_blocks, copy_blocks, gather_blocks, scatter_blocks), called through ctypes on raw
// addresses (kernels/cpu/block_copy.py).
//
// For each cache c and each pair i: block dst_ids[i] of dst[c] = block src_ids[i] of src[c],
// block_bytes[c] bytes, where block b of a buffer starts b * stride[c] bytes from its base
// (any block stride: a K or V half of a stacked cache, one layer's view of a block-major
// staging buffer). A null id array stands for 0, 1, ..., n - 1 (a gather's output, a
// scatter's input). Each block is read once and written once: torch's CPU path gathered into a
// staging buffer and scattered from it (twice the traffic), and its index_copy_ moves element
// by element.
//
// With `streaming`, the destination is written with non-temporal stores (x86-64: AVX2 when the
// CPU has it, SSE2 otherwise; a plain memcpy elsewhere): a block written to a host tier or a
// staging buffer is not read back soon, and a store that bypasses the cache skips reading the
// destination line first (measured on one core, 64 MiB of 32 KiB blocks: memcpy ~9-10 ms,
// AVX2 streaming ~5-7 ms; bench/bench_torch_copy.py). The caller picks it for large copies.
//
// The caller validates the ids and guarantees that no destination block shares memory with a
// source block or with another destination block; here nothing is touched outside the
// buffers anyway: a source id is clamped into [0, src_blocks), a destination id outside
// [0, dst_blocks) is skipped. `threads` > 1 splits the (cache, pair) copies into that many
// contiguous ranges, one thread each; the bytes written do not depend on it.

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "huge_pages.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PREFIXKV_X86 1
#else
#define PREFIXKV_X86 0
#endif

namespace {

#if PREFIXKV_X86
// Bytes before the destination reaches an `align`-byte boundary, copied by memcpy, so the
// streaming stores below are aligned (they must be).
inline int64_t HeadBytes(const char* dst, int64_t align, int64_t bytes) {
  const int64_t head =
      (align - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & (align - 1))) &
      (align - 1);
  return head < bytes ? head : bytes;
}

__attribute__((target("avx2"))) void StreamCopyAvx2(char* dst, const char* src,
                                                   int64_t bytes) {
  const int64_t head = HeadBytes(dst, 32, bytes);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  bytes -= head;
  int64_t i = 0;
  for (; i + 128 <= bytes; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  std::memcpy(dst + i, src + i, bytes - i);
}

void StreamCopySse2(char* dst, const char* src, int64_t bytes) {
  const int64_t head = HeadBytes(dst, 16, bytes);
  std::memcpy(dst, src, head);
  dst += head;
  src += head;
  bytes -= head;
  int64_t i = 0;
  for (; i + 64 <= bytes; i += 64) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 32));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i + 48), d);
  }
  std::memcpy(dst + i, src + i, bytes - i);
}
#endif

using CopyFn = void (*)(char*, const char*, int64_t);

void PlainCopy(char* dst, const char* src, int64_t bytes) { std::memcpy(dst, src, bytes); }

CopyFn PickCopy(bool streaming) {
#if PREFIXKV_X86
  if (streaming) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    return avx2 ? StreamCopyAvx2 : StreamCopySse2;
  }
#endif
  (void)streaming;
  return PlainCopy;
}

struct Job {
  const int64_t* src_base;
  const int64_t* dst_base;
  const int64_t* src_stride;
  const int64_t* dst_stride;
  const int64_t* block_bytes;
  int64_t n;
  const int64_t* src_ids;
  const int64_t* dst_ids;
  int64_t src_blocks;
  int64_t dst_blocks;
  CopyFn copy;

  // Copies items [begin, end) of the num_caches * n (cache-major) copies.
  void Run(int64_t begin, int64_t end) const {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item / n, i = item % n;
      int64_t s = src_ids ? src_ids[i] : i;
      const int64_t d = dst_ids ? dst_ids[i] : i;
      if (d < 0 || d >= dst_blocks) continue;
      s = s < 0 ? 0 : (s >= src_blocks ? src_blocks - 1 : s);
      char* to = reinterpret_cast<char*>(dst_base[c]) + d * dst_stride[c];
      const char* from = reinterpret_cast<const char*>(src_base[c]) + s * src_stride[c];
      if (to != from) copy(to, from, block_bytes[c]);  // a block onto itself: nothing to do
    }
#if PREFIXKV_X86
    _mm_sfence();  // the streaming stores of this thread visible before it returns
#endif
  }
};

}  // namespace

// Returns 0, or 1 when an argument is out of its domain (nothing copied).
extern "C" int PrefixkvCopyBlocksRaw(int64_t num_caches, const int64_t* src_base,
                                     const int64_t* dst_base, const int64_t* src_stride,
                                     const int64_t* dst_stride, const int64_t* block_bytes,
                                     int64_t n, const int64_t* src_ids, const int64_t* dst_ids,
                                     int64_t src_blocks, int64_t dst_blocks, int streaming,
                                     int threads) {
  if (num_caches < 0 || n < 0 || threads < 1) return 1;
  if (num_caches == 0 || n == 0) return 0;
  if (src_blocks < 1 || dst_blocks < 0) return 1;
  for (int64_t c = 0; c < num_caches; ++c)
    if (block_bytes[c] < 0) return 1;
  const Job job{src_base, dst_base, src_stride, dst_stride, block_bytes, n,
                src_ids,  dst_ids,  src_blocks, dst_blocks, PickCopy(streaming != 0)};
  const int64_t items = num_caches * n;
  const int64_t workers = threads < items ? threads : items;
  if (workers <= 1) {
    job.Run(0, items);
    return 0;
  }
  std::vector<std::thread> pool;
  int64_t started = 1;  // ranges 1..started-1 run on their own threads, the rest here
  try {
    pool.reserve(static_cast<size_t>(workers - 1));
    for (; started < workers; ++started) {
      const int64_t w = started;
      pool.emplace_back([&job, w, workers, items] {
        job.Run(items * w / workers, items * (w + 1) / workers);
      });
    }
  } catch (...) {  // no thread to be had: this one copies what is left
  }
  job.Run(0, items / workers);
  for (int64_t w = started; w < workers; ++w)
    job.Run(items * w / workers, items * (w + 1) / workers);
  for (auto& t : pool) t.join();
  return 0;
}

// Huge-page advice for a new output of `bytes` bytes at `data`, before its first write (see
// huge_pages.h): a gather's fresh 64 MiB buffer faulted in 4 KiB pages cost ~6x the copy.
extern "C" void PrefixkvAdviseHugePages(void* data, int64_t bytes) {
  if (bytes >= prefixkv::kLargeOutputBytes) prefixkv::AdviseHugePages(data, bytes);
}
