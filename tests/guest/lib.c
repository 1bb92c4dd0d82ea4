/*
 * The few libc pieces the test guest needs.  gcc may emit calls to memcpy and
 * memset for struct copies even when freestanding, so they must exist; the
 * build uses -fno-tree-loop-distribute-patterns so these loops are not turned
 * back into calls to themselves.
 */
#include "guest.h"

void *memcpy(void *dst, const void *src, size_t n)
{
        uint8_t *d = dst;
        const uint8_t *s = src;

        while (n--)
                *d++ = *s++;
        return dst;
}

void *memset(void *dst, int c, size_t n)
{
        uint8_t *d = dst;

        while (n--)
                *d++ = (uint8_t)c;
        return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
        const uint8_t *x = a, *y = b;

        for (; n; n--, x++, y++)
                if (*x != *y)
                        return *x < *y ? -1 : 1;
        return 0;
}

size_t strlen(const char *s)
{
        size_t n = 0;

        while (s[n])
                n++;
        return n;
}

/* CRC-32 as zlib.crc32 computes it (reflected polynomial 0xEDB88320);
 * start with 0 and feed the result back in to continue. */
uint32_t crc32_update(uint32_t crc, const volatile uint8_t *p, size_t n)
{
        crc = ~crc;
        while (n--) {
                crc ^= *p++;
                for (int k = 0; k < 8; k++)
                        crc = (crc >> 1) ^ (0xEDB88320u & -(crc & 1));
        }
        return ~crc;
}

static int digit_value(char c, unsigned base)
{
        unsigned v;

        if (c >= '0' && c <= '9')
                v = (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
                v = (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
                v = (unsigned)(c - 'A' + 10);
        else
                return -1;
        return v < base ? (int)v : -1;
}

int parse_u64(const char *s, size_t n, uint64_t *out)
{
        unsigned base = 10;
        uint64_t v = 0;

        if (n > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
                base = 16;
                s += 2;
                n -= 2;
        }
        if (n == 0)
                return -1;
        for (; n; n--, s++) {
                int d = digit_value(*s, base);

                if (d < 0 || v > (UINT64_MAX - (uint64_t)d) / base)
                        return -1;
                v = v * base + (uint64_t)d;
        }
        *out = v;
        return 0;
}

int split_fields(const char *s, size_t n, const char **f, size_t *fl, int max)
{
        int k = 0;
        size_t start = 0;

        for (size_t i = 0; i <= n && k < max; i++)
                if (i == n || s[i] == ':') {
                        f[k] = s + start;
                        fl[k++] = i - start;
                        start = i + 1;
                }
        return k;
}

int word_is(const char *s, size_t n, const char *word)
{
        return strlen(word) == n && memcmp(s, word, n) == 0;
}
