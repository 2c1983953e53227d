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
#endif
}

static uint32_t crc32c_soft(uint32_t reg, const unsigned char *p, size_t n) {
    while (n--)
        reg = crc32c_tab[(reg ^ *p++) & 0xFF] ^ (reg >> 8);
    return reg;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t reg,
                                                               const unsigned char *p,
                                                               size_t n) {
    uint64_t r = reg;
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
