/*
 * sendalign -- the kernel's cost of send, by where the sent bytes sit in
 * their page.
 *
 *   bench/build/sendalign [ROUNDS [OFFSET...]]     (make -C bench studies)
 *
 * One thread on CPU 0 writes 1 GiB in 64 KiB write()s to a loopback TCP
 * socket, from a buffer that starts OFFSET bytes into a page; a thread on
 * CPU 1 reads and drops it. Prints the writer's CPU (user + system, its
 * own thread) per GB for each offset, the offsets interleaved, ROUNDS
 * times (default 2; offsets default to 0 24 440 2048 4064 4072 4088).
 * What it showed: docs/PERFORMANCE.md ("Where each gap goes", bulk).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
#define TOTAL (1L << 30)

static void pin(int cpu) {
  cpu_set_t set;

  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  sched_setaffinity(0, sizeof(set), &set); /* best effort: 1 CPU still works */
}

static void *drain(void *arg) {
  static char buf[1 << 18];
  int fd = *(int *)arg;

  pin(1);
  while (read(fd, buf, sizeof(buf)) > 0) {
  }
  return NULL;
}

static double thread_cpu(void) {
  struct rusage u;

  getrusage(RUSAGE_THREAD, &u);
  return (double)(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

/* A connected loopback pair: *w writes, *r reads. */
static int connect_pair(int *w, int *r) {
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t alen = sizeof(a);
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;

  if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(l, 1) != 0 ||
      getsockname(l, (struct sockaddr *)&a, &alen) != 0)
    return -1;
  *w = socket(AF_INET, SOCK_STREAM, 0);
  if (*w < 0 || connect(*w, (struct sockaddr *)&a, sizeof(a)) != 0)
    return -1;
  *r = accept(l, NULL, NULL);
  close(l);
  setsockopt(*w, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return *r < 0 ? -1 : 0;
}

static double seconds_per_gb(int fd, const char *p) {
  double c0 = thread_cpu();
  long sent = 0;

  while (sent < TOTAL) {
    ssize_t n = write(fd, p, CHUNK);
    if (n <= 0)
      return -1;
    sent += n;
  }
  return (thread_cpu() - c0) / ((double)sent / 1e9);
}

int main(int argc, char **argv) {
  static const int defaults[] = {0, 24, 440, 2048, 4064, 4072, 4088};
  int rounds = argc > 1 ? atoi(argv[1]) : 2, n = argc > 2 ? argc - 2 : 7;
  int w, r, i, k;
  pthread_t reader;
  char *page;

  if (rounds < 1 || connect_pair(&w, &r) != 0) {
    fprintf(stderr, "usage: sendalign [ROUNDS [OFFSET...]] (offsets 0-4095)\n");
    return 2;
  }
  page = aligned_alloc(4096, CHUNK + 8192);
  if (page == NULL || pthread_create(&reader, NULL, drain, &r) != 0)
    return 1;
  memset(page, 'x', CHUNK + 8192);
  pin(0);
  for (k = 0; k < rounds; k++)
    for (i = 0; i < n; i++) {
      int off = argc > 2 ? atoi(argv[i + 2]) & 4095 : defaults[i];
      printf("round %d offset %4d: %.3f s/GB\n", k + 1, off, seconds_per_gb(w, page + off));
      fflush(stdout);
    }
  close(w);
  pthread_join(reader, NULL);
  return 0;
}
