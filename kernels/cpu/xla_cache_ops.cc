// Paged KV cache moves for XLA:CPU, as XLA FFI custom calls.
//
// The update handlers (write_kv, copy_blocks, scatter_blocks) take one cache as their last
// operand and return it as their only result; the Python side aliases the two
// (input_output_aliases), so a donated cache is written in place and a non-donated one is
// copied once by XLA before the call. gather_blocks reads every cache and returns a new
// buffer (not aliased). The ops move whole rows or whole blocks as bytes, so every dtype
// takes the same path (XLA:CPU scatters bfloat16 by converting the whole cache to float32 and
// back).
//
// A call that moves prefixkv::kStreamMinBytes or more writes with streaming stores
// (host_memory.h).
//
// Ids are validated by the frontend; here an id outside the cache is still never written:
// write_kv skips slots outside [0, num_slots), copy_blocks skips dst outside [0, num_blocks)
// and clamps src into it (like the XLA path's take(mode="clip")), scatter_blocks skips ids
// outside [0, num_blocks), and gather_blocks clamps ids into [0, num_blocks) (like the XLA
// path's take(mode="clip")) and refuses caches with no block.

#include <cstdint>
#include <cstring>
#include <vector>

#include "host_memory.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Number of elements in dims[from:] (the trailing dims).
int64_t TrailingCount(ffi::AnyBuffer::Dimensions dims, size_t from) {
  int64_t n = 1;
  for (size_t i = from; i < dims.size(); ++i) n *= dims[i];
  return n;
}

int64_t ByteWidthOf(const ffi::AnyBuffer& buf) {
  return static_cast<int64_t>(ffi::ByteWidth(buf.element_type()));
}

// Copies the input cache into the output when XLA did not alias them (it always does when
// the call is built with input_output_aliases; this keeps the handler correct regardless).
void AliasOrCopy(const ffi::AnyBuffer& in, ffi::AnyBuffer out) {
  if (in.untyped_data() != out.untyped_data()) {
    std::memcpy(out.untyped_data(), in.untyped_data(), out.size_bytes());
  }
}

// slots: s32[n], n <= num_tokens. NHD (hnd false): rows [num_tokens, *row_shape], cache
// [num_blocks, block_size, *row_shape], cache.row(slot[i]) = rows[i]. HND: rows [num_tokens,
// heads, head_dim], cache [num_blocks, heads, block_size, head_dim], each head's row of
// rows[i] to cache[slot / block_size, head, slot % block_size]. A slot's destination is
// `heads` pieces (one in NHD) of `piece` bytes.
ffi::Error WriteRows(ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer cache,
                     ffi::Result<ffi::AnyBuffer> out, bool hnd) {
  auto dims = cache.dimensions();
  auto rd = rows.dimensions();
  if (hnd ? dims.size() != 4 : dims.size() < 2)
    return ffi::Error::InvalidArgument(hnd ? "write_kv_hnd: expected a 4-D cache"
                                           : "write_kv: cache rank < 2");
  if (rows.element_type() != cache.element_type())
    return ffi::Error::InvalidArgument("write_kv: rows and cache dtypes differ");
  const int64_t heads = hnd ? dims[1] : 1;
  const int64_t block_size = hnd ? dims[2] : dims[1];
  const int64_t piece = (hnd ? dims[3] : TrailingCount(dims, 2)) * ByteWidthOf(cache);
  const int64_t num_slots = dims[0] * block_size;
  const int64_t n = static_cast<int64_t>(slots.element_count());
  if (rd.size() < 1 || rd[0] < n ||
      TrailingCount(rd, 1) * ByteWidthOf(rows) != heads * piece ||
      (hnd && (rd.size() != 3 || rd[1] != heads)))
    return ffi::Error::InvalidArgument("write_kv: rows do not match the cache rows");
  AliasOrCopy(cache, *out);
  auto* dst = static_cast<char*>(out->untyped_data());
  const auto* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* slot = slots.typed_data();
  const prefixkv::CopyFn copy =
      prefixkv::PickCopy(n * heads * piece >= prefixkv::kStreamMinBytes);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = slot[i];
    if (s < 0 || s >= num_slots) continue;
    const int64_t b = s / block_size, t = s % block_size;
    for (int64_t h = 0; h < heads; ++h)
      copy(dst + ((b * heads + h) * block_size + t) * piece, src + (i * heads + h) * piece,
           piece);
  }
  prefixkv::StoreFence();
  return ffi::Error::Success();
}

ffi::Error WriteKvImpl(ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots, ffi::AnyBuffer cache,
                       ffi::Result<ffi::AnyBuffer> out) {
  return WriteRows(rows, slots, cache, out, /*hnd=*/false);
}

ffi::Error WriteKvHndImpl(ffi::AnyBuffer rows, ffi::Buffer<ffi::S32> slots,
                          ffi::AnyBuffer cache, ffi::Result<ffi::AnyBuffer> out) {
  return WriteRows(rows, slots, cache, out, /*hnd=*/true);
}

// src, dst: s32[n]; cache: [num_blocks, *block_shape]. All reads happen before any write.
ffi::Error CopyBlocksImpl(ffi::Buffer<ffi::S32> src, ffi::Buffer<ffi::S32> dst,
                          ffi::AnyBuffer cache, ffi::Result<ffi::AnyBuffer> out) {
  auto dims = cache.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("copy_blocks: cache rank < 1");
  const int64_t n = static_cast<int64_t>(src.element_count());
  if (static_cast<int64_t>(dst.element_count()) != n)
    return ffi::Error::InvalidArgument("copy_blocks: src and dst lengths differ");
  const int64_t num_blocks = dims[0];
  const int64_t block_bytes = TrailingCount(dims, 1) * ByteWidthOf(cache);
  AliasOrCopy(cache, *out);
  if (num_blocks == 0 || n == 0) return ffi::Error::Success();
  auto* base = static_cast<char*>(out->untyped_data());
  const int32_t* s = src.typed_data();
  const int32_t* d = dst.typed_data();
  auto clamp = [&](int64_t b) { return b < 0 ? 0 : (b >= num_blocks ? num_blocks - 1 : b); };
  auto valid_dst = [&](int64_t b) { return b >= 0 && b < num_blocks; };
  // Stage the sources only when some source block is also written (then a plain in-order
  // copy could read a block already overwritten).
  std::vector<char> written(num_blocks, 0);
  for (int64_t i = 0; i < n; ++i)
    if (valid_dst(d[i])) written[d[i]] = 1;
  bool overlap = false;
  for (int64_t i = 0; i < n && !overlap; ++i)
    overlap = valid_dst(d[i]) && written[clamp(s[i])] && clamp(s[i]) != d[i];
  const prefixkv::CopyFn copy =
      prefixkv::PickCopy(n * block_bytes >= prefixkv::kStreamMinBytes);
  if (!overlap) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t sb = clamp(s[i]);
      if (!valid_dst(d[i]) || sb == d[i]) continue;
      copy(base + d[i] * block_bytes, base + sb * block_bytes, block_bytes);
    }
    prefixkv::StoreFence();
    return ffi::Error::Success();
  }
  std::vector<char> staged(static_cast<size_t>(n * block_bytes));
  for (int64_t i = 0; i < n; ++i)
    if (valid_dst(d[i]))
      std::memcpy(staged.data() + i * block_bytes, base + clamp(s[i]) * block_bytes,
                  block_bytes);
  for (int64_t i = 0; i < n; ++i)
    if (valid_dst(d[i]))
      copy(base + d[i] * block_bytes, staged.data() + i * block_bytes, block_bytes);
  prefixkv::StoreFence();
  return ffi::Error::Success();
}

// buffer: [n, num_caches, *block_shape]; ids: s32[n]; cache: [num_blocks, *block_shape].
// cache[ids[i]] = buffer[i, index].
ffi::Error ScatterBlocksImpl(ffi::AnyBuffer buffer, ffi::Buffer<ffi::S32> ids,
                             ffi::AnyBuffer cache, ffi::Result<ffi::AnyBuffer> out,
                             int64_t index) {
  auto dims = cache.dimensions();
  auto bdims = buffer.dimensions();
  if (dims.size() < 1 || bdims.size() < 2)
    return ffi::Error::InvalidArgument("scatter_blocks: bad ranks");
  if (buffer.element_type() != cache.element_type())
    return ffi::Error::InvalidArgument("scatter_blocks: buffer and cache dtypes differ");
  const int64_t n = static_cast<int64_t>(ids.element_count());
  const int64_t num_caches = bdims[1];
  const int64_t num_blocks = dims[0];
  const int64_t block_bytes = TrailingCount(dims, 1) * ByteWidthOf(cache);
  if (bdims[0] != n || index < 0 || index >= num_caches ||
      TrailingCount(bdims, 2) * ByteWidthOf(buffer) != block_bytes)
    return ffi::Error::InvalidArgument("scatter_blocks: buffer does not match the cache");
  AliasOrCopy(cache, *out);
  auto* base = static_cast<char*>(out->untyped_data());
  const auto* src = static_cast<const char*>(buffer.untyped_data());
  const int32_t* id = ids.typed_data();
  const prefixkv::CopyFn copy =
      prefixkv::PickCopy(n * block_bytes >= prefixkv::kStreamMinBytes);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = id[i];
    if (b < 0 || b >= num_blocks) continue;
    copy(base + b * block_bytes, src + (i * num_caches + index) * block_bytes, block_bytes);
  }
  prefixkv::StoreFence();
  return ffi::Error::Success();
}

// ids: s32[n]; caches: num_caches operands [num_blocks, *block_shape], same shape and dtype;
// out: [n, num_caches, *block_shape]. out[i, c] = caches[c][ids[i]]. The output is written
// front to back, one whole block per copy.
ffi::Error GatherBlocksImpl(ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs caches,
                            ffi::Result<ffi::AnyBuffer> out) {
  const int64_t num_caches = static_cast<int64_t>(caches.size());
  const int64_t n = static_cast<int64_t>(ids.element_count());
  auto odims = out->dimensions();
  if (odims.size() < 2 || odims[0] != n || odims[1] != num_caches)
    return ffi::Error::InvalidArgument("gather_blocks: out is not [n, num_caches, ...]");
  const int64_t block_bytes = TrailingCount(odims, 2) * ByteWidthOf(*out);
  if (n == 0 || num_caches == 0 || block_bytes == 0) return ffi::Error::Success();
  std::vector<const char*> base(num_caches);
  int64_t num_blocks = -1;
  for (int64_t c = 0; c < num_caches; ++c) {
    auto cache = caches.get<ffi::AnyBuffer>(c);
    if (!cache.has_value()) return cache.error();
    auto dims = cache->dimensions();
    if (dims.size() < 1 || cache->element_type() != out->element_type() ||
        TrailingCount(dims, 1) * ByteWidthOf(*cache) != block_bytes ||
        (num_blocks >= 0 && dims[0] != num_blocks))
      return ffi::Error::InvalidArgument("gather_blocks: caches do not match the buffer");
    num_blocks = dims[0];
    base[c] = static_cast<const char*>(cache->untyped_data());
  }
  if (num_blocks == 0) return ffi::Error::InvalidArgument("gather_blocks: empty caches");
  auto* dst = static_cast<char*>(out->untyped_data());
  const int64_t out_bytes = n * num_caches * block_bytes;
  if (out_bytes >= prefixkv::kLargeOutputBytes) prefixkv::AdviseHugePages(dst, out_bytes);
  const int32_t* id = ids.typed_data();
  const prefixkv::CopyFn copy = prefixkv::PickCopy(out_bytes >= prefixkv::kStreamMinBytes);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = id[i] < 0 ? 0 : (id[i] >= num_blocks ? num_blocks - 1 : id[i]);
    for (int64_t c = 0; c < num_caches; ++c, dst += block_bytes)
      copy(dst, base[c] + b * block_bytes, block_bytes);
  }
  prefixkv::StoreFence();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvWriteKv, WriteKvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvWriteKvHnd, WriteKvHndImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvCopyBlocks, CopyBlocksImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvScatterBlocks, ScatterBlocksImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("index"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrefixkvGatherBlocks, GatherBlocksImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>());
