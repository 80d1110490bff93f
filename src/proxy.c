/* PROXY protocol v1 and v2 (HAProxy's proxy-protocol.txt): a pure parser
 * over bytes. Waiting for the bytes is the accept pipeline's business
 * (server.c). */
#include "proxy.h"

#include <arpa/inet.h>
#include <string.h>
#include <sys/socket.h>

#define V1_MAX 107 /* the spec's longest v1 line, CRLF included */
#define V2_HEAD 16 /* signature, version/command, family, length */
#define V2_MAX_BODY (TS_PROXY_MAX_HEADER - V2_HEAD) /* addresses and TLVs */
#define V2_LEN_INET 12                              /* two IPv4 addresses, two ports */
#define V2_LEN_INET6 36
#define V2_LEN_UNIX 216 /* two 108-byte paths */

static const char v2_sig[12] = "\r\n\r\n\0\r\nQUIT\n";

/* A v1 field: the bytes up to the next space (or the end of the line). */
typedef struct field {
  const char *p;
  size_t n;
} field;

/* Splits line[0, n) at single spaces into at most max fields; returns how
 * many, or -1 for an empty field (two spaces, or a trailing space). */
static int split(const char *line, size_t n, field *f, int max) {
  size_t start = 0, i;
  int k = 0;

  for (i = 0; i <= n; i++) {
    if (i < n && line[i] != ' ')
      continue;
    if (i == start || k == max)
      return -1;
    f[k].p = line + start;
    f[k].n = i - start;
    k++;
    start = i + 1;
  }
  return k;
}

static int field_is(const field *f, const char *s) {
  return f->n == strlen(s) && memcmp(f->p, s, f->n) == 0;
}

/* An IP of the given family, as text; writes it to host if not NULL. */
static int parse_ip(const field *f, int family, char *host) {
  char text[INET6_ADDRSTRLEN];
  unsigned char bin[16];

  if (f->n == 0 || f->n >= sizeof(text) || memchr(f->p, '\0', f->n) != NULL)
    return -1;
  memcpy(text, f->p, f->n);
  text[f->n] = '\0';
  if (inet_pton(family, text, bin) != 1)
    return -1;
  if (host != NULL)
    memcpy(host, text, f->n + 1);
  return 0;
}

/* A port: 1 to 5 decimal digits, at most 65535. */
static long parse_port(const field *f) {
  long v = 0;
  size_t i;

  if (f->n == 0 || f->n > 5)
    return -1;
  for (i = 0; i < f->n; i++) {
    if (f->p[i] < '0' || f->p[i] > '9')
      return -1;
    v = v * 10 + (f->p[i] - '0');
  }
  return v <= 65535 ? v : -1;
}

/* "PROXY TCP4|TCP6 src dst sport dport\r\n" or "PROXY UNKNOWN ...\r\n". */
static long parse_v1(const char *p, size_t n, ts_proxy_addr *a, const char **why) {
  const char *nl = memchr(p, '\n', n < V1_MAX ? n : V1_MAX);
  size_t len;
  field f[5];
  long sport;
  int family;

  if (nl == NULL) {
    *why = "header line too long";
    return n >= V1_MAX ? -1 : 0;
  }
  len = (size_t)(nl - p) + 1;
  *why = "malformed v1 header";
  if (len < 8 || p[len - 2] != '\r')
    return -1;
  /* The fields after "PROXY ", without the CRLF. */
  if (len - 2 - 6 >= 7 && memcmp(p + 6, "UNKNOWN", 7) == 0 &&
      (len - 2 - 6 == 7 || p[6 + 7] == ' ')) {
    a->family = 0; /* the balancer could not tell: keep the real peer */
    return (long)len;
  }
  if (split(p + 6, len - 2 - 6, f, 5) != 5)
    return -1;
  family = field_is(&f[0], "TCP4") ? AF_INET : field_is(&f[0], "TCP6") ? AF_INET6 : 0;
  if (family == 0 || parse_ip(&f[1], family, a->host) != 0 ||
      parse_ip(&f[2], family, NULL) != 0 || (sport = parse_port(&f[3])) < 0 ||
      parse_port(&f[4]) < 0)
    return -1;
  a->family = family;
  a->port = (int)sport;
  return (long)len;
}

/* Checks the v2 address block of a PROXY command; 0 or -1 (sets *why). */
static int check_v2_block(const unsigned char *p, size_t body, const char **why) {
  static const size_t need[4] = {0, V2_LEN_INET, V2_LEN_INET6, V2_LEN_UNIX};
  int family = p[13] >> 4, transport = p[13] & 15;

  if (family > 3) {
    *why = "unknown v2 address family";
    return -1;
  }
  if (transport > 2) {
    *why = "unknown v2 transport";
    return -1;
  }
  if (body < need[family]) {
    *why = "malformed v2 header";
    return -1;
  }
  return 0;
}

/* The binary header: signature, version 2 and LOCAL or PROXY, family and
 * transport, body length, addresses, TLVs (skipped). */
static long parse_v2(const unsigned char *p, size_t n, ts_proxy_addr *a,
                     const char **why) {
  size_t body;

  if (n < V2_HEAD)
    return 0;
  body = (size_t)p[14] << 8 | p[15];
  *why = "malformed v2 header";
  if ((p[12] >> 4) != 2 || (p[12] & 15) > 1)
    return -1;
  *why = "header too large";
  if (body > V2_MAX_BODY)
    return -1;
  if ((p[12] & 15) == 1 && check_v2_block(p, body, why) != 0)
    return -1;
  if (n < V2_HEAD + body)
    return 0;
  a->family = 0; /* LOCAL (a health check), UNSPEC and UNIX keep the peer */
  if ((p[12] & 15) == 1 && (p[13] >> 4) == 1) {
    inet_ntop(AF_INET, p + 16, a->host, sizeof(a->host));
    a->port = p[24] << 8 | p[25];
    a->family = AF_INET;
  } else if ((p[12] & 15) == 1 && (p[13] >> 4) == 2) {
    inet_ntop(AF_INET6, p + 16, a->host, sizeof(a->host));
    a->port = p[48] << 8 | p[49];
    a->family = AF_INET6;
  }
  return (long)(V2_HEAD + body);
}

long ts_proxy_parse(const char *p, size_t n, ts_proxy_addr *out, const char **why) {
  *why = "no PROXY header";
  if (n == 0)
    return 0;
  if (memcmp(p, "PROXY ", n < 6 ? n : 6) == 0)
    return n < 6 ? 0 : parse_v1(p, n, out, why);
  if (memcmp(p, v2_sig, n < 12 ? n : 12) == 0)
    return parse_v2((const unsigned char *)p, n, out, why);
  return -1;
}
