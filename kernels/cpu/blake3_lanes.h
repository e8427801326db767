/* BLAKE3 over NL independent messages of the same length, one lane per message.
 *
 * Included by blake3_chain.c once per lane type, with these defined:
 *   lane_t  uint32_t (NL = 1, scalar) or a GCC/Clang vector of 8 x uint32_t (NL = 8; GCC
 *           lowers it to the target's SIMD: two SSE2 registers, one AVX2 register, NEON...),
 *   SPLAT   x -> a lane_t with x in every lane,
 *   SUF     the name suffix, HOT_TARGET an attribute for the entry point (target_clones).
 * Messages are given as little-endian 32-bit words, lane-interleaved: word w of every lane is
 * mw[w], zero-padded to a whole number of 64-byte blocks (at least one).
 * Written from the BLAKE3 specification (O'Connor, Aumasson, Neves, Wilcox-O'Hearn, 2020).
 */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

/* The quarter round G on state words a, b, c, d with message words mx, my. */
#define G(a, b, c, d, mx, my)          \
    do {                               \
        v[a] = v[a] + v[b] + (mx);     \
        v[d] = ROTR(v[d] ^ v[a], 16);  \
        v[c] = v[c] + v[d];            \
        v[b] = ROTR(v[b] ^ v[c], 12);  \
        v[a] = v[a] + v[b] + (my);     \
        v[d] = ROTR(v[d] ^ v[a], 8);   \
        v[c] = v[c] + v[d];            \
        v[b] = ROTR(v[b] ^ v[c], 7);   \
    } while (0)

/* One round: columns, then diagonals, message words in the order of round r. */
#define ROUND(r)                                                        \
    do {                                                                \
        G(0, 4, 8, 12, m[SCHEDULE[r][0]], m[SCHEDULE[r][1]]);           \
        G(1, 5, 9, 13, m[SCHEDULE[r][2]], m[SCHEDULE[r][3]]);           \
        G(2, 6, 10, 14, m[SCHEDULE[r][4]], m[SCHEDULE[r][5]]);          \
        G(3, 7, 11, 15, m[SCHEDULE[r][6]], m[SCHEDULE[r][7]]);          \
        G(0, 5, 10, 15, m[SCHEDULE[r][8]], m[SCHEDULE[r][9]]);          \
        G(1, 6, 11, 12, m[SCHEDULE[r][10]], m[SCHEDULE[r][11]]);        \
        G(2, 7, 8, 13, m[SCHEDULE[r][12]], m[SCHEDULE[r][13]]);         \
        G(3, 4, 9, 14, m[SCHEDULE[r][14]], m[SCHEDULE[r][15]]);         \
    } while (0)

/* out = first 8 words of compress(cv, m, counter, block_len, flags) (out may alias cv). */
static inline __attribute__((always_inline)) void CAT(compress, SUF)(
    const lane_t cv[8], const lane_t m[16], uint64_t counter, uint32_t block_len,
    uint32_t flags, lane_t out[8])
{
    lane_t v[16];
    for (int i = 0; i < 8; i++) v[i] = cv[i];
    v[8] = SPLAT(IV[0]);
    v[9] = SPLAT(IV[1]);
    v[10] = SPLAT(IV[2]);
    v[11] = SPLAT(IV[3]);
    v[12] = SPLAT((uint32_t)counter);
    v[13] = SPLAT((uint32_t)(counter >> 32));
    v[14] = SPLAT(block_len);
    v[15] = SPLAT(flags);
    ROUND(0);
    ROUND(1);
    ROUND(2);
    ROUND(3);
    ROUND(4);
    ROUND(5);
    ROUND(6);
    for (int i = 0; i < 8; i++) out[i] = v[i] ^ v[i + 8];
}

/* Chaining value of chunk `chunk` (`len` bytes from byte chunk*1024); `root`: the chunk is
 * the whole message, so its last block gets the ROOT flag. */
static inline __attribute__((always_inline)) void CAT(chunk_cv, SUF)(
    const lane_t key[8], const lane_t *mw, uint64_t chunk, size_t len, uint32_t flags,
    int root, lane_t out[8])
{
    lane_t cv[8];
    size_t nblocks = len == 0 ? 1 : (len + BLOCK_LEN - 1) / BLOCK_LEN;
    const lane_t *m = mw + chunk * (CHUNK_LEN / 4);
    for (int i = 0; i < 8; i++) cv[i] = key[i];
    for (size_t j = 0; j < nblocks; j++) {
        uint32_t f = flags;
        uint32_t blen = BLOCK_LEN;
        if (j == 0) f |= CHUNK_START;
        if (j == nblocks - 1) {
            f |= CHUNK_END | (root ? ROOT : 0);
            blen = (uint32_t)(len - j * BLOCK_LEN);
        }
        CAT(compress, SUF)(cv, m + 16 * j, chunk, blen, f, cv);
    }
    for (int i = 0; i < 8; i++) out[i] = cv[i];
}

static inline __attribute__((always_inline)) void CAT(parent_cv, SUF)(
    const lane_t key[8], const lane_t left[8], const lane_t right[8], uint32_t flags,
    lane_t out[8])
{
    lane_t m[16];
    for (int i = 0; i < 8; i++) {
        m[i] = left[i];
        m[i + 8] = right[i];
    }
    CAT(compress, SUF)(key, m, 0, BLOCK_LEN, flags | PARENT, out);
}

/* 32-byte BLAKE3 output (as 8 words) of the NL messages of `len` bytes in mw. `flags` selects
 * the mode (0 hash, KEYED_HASH, DERIVE_KEY_CONTEXT, DERIVE_KEY_MATERIAL) and key holds the
 * IV or the key words. */
static HOT_TARGET void CAT(hash, SUF)(const lane_t key[8], const lane_t *mw, size_t len,
                                      uint32_t flags, lane_t out[8])
{
    if (len <= CHUNK_LEN) {
        CAT(chunk_cv, SUF)(key, mw, 0, len, flags, 1, out);
        return;
    }
    /* The tree: a stack of finished subtree chaining values. After chunk c (not the last),
     * merge while the number of finished chunks has trailing zero bits; at the end, merge
     * the last chunk into the stack from the top, the final merge being the root. */
    lane_t stack[64][8];
    int depth = 0;
    uint64_t nchunks = (len + CHUNK_LEN - 1) / CHUNK_LEN;
    lane_t cv[8];
    for (uint64_t c = 0; c + 1 < nchunks; c++) {
        CAT(chunk_cv, SUF)(key, mw, c, CHUNK_LEN, flags, 0, cv);
        for (uint64_t total = c + 1; (total & 1) == 0; total >>= 1) {
            depth--;
            CAT(parent_cv, SUF)(key, stack[depth], cv, flags, cv);
        }
        for (int i = 0; i < 8; i++) stack[depth][i] = cv[i];
        depth++;
    }
    CAT(chunk_cv, SUF)(key, mw, nchunks - 1, len - (nchunks - 1) * CHUNK_LEN, flags, 0, cv);
    while (depth > 0) {
        depth--;
        CAT(parent_cv, SUF)(key, stack[depth], cv, depth == 0 ? flags | ROOT : flags, cv);
    }
    for (int i = 0; i < 8; i++) out[i] = cv[i];
}

#undef G
#undef ROUND
#undef ROTR
#undef CAT
#undef CAT_
