// Host memory helpers shared by the XLA:CPU cache ops (xla_cache_ops.cc) and the PyTorch
// frontend's host block copies (block_copy.cc): transparent huge pages for a new output, and
// block copies with non-temporal (streaming) stores.

#ifndef PREFIXKV_KERNELS_CPU_HOST_MEMORY_H_
#define PREFIXKV_KERNELS_CPU_HOST_MEMORY_H_

#include <cstdint>
#include <cstring>

#include <sys/mman.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PREFIXKV_HOST_X86 1
#else
#define PREFIXKV_HOST_X86 0
#endif

namespace prefixkv {

// A new output at least this large gets the huge-page advice below (glibc malloc serves
// allocations above its mmap threshold, at most 32 MiB, with a fresh mmap on every call).
constexpr int64_t kLargeOutputBytes = int64_t{4} << 20;

// Ask the kernel for transparent huge pages over the 2 MiB-aligned part of a new output,
// before its first write: faulting 32 MiB in 4 KiB pages (8192 faults) took ~18 ms here, five
// times the copy itself; with the advice, ~6.4 ms all told (about 500 faults, and the kernel
// zeroing the huge pages). Advice only: a failure changes nothing.
inline void AdviseHugePages(void* data, int64_t bytes) {
#if defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (hi <= lo) return;
  // Memory the allocator handed back already mapped (its first huge-page-aligned page is
  // resident) has nothing left to fault: leave it as it is.
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(lo), 4096, &resident) == 0 && (resident & 1)) return;
  madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// A call that copies at least this many bytes streams its stores (the PyTorch frontend's
// STREAM_MIN_BYTES, torch_frontend/_native.py, is the same): the destination, a host tier, a
// staging buffer or a cache larger than the core's caches, is not read back soon, and a
// streaming store skips reading the destination line first (one core, 64 MiB of 32 KiB
// blocks: memcpy ~9-10 ms, AVX2 streaming ~5-7 ms). A smaller copy keeps its destination in
// the caches for whatever reads it next.
constexpr int64_t kStreamMinBytes = int64_t{2} << 20;

using CopyFn = void (*)(char*, const char*, int64_t);

inline void PlainCopy(char* dst, const char* src, int64_t bytes) {
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

#if PREFIXKV_HOST_X86
// Bytes before the destination reaches an `align`-byte boundary, copied by memcpy, so the
// streaming stores that follow are aligned (they must be).
inline int64_t HeadBytes(const char* dst, int64_t align, int64_t bytes) {
  const int64_t head =
      (align - static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) & (align - 1))) &
      (align - 1);
  return head < bytes ? head : bytes;
}

__attribute__((target("avx2"))) inline void StreamCopyAvx2(char* dst, const char* src,
                                                          int64_t bytes) {
  const int64_t head = HeadBytes(dst, 32, bytes);
  PlainCopy(dst, src, head);
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
  PlainCopy(dst + i, src + i, bytes - i);
}

inline void StreamCopySse2(char* dst, const char* src, int64_t bytes) {
  const int64_t head = HeadBytes(dst, 16, bytes);
  PlainCopy(dst, src, head);
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
  PlainCopy(dst + i, src + i, bytes - i);
}
#endif

// The copy for a call: streaming stores (x86-64: AVX2 when the CPU has it, SSE2 otherwise;
// a plain memcpy elsewhere) or memcpy. After streaming, StoreFence() before returning.
inline CopyFn PickCopy(bool streaming) {
#if PREFIXKV_HOST_X86
  if (streaming) {
    static const bool avx2 = __builtin_cpu_supports("avx2");
    return avx2 ? StreamCopyAvx2 : StreamCopySse2;
  }
#endif
  (void)streaming;
  return PlainCopy;
}

// Orders this thread's streaming stores before whatever it does next (a no-op elsewhere).
inline void StoreFence() {
#if PREFIXKV_HOST_X86
  _mm_sfence();
#endif
}

}  // namespace prefixkv

#endif  // PREFIXKV_KERNELS_CPU_HOST_MEMORY_H_
