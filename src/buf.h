/* Growable byte buffer with a consumed offset that is trimmed lazily. */
#ifndef TS_BUF_H
#define TS_BUF_H

#include <stddef.h>
#include <stdint.h>

/* Offsets are 32 bits, which keeps a stream (two of these) small: no
 * buffer of ours reaches 4 GiB (max_buffer_size and the write limits are
 * below), and reserve refuses to grow past TS_BUF_MAX. */
#define TS_BUF_MAX ((size_t)UINT32_MAX)
typedef struct ts_buf {
  char *data;
  uint32_t cap;   /* bytes allocated */
  uint32_t start; /* first unconsumed byte */
  uint32_t end;   /* one past the last byte written */
} ts_buf;

#define ts_buf_len(b) ((size_t)((b)->end - (b)->start))
#define ts_buf_head(b) ((b)->data + (b)->start)
#define ts_buf_tail(b) ((b)->data + (b)->end)
#define ts_buf_room(b) ((size_t)((b)->cap - (b)->end))

/* Drained write buffers kept for reuse, so that a stream that writes a
 * reply per message neither holds a buffer while idle nor calls malloc
 * and free per message. */
#define TS_BUF_POOL_SIZE 16
#define TS_BUF_POOL_MAX_CAP (64 * 1024)
typedef struct ts_buf_pool {
  int n;
  ts_buf item[TS_BUF_POOL_SIZE];
} ts_buf_pool;

void ts_buf_init(ts_buf *b);
/* Empties b, giving its memory to the pool (or back to malloc). */
void ts_buf_release(ts_buf *b, ts_buf_pool *pool);
/* Gives an unallocated b memory from the pool, if it has some. */
void ts_buf_adopt(ts_buf *b, ts_buf_pool *pool);
void ts_buf_free(ts_buf *b);
/* Makes at least `room` bytes free at the tail, compacting before growing.
 * The capacity never exceeds max(limit, current) or TS_BUF_MAX. Returns 0
 * or -1 (out of memory, or past TS_BUF_MAX). */
int ts_buf_reserve(ts_buf *b, size_t room, size_t limit);
int ts_buf_append(ts_buf *b, const char *p, size_t n);
void ts_buf_consume(ts_buf *b, size_t n);
/* Finds `delim` in the unconsumed bytes, starting `*scan` bytes past start.
 * Returns the offset of the match from start, or -1 and advances *scan so
 * the next call only looks at new bytes. */
long ts_buf_find(ts_buf *b, const char *delim, size_t dlen, size_t *scan);

#endif
