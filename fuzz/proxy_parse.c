/* libFuzzer target: ts_proxy_parse. Each call sees an exact-size copy, so
 * ASan catches a read past n. Checks: consumed <= n; a complete header
 * names a valid address; a reason comes with every refusal; and feeding the
 * bytes one more at a time (as a stream does) gives "need more" until the
 * full answer, never another answer. */
#include "proxy.h"

#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static long parse_copy(const uint8_t *data, size_t n, ts_proxy_addr *a) {
  char *p = malloc(n ? n : 1);
  const char *why = NULL;
  long r;

  if (p == NULL)
    abort();
  memcpy(p, data, n);
  memset(a, 0x55, sizeof(*a)); /* garbage, as on a caller's stack */
  r = ts_proxy_parse(p, n, a, &why);
  free(p);
  if (r > (long)n || r < -1 || (r < 0 && why == NULL))
    abort();
  return r;
}

static void check_addr(const ts_proxy_addr *a) {
  unsigned char bin[16];

  if (a->family == 0)
    return;
  if ((a->family != AF_INET && a->family != AF_INET6) ||
      memchr(a->host, '\0', sizeof(a->host)) == NULL ||
      inet_pton(a->family, a->host, bin) != 1 || a->port < 0 || a->port > 65535)
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  ts_proxy_addr full, part;
  long r = parse_copy(data, size, &full), rk;
  size_t k;
  int refused = 0;

  if (r > 0)
    check_addr(&full);
  for (k = 0; k < size; k++) {
    rk = parse_copy(data, k, &part);
    if (r > 0 && (size_t)r > k && rk != 0)
      abort(); /* a prefix of a header is incomplete */
    if (r > 0 && (size_t)r <= k &&
        (rk != r || part.family != full.family ||
         (full.family != 0 &&
          (part.port != full.port || strcmp(part.host, full.host) != 0))))
      abort(); /* bytes after the header change nothing */
    if (r == 0 && rk != 0)
      abort();
    if (r < 0 && rk > 0)
      abort();
    if (refused && rk != -1)
      abort(); /* once malformed, always */
    refused = rk == -1;
  }
  if (refused && r != -1)
    abort();
  return 0;
}
