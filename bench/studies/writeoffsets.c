/*
 * writeoffsets.so -- where in their pages the large writes of a process
 * start.
 *
 *   WRITEOFFSETS_FILE=/tmp/offsets LD_PRELOAD=bench/build/writeoffsets.so prog
 *
 * Counts the write() and writev() buffers of 4 KiB or more by their start's
 * offset within a 4 KiB page (in steps of 8 bytes), and rewrites the file
 * every 1,024 such buffers with one line per offset seen: "OFFSET COUNT".
 * bench/bulk_offsets.sh uses it to compare fast and slow bulk runs.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#define BIG 4096
#define STEP 8

static unsigned long counts[4096 / STEP];
static unsigned long noted;

static void dump(void) {
  const char *path = getenv("WRITEOFFSETS_FILE");
  FILE *f = fopen(path != NULL ? path : "writeoffsets.out", "w");
  size_t i;

  if (f == NULL)
    return;
  for (i = 0; i < sizeof(counts) / sizeof(*counts); i++)
    if (counts[i] > 0)
      fprintf(f, "%zu %lu\n", i * STEP, counts[i]);
  fclose(f);
}

static void note(const void *p, size_t n) {
  if (n < BIG)
    return;
  counts[((uintptr_t)p & 4095) / STEP]++;
  if (++noted % 1024 == 0)
    dump();
}

ssize_t write(int fd, const void *buf, size_t n) {
  static ssize_t (*real)(int, const void *, size_t);

  if (real == NULL)
    *(void **)&real = dlsym(RTLD_NEXT, "write");
  note(buf, n);
  return real(fd, buf, n);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
  static ssize_t (*real)(int, const struct iovec *, int);
  int i;

  if (real == NULL)
    *(void **)&real = dlsym(RTLD_NEXT, "writev");
  for (i = 0; i < iovcnt; i++)
    note(iov[i].iov_base, iov[i].iov_len);
  return real(fd, iov, iovcnt);
}
