// prefixkv-v1 block hashes on the GPU: one thread per sequence runs that sequence's BLAKE3
// keyed-hash chain over its full blocks.
//
//   h_-1 = parent[s] (8 words), key = derive_key("prefixkv v1 block hash", salt) (host;
//          context "prefixkv v1 block hash with extra words" for calls with extra)
//   h_i  = BLAKE3.keyed_hash(key, h_{i-1} || le_u32(tokens[start + i*B : start + (i+1)*B])
//                                 || extra[row_i])            (extra only when has_extra)
//
// Each message (8 + B (+ 4) words) must fit one BLAKE3 chunk (256 words): B <= 248, 244 with
// extra; the launcher checks this. Written from the BLAKE3 specification (O'Connor,
// Aumasson, Neves, Wilcox-O'Hearn, 2020). Compiled at run time by CuPy (NVRTC); checked on a
// CPU-only machine with `nvcc -cubin -arch=sm_80` / `sm_90` and run there as C++ against a
// host shim of the CUDA built-ins (tests/test_cuda_on_host.py).

// No system headers, so NVRTC (CuPy) compiles it as is.
typedef unsigned int pkv_u32;
typedef int pkv_i32;
typedef unsigned long long pkv_size;

#define PKV_CHUNK_START 1u
#define PKV_CHUNK_END 2u
#define PKV_ROOT 8u
#define PKV_KEYED_HASH 16u

__device__ __forceinline__ pkv_u32 pkv_rotr(pkv_u32 x, int n) {
    return __funnelshift_r(x, x, n);
}

#define PKV_G(a, b, c, d, mx, my)              \
    do {                                       \
        v[a] = v[a] + v[b] + (mx);             \
        v[d] = pkv_rotr(v[d] ^ v[a], 16);      \
        v[c] = v[c] + v[d];                    \
        v[b] = pkv_rotr(v[b] ^ v[c], 12);      \
        v[a] = v[a] + v[b] + (my);             \
        v[d] = pkv_rotr(v[d] ^ v[a], 8);       \
        v[c] = v[c] + v[d];                    \
        v[b] = pkv_rotr(v[b] ^ v[c], 7);       \
    } while (0)

// cv <- first 8 words of compress(cv, m, counter = 0, block_len, flags). m is permuted in place.
__device__ __forceinline__ void pkv_compress(pkv_u32 cv[8], pkv_u32 m[16], pkv_u32 block_len,
                                             pkv_u32 flags) {
    pkv_u32 v[16] = {cv[0], cv[1], cv[2], cv[3], cv[4], cv[5], cv[6], cv[7],
                      0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                      0u, 0u, block_len, flags};
#pragma unroll
    for (int r = 0; r < 7; r++) {
        PKV_G(0, 4, 8, 12, m[0], m[1]);
        PKV_G(1, 5, 9, 13, m[2], m[3]);
        PKV_G(2, 6, 10, 14, m[4], m[5]);
        PKV_G(3, 7, 11, 15, m[6], m[7]);
        PKV_G(0, 5, 10, 15, m[8], m[9]);
        PKV_G(1, 6, 11, 12, m[10], m[11]);
        PKV_G(2, 7, 8, 13, m[12], m[13]);
        PKV_G(3, 4, 9, 14, m[14], m[15]);
        if (r < 6) {  // the message permutation (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
            pkv_u32 t[16] = {m[2], m[6], m[3], m[10], m[7], m[0], m[4], m[13],
                              m[1], m[11], m[12], m[5], m[9], m[14], m[15], m[8]};
#pragma unroll
            for (int q = 0; q < 16; q++) m[q] = t[q];
        }
    }
#pragma unroll
    for (int q = 0; q < 8; q++) cv[q] = v[q] ^ v[q + 8];
}

// Message word w >= 8 of one block: a token, an extra word or zero padding.
__device__ __forceinline__ pkv_u32 pkv_word(const pkv_u32 *__restrict__ tok,
                                             const pkv_u32 *__restrict__ ex, int w,
                                             int block_size, int has_extra) {
    int t = w - 8;
    if (t < block_size) return tok[t];
    t -= block_size;
    if (has_extra && t < 4) return ex[t];
    return 0u;
}

extern "C" __global__ void prefixkv_hash_blocks_v1(
    const pkv_u32 *__restrict__ tokens,   // [num_tokens]
    const pkv_i32 *__restrict__ cu_lens,   // [num_seqs + 1]
    const pkv_i32 *__restrict__ boff,      // [num_seqs]: first output row of each sequence
    const pkv_u32 *__restrict__ parents,  // [num_seqs, 8]
    const pkv_u32 *__restrict__ extra,    // [num_out, 4] (unused unless has_extra)
    const pkv_u32 *__restrict__ key,      // [8]
    pkv_u32 *__restrict__ out,            // [num_out, 8]
    int num_seqs, int block_size, int has_extra) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= num_seqs) return;
    const int start = cu_lens[s];
    const int nb = (cu_lens[s + 1] - start) / block_size;
    const int row0 = boff[s];
    const int words = 8 + block_size + (has_extra ? 4 : 0);
    const int nblk = (words + 15) / 16;
    const pkv_u32 last_len = 4u * (pkv_u32)(words - 16 * (nblk - 1));
    pkv_u32 k[8], h[8];
#pragma unroll
    for (int q = 0; q < 8; q++) {
        k[q] = key[q];
        h[q] = parents[(pkv_size)s * 8 + q];
    }
    for (int i = 0; i < nb; i++) {
        const pkv_u32 *tok = tokens + start + (pkv_size)i * block_size;
        const pkv_u32 *ex = extra + (pkv_size)(row0 + i) * 4;
        pkv_u32 cv[8], m[16];
#pragma unroll
        for (int q = 0; q < 8; q++) {
            cv[q] = k[q];
            m[q] = h[q];
        }
#pragma unroll
        for (int q = 8; q < 16; q++) m[q] = pkv_word(tok, ex, q, block_size, has_extra);
        pkv_u32 flags = PKV_KEYED_HASH | PKV_CHUNK_START;
        if (nblk == 1) {
            pkv_compress(cv, m, last_len, flags | PKV_CHUNK_END | PKV_ROOT);
        } else {
            pkv_compress(cv, m, 64u, flags);
            for (int j = 1; j < nblk; j++) {
#pragma unroll
                for (int q = 0; q < 16; q++) m[q] = pkv_word(tok, ex, 16 * j + q, block_size, has_extra);
                const bool last = j == nblk - 1;
                pkv_compress(cv, m, last ? last_len : 64u,
                             PKV_KEYED_HASH | (last ? (PKV_CHUNK_END | PKV_ROOT) : 0u));
            }
        }
        pkv_u32 *o = out + (pkv_size)(row0 + i) * 8;
#pragma unroll
        for (int q = 0; q < 8; q++) {
            h[q] = cv[q];
            o[q] = cv[q];
        }
    }
}
