// The CUDA built-ins prefixkv's CUDA C kernels use, emulated on the host, so the kernels'
// source runs as C++ on a machine without a GPU (tests/test_cuda_on_host.py).
//
// A launch runs every thread of every thread block one after another. That is exact for
// kernels whose threads never wait on each other (no __syncthreads, shared memory, warp
// shuffles or atomics), which holds for kernels/cuda/*.cu; a kernel that starts using one of
// those fails to compile here rather than running wrongly.

#pragma once
#include <cstdint>

struct pkv_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

static thread_local pkv_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct alignas(16) int4 {
    int x, y, z, w;
};

// hi:lo shifted right by n & 31, low 32 bits (CUDA's definition)
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned n) {
    const std::uint64_t v = (static_cast<std::uint64_t>(hi) << 32) | lo;
    return static_cast<unsigned>(v >> (n & 31u));
}

template <class Kernel, class... Args>
void pkv_launch(Kernel kernel, pkv_dim3 grid, pkv_dim3 block, Args... args) {
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++)
                for (unsigned tz = 0; tz < block.z; tz++)
                    for (unsigned ty = 0; ty < block.y; ty++)
                        for (unsigned tx = 0; tx < block.x; tx++) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            kernel(args...);
                        }
}
