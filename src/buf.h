/* Growable byte buffer with a consumed offset that is trimmed lazily. */
#ifndef TS_BUF_H
#define TS_BUF_H

#include <stddef.h>

typedef struct ts_buf {
  char *data;
  size_t cap;    /* bytes allocated */
  size_t start;  /* first unconsumed byte */
  size_t end;    /* one past the last byte written */
} ts_buf;

#define ts_buf_len(b) ((b)->end - (b)->start)
#define ts_buf_head(b) ((b)->data + (b)->start)
#define ts_buf_tail(b) ((b)->data + (b)->end)
#define ts_buf_room(b) ((b)->cap - (b)->end)

void ts_buf_init(ts_buf *b);
void ts_buf_free(ts_buf *b);
/* Makes at least `room` bytes free at the tail, compacting before growing.
 * The capacity never exceeds max(limit, current). Returns 0 or -1 (ENOMEM). */
int ts_buf_reserve(ts_buf *b, size_t room, size_t limit);
int ts_buf_append(ts_buf *b, const char *p, size_t n);
void ts_buf_consume(ts_buf *b, size_t n);
/* Finds `delim` in the unconsumed bytes, starting `*scan` bytes past start.
 * Returns the offset of the match from start, or -1 and advances *scan so
 * the next call only looks at new bytes. */
long ts_buf_find(ts_buf *b, const char *delim, size_t dlen, size_t *scan);

#endif
