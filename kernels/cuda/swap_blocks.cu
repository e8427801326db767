// Batched block copies for the device <-> host transfer path (prefixkv swap_blocks).
//
// One launch copies block src_ids[i] of every cache c to block dst_ids[i] of its partner cache:
// grid (num_ids, num_caches), one thread block per (block, cache). Pointer tables give each
// cache's base address, block stride and block size in bytes, so all layers' K and V of a block
// move in one launch. Host memory must be pinned (cudaHostAlloc / torch pin_memory): under
// unified addressing its host pointer is valid on the device, so the kernel reads or writes it
// over PCIe directly. 16-byte vector accesses when every address and size allows. An id outside
// its cache's blocks (ids on a device are checked only on request: a check is a host sync)
// skips the copy: no access leaves a cache.
// Runs on a CPU-only machine as C++ against a host shim of the CUDA built-ins
// (tests/test_cuda_on_host.py).

extern "C" __global__ void swap_blocks_kernel(
    const unsigned long long* __restrict__ src_ptrs,
    const unsigned long long* __restrict__ dst_ptrs,
    const long long* __restrict__ src_strides,   // bytes between blocks, per cache
    const long long* __restrict__ dst_strides,
    const long long* __restrict__ block_bytes,   // bytes of one block, per cache
    const long long* __restrict__ src_blocks,    // blocks of each source cache
    const long long* __restrict__ dst_blocks,    // blocks of each destination cache
    const long long* __restrict__ src_ids,       // int64: torch's index dtype; an int32 id
    const long long* __restrict__ dst_ids)       // is widened by the launcher
{
    const int i = blockIdx.x;
    const int c = blockIdx.y;
    const long long s_id = src_ids[i];
    const long long d_id = dst_ids[i];
    if (s_id < 0 || s_id >= src_blocks[c] || d_id < 0 || d_id >= dst_blocks[c]) return;
    const long long nbytes = block_bytes[c];
    const char* src = reinterpret_cast<const char*>(src_ptrs[c]) + s_id * src_strides[c];
    char* dst = reinterpret_cast<char*>(dst_ptrs[c]) + d_id * dst_strides[c];
    const unsigned long long align = reinterpret_cast<unsigned long long>(src)
                                     | reinterpret_cast<unsigned long long>(dst)
                                     | static_cast<unsigned long long>(nbytes);
    if ((align & 15ULL) == 0) {
        const int4* s = reinterpret_cast<const int4*>(src);
        int4* d = reinterpret_cast<int4*>(dst);
        const long long n = nbytes >> 4;
        for (long long k = threadIdx.x; k < n; k += blockDim.x) {
            d[k] = s[k];
        }
    } else {
        for (long long k = threadIdx.x; k < nbytes; k += blockDim.x) {
            dst[k] = src[k];
        }
    }
}
