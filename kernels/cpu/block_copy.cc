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
// With `streaming`, the destination is written with non-temporal stores (host_memory.h; the
// caller picks them for large copies).
//
// The caller validates the ids and guarantees that no destination block shares memory with a
// source block or with another destination block; here nothing is touched outside the
// buffers anyway: a source id is clamped into [0, src_blocks), a destination id outside
// [0, dst_blocks) is skipped. `threads` > 1 splits the pairs into that many contiguous
// ranges, one thread each; the bytes written do not depend on it.

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "host_memory.h"

namespace {

using prefixkv::CopyFn;

struct Job {
  int64_t num_caches;
  const int64_t* src_base;
  const int64_t* dst_base;
  const int64_t* src_stride;
  const int64_t* dst_stride;
  const int64_t* block_bytes;
  const int64_t* src_ids;
  const int64_t* dst_ids;
  int64_t src_blocks;
  int64_t dst_blocks;
  CopyFn copy;

  // Copies pairs [begin, end) of every cache, cache after cache.
  void Run(int64_t begin, int64_t end) const {
    for (int64_t c = 0; c < num_caches; ++c) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t d = dst_ids ? dst_ids[i] : i;
        if (d < 0 || d >= dst_blocks) continue;
        int64_t s = src_ids ? src_ids[i] : i;
        s = s < 0 ? 0 : (s >= src_blocks ? src_blocks - 1 : s);
        char* to = reinterpret_cast<char*>(dst_base[c]) + d * dst_stride[c];
        const char* from = reinterpret_cast<const char*>(src_base[c]) + s * src_stride[c];
        if (to != from) copy(to, from, block_bytes[c]);  // a block onto itself: nothing to do
      }
    }
    prefixkv::StoreFence();  // the streaming stores of this thread before it returns
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
  const Job job{num_caches, src_base,   dst_base,   src_stride,
                dst_stride, block_bytes, src_ids,    dst_ids,
                src_blocks, dst_blocks,  prefixkv::PickCopy(streaming != 0)};
  // Threads split the pairs, not the caches: a block named once is written by one thread,
  // its caches in order, so where two caches are one memory (layers sharing a cache) the last
  // one's bytes win, as with one thread.
  const int64_t workers = threads < n ? threads : n;
  if (workers <= 1) {
    job.Run(0, n);
    return 0;
  }
  std::vector<std::thread> pool;
  int64_t started = 1;  // ranges 1..started-1 run on their own threads, the rest here
  try {
    pool.reserve(static_cast<size_t>(workers - 1));
    for (; started < workers; ++started) {
      const int64_t w = started;
      pool.emplace_back([&job, w, workers, n] {
        job.Run(n * w / workers, n * (w + 1) / workers);
      });
    }
  } catch (...) {  // no thread to be had: this one copies what is left
  }
  job.Run(0, n / workers);
  for (int64_t w = started; w < workers; ++w)
    job.Run(n * w / workers, n * (w + 1) / workers);
  for (auto& t : pool) t.join();
  return 0;
}

// Huge-page advice for a new output of `bytes` bytes at `data`, before its first write (see
// host_memory.h): a gather's fresh 64 MiB buffer faulted in 4 KiB pages cost ~6x the copy.
extern "C" void PrefixkvAdviseHugePages(void* data, int64_t bytes) {
  if (bytes >= prefixkv::kLargeOutputBytes) prefixkv::AdviseHugePages(data, bytes);
}
