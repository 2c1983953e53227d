/* CRC-32C (Castagnoli) for buzon's C units: a slicing-by-1 table and the SSE4.2 crc32
 * instruction where the CPU has it. Header-only (static functions): each extension that
 * includes it calls crc32c_setup() once when it is imported. Registers are raw (the
 * caller inverts at the start and the end, as CRC-32C defines).
 */
#ifndef BUZON_CRC32C_H
#define BUZON_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t crc32c_tab[256];
static int crc32c_hw = 0;

static uint32_t crc32c_soft(uint32_t reg, const unsigned char *p, size_t n) {
    while (n--)
        reg = crc32c_tab[(reg ^ *p++) & 0xFF] ^ (reg >> 8);
    return reg;
}

/* Shifting a raw register over n zero bytes is linear over GF(2): a 32x32 bit matrix,
 * kept as four 256-entry tables (one per byte of the register). With it, three
 * stretches of one buffer are summed at once (the crc32 instruction has a latency of
 * three cycles and a throughput of one): reg(A B C) = shift(shift(reg(A)) ^ reg0(B))
 * ^ reg0(C), where reg0 starts from 0 and |B| = |C| = the shift's length. */
#define CRC32C_LONG 8192
#define CRC32C_SHORT 256
static uint32_t crc32c_long[4][256];
static uint32_t crc32c_short[4][256];

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1)
            sum ^= *mat;
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* The table of the operator that appends len zero bytes (len a power of two). */
static void crc32c_zeros(uint32_t zeros[4][256], size_t len) {
    uint32_t op[32], tmp[32];
    op[0] = 0x82F63B78u; /* one zero bit */
    for (int n = 1; n < 32; n++)
        op[n] = 1u << (n - 1);
    for (size_t bits = 1; bits < 8 * len; bits <<= 1) { /* double it up to 8 len bits */
        gf2_square(tmp, op);
        memcpy(op, tmp, sizeof op);
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 0; k < 4; k++)
            zeros[k][n] = gf2_times(op, n << (8 * k));
}

static inline uint32_t crc32c_shift(const uint32_t zeros[4][256], uint32_t reg) {
    return zeros[0][reg & 0xFF] ^ zeros[1][(reg >> 8) & 0xFF] ^ zeros[2][(reg >> 16) & 0xFF] ^
           zeros[3][reg >> 24];
}

#if defined(__x86_64__)
/* Three stretches of len bytes each, side by side: p advances by 3 len. */
__attribute__((target("sse4.2"))) static uint64_t crc32c_three(uint64_t c0,
                                                               const unsigned char **pp,
                                                               size_t len,
                                                               const uint32_t zeros[4][256]) {
    const unsigned char *p = *pp, *end = p + len;
    uint64_t c1 = 0, c2 = 0;
    do {
        uint64_t a, b, c;
        memcpy(&a, p, 8);
        memcpy(&b, p + len, 8);
        memcpy(&c, p + 2 * len, 8);
        c0 = __builtin_ia32_crc32di(c0, a);
        c1 = __builtin_ia32_crc32di(c1, b);
        c2 = __builtin_ia32_crc32di(c2, c);
        p += 8;
    } while (p < end);
    *pp = p + 2 * len;
    c0 = crc32c_shift(zeros, (uint32_t)c0) ^ (uint32_t)c1;
    return crc32c_shift(zeros, (uint32_t)c0) ^ (uint32_t)c2;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t reg,
                                                               const unsigned char *p,
                                                               size_t n) {
    uint64_t r = reg;
    for (; n >= 3 * CRC32C_LONG; n -= 3 * CRC32C_LONG)
        r = crc32c_three(r, &p, CRC32C_LONG, crc32c_long);
    for (; n >= 3 * CRC32C_SHORT; n -= 3 * CRC32C_SHORT)
        r = crc32c_three(r, &p, CRC32C_SHORT, crc32c_short);
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        r = __builtin_ia32_crc32di(r, v);
        p += 8;
        n -= 8;
    }
    uint32_t r32 = (uint32_t)r;
    while (n--)
        r32 = __builtin_ia32_crc32qi(r32, *p++);
    return r32;
}
#endif

static void crc32c_setup(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc32c_tab[i] = c;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc32c_hw = __builtin_cpu_supports("sse4.2") != 0;
    if (crc32c_hw) {
        crc32c_zeros(crc32c_long, CRC32C_LONG);
        crc32c_zeros(crc32c_short, CRC32C_SHORT);
    }
#endif
}

/* Continue a raw register over n bytes. */
static inline uint32_t crc32c_update(uint32_t reg, const unsigned char *p, size_t n) {
#if defined(__x86_64__)
    if (crc32c_hw)
        return crc32c_sse42(reg, p, n);
#endif
    return crc32c_soft(reg, p, n);
}

/* The CRC-32C of n bytes, continuing from a previous result (0 to start). */
static inline uint32_t crc32c_value(uint32_t crc, const unsigned char *p, size_t n) {
    return crc32c_update(crc ^ 0xFFFFFFFFu, p, n) ^ 0xFFFFFFFFu;
}

#endif
