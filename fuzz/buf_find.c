/* libFuzzer target: ts_buf_find, the delimiter search of read_until, fed
 * the way a stream feeds it (bytes arrive in chunks, the search resumes at
 * *scan, a match is consumed) against a naive search of the same bytes.
 * Input: [dlen-1 (low 3 bits)] [delim] then chunks, each [length] [bytes]. */
#include "buf.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The first match of d in p[0, n), by brute force. */
static long naive(const char *p, size_t n, const char *d, size_t dlen) {
  size_t i;

  for (i = 0; i + dlen <= n; i++)
    if (memcmp(p + i, d, dlen) == 0)
      return (long)i;
  return -1;
}

/* Consumes every match now in b, checking each against naive(). */
static void drain(ts_buf *b, const char *d, size_t dlen, size_t *scan) {
  long at, want;

  for (;;) {
    want = ts_buf_len(b) > 0 ? naive(ts_buf_head(b), ts_buf_len(b), d, dlen) : -1;
    at = ts_buf_find(b, d, dlen, scan);
    if (at != want)
      abort();
    if (at < 0)
      return;
    ts_buf_consume(b, (size_t)at + dlen);
    *scan = 0;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char delim[8];
  size_t dlen, scan = 0, i, n;
  ts_buf b;

  if (size < 1)
    return 0;
  dlen = (size_t)(data[0] & 7) + 1;
  if (size < 1 + dlen)
    return 0;
  memcpy(delim, data + 1, dlen);
  ts_buf_init(&b);
  for (i = 1 + dlen; i < size; i += n) {
    n = data[i++];
    if (n > size - i)
      n = size - i;
    /* A small limit now and then makes reserve compact, not grow. */
    if (ts_buf_reserve(&b, n, data[i - 1] & 1 ? 64 : (size_t)-1) != 0 ||
        ts_buf_append(&b, (const char *)data + i, n) != 0)
      break;
    drain(&b, delim, dlen, &scan);
  }
  ts_buf_free(&b);
  return 0;
}
