#define _GNU_SOURCE /* memmem */
#include "buf.h"

#include <stdlib.h>
#include <string.h>

void ts_buf_init(ts_buf *b) {
  b->data = NULL;
  b->cap = b->start = b->end = 0;
}

void ts_buf_free(ts_buf *b) {
  free(b->data);
  ts_buf_init(b);
}

void ts_buf_release(ts_buf *b, ts_buf_pool *pool) {
  if (b->data != NULL && b->cap <= TS_BUF_POOL_MAX_CAP && pool->n < TS_BUF_POOL_SIZE) {
    pool->item[pool->n] = *b;
    pool->item[pool->n].start = pool->item[pool->n].end = 0;
    pool->n++;
    ts_buf_init(b);
    return;
  }
  ts_buf_free(b);
}

void ts_buf_adopt(ts_buf *b, ts_buf_pool *pool) {
  if (b->data == NULL && pool->n > 0)
    *b = pool->item[--pool->n];
}

int ts_buf_reserve(ts_buf *b, size_t room, size_t limit) {
  size_t len = ts_buf_len(b);
  size_t cap;
  char *p;

  if (ts_buf_room(b) >= room)
    return 0;
  if (room > TS_BUF_MAX - len)
    return -1;
  /* Compacting is cheap when little is left; it also avoids growing. */
  if (b->start > 0 && b->cap - len >= room) {
    memmove(b->data, ts_buf_head(b), len);
    b->start = 0;
    b->end = (uint32_t)len;
    return 0;
  }
  cap = b->cap ? b->cap : 1024;
  while (cap - len < room)
    cap *= 2;
  if (limit > TS_BUF_MAX)
    limit = TS_BUF_MAX;
  if (cap > limit && limit >= len + room)
    cap = limit;
  if (cap > TS_BUF_MAX)
    cap = TS_BUF_MAX;
  if (b->start > 0) {
    p = malloc(cap);
    if (p == NULL)
      return -1;
    memcpy(p, ts_buf_head(b), len);
    free(b->data);
  } else {
    p = realloc(b->data, cap);
    if (p == NULL)
      return -1;
  }
  b->data = p;
  b->cap = (uint32_t)cap;
  b->start = 0;
  b->end = (uint32_t)len;
  return 0;
}

int ts_buf_append(ts_buf *b, const char *p, size_t n) {
  if (n == 0)
    return 0;
  if (ts_buf_reserve(b, n, (size_t)-1) != 0)
    return -1;
  memcpy(ts_buf_tail(b), p, n);
  b->end += (uint32_t)n;
  return 0;
}

void ts_buf_consume(ts_buf *b, size_t n) {
  b->start += (uint32_t)n;
  if (b->start == b->end)
    b->start = b->end = 0;
}

/* The first d in h[0, len), or NULL. glibc's memmem sets up a shift table
 * per call, which costs more than the search in a request head or a RESP
 * line: memchr for the first byte and a compare is 2-4x faster there
 * ("\r\n" in a 63-byte line: 49 -> 11 ns). After a few first-byte hits
 * that are not d it hands over to memmem, so input made of the first
 * byte cannot make a search cost len * dlen. */
static const char *find_delim(const char *h, size_t len, const char *d, size_t dlen) {
  const char *p = h, *end = h + len;
  int misses = 0;

  while ((size_t)(end - p) >= dlen) {
    p = memchr(p, d[0], (size_t)(end - p) - dlen + 1);
    if (p == NULL || memcmp(p + 1, d + 1, dlen - 1) == 0)
      return p;
    if (++misses == 8)
      return memmem(p + 1, (size_t)(end - p) - 1, d, dlen);
    p++;
  }
  return NULL;
}

long ts_buf_find(ts_buf *b, const char *delim, size_t dlen, size_t *scan) {
  size_t len = ts_buf_len(b);
  const char *head, *hit;

  if (*scan >= len || len - *scan < dlen) {
    goto miss;
  }
  head = ts_buf_head(b); /* not before: an empty buffer's data is NULL */
  if (dlen == 1)
    hit = memchr(head + *scan, delim[0], len - *scan);
  else
    hit = find_delim(head + *scan, len - *scan, delim, dlen);
  if (hit != NULL)
    return (long)(hit - head);
miss:
  /* A match may still start in the last dlen-1 bytes. */
  if (len >= dlen)
    *scan = len - dlen + 1;
  return -1;
}
