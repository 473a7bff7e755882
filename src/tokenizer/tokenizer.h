/* tokenizer.h: internal helpers shared by the tokenizer and the chat template
 * (UTF-8 decoding with the Unicode "maximal subpart" rule, a growable byte
 * buffer). Not part of the public API: g3n.h declares that. */
#ifndef G3N_TOKENIZER_INTERNAL_H
#define G3N_TOKENIZER_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* Decode one UTF-8 character at s (n > 0 bytes available), strictly: no overlong
 * forms, no surrogates, nothing above U+10FFFF. Returns its length (1-4) and sets
 * *cp when well formed. Otherwise returns -k where k >= 1 is the length of the
 * maximal subpart (the longest prefix that could start a valid character, or 1):
 * the bytes that one U+FFFD replaces under the Unicode / WHATWG rule, which is
 * what Python's bytes.decode('utf-8', 'replace') and JS TextDecoder do. */
int g3n_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* Length of the longest prefix of s[0..n) that is well-formed UTF-8. */
size_t g3n_utf8_valid_prefix(const unsigned char *s, size_t n);

/* Encode cp (<= U+10FFFF, not a surrogate) as UTF-8 into out (4 bytes room);
 * returns the number of bytes. */
int g3n_utf8_encode(uint32_t cp, unsigned char *out);

/* A growable byte buffer: p holds n bytes of cap (free p when done). */
typedef struct {
    char *p;
    size_t n, cap;
} bbuf;

/* Room for `extra` more bytes (doubling; aborts when the heap is exhausted). */
void bbuf_reserve(bbuf *b, size_t extra);
/* Append s[0..n). */
void bbuf_put(bbuf *b, const void *s, size_t n);

#endif
