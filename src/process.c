/* Child processes: Subprocess (uv_spawn with our streams on its pipes),
 * fork_processes (prefork workers under a blocking supervisor) and the CPU
 * count. */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#define TS_PROCESS_MT "tcpserver.subprocess"

typedef struct ts_process {
  uv_process_t h;
  lua_State *co;
  int co_ref, self_ref;
  int exited, closed;
  int64_t status;
  int term_signal;
} ts_process;

static void process_closed(uv_handle_t *h) {
  ts_process *p = h->data;
  luaL_unref(((ts_loop *)h->loop->data)->L, LUA_REGISTRYINDEX, p->self_ref);
}

static void exit_cb(uv_process_t *h, int64_t status, int term_signal) {
  ts_process *p = h->data;
  lua_State *co = p->co;
  int ref = p->co_ref;

  p->exited = 1;
  p->status = status;
  p->term_signal = term_signal;
  p->closed = 1;
  uv_close((uv_handle_t *)h, process_closed);
  if (co != NULL) {
    p->co = NULL;
    p->co_ref = LUA_NOREF;
    lua_pushinteger(co, status);
    lua_pushinteger(co, term_signal);
    ts__resume(co, 2);
    luaL_unref(co, LUA_REGISTRYINDEX, ref);
  }
}

/* Builds a NULL-terminated array of the strings in table `idx` on a
 * userdata left on the stack (freed by the GC). */
static char **string_array(lua_State *L, int idx, const char *what) {
  lua_Integer n = luaL_len(L, idx), i;
  char **v = lua_newuserdatauv(L, sizeof(char *) * (size_t)(n + 1), 1);
  lua_pushvalue(L, idx); /* keeps the strings alive with the array */
  lua_setiuservalue(L, -2, 1);
  for (i = 1; i <= n; i++) {
    if (lua_geti(L, idx, i) != LUA_TSTRING)
      luaL_error(L, "Subprocess: %s[%d] is not a string", what, (int)i);
    v[i - 1] = (char *)lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  v[n] = NULL;
  return v;
}

/* Sets up stdio slot `fd`: "pipe" gives a stream, nil inherits, "null"
 * leaves it closed. Pushes the stream or nil. */
static void setup_stdio(lua_State *L, uv_stdio_container_t *c, int fd,
                        const char *mode, int child_reads) {
  ts_stream *s;

  if (mode == NULL) {
    c->flags = UV_INHERIT_FD;
    c->data.fd = fd;
    lua_pushnil(L);
  } else if (strcmp(mode, "pipe") == 0) {
    s = ts__stream_new(L, 1);
    c->flags = UV_CREATE_PIPE | (child_reads ? UV_READABLE_PIPE : UV_WRITABLE_PIPE);
    c->data.stream = ts__stream_handle(s);
  } else if (strcmp(mode, "null") == 0) {
    c->flags = UV_IGNORE;
    lua_pushnil(L);
  } else {
    luaL_error(L, "Subprocess: stdio mode must be \"pipe\", \"null\" or nil");
  }
}

static void close_stream_at(lua_State *L, int idx) {
  if (lua_isnil(L, idx))
    return;
  lua_getfield(L, idx, "close");
  lua_pushvalue(L, idx);
  lua_call(L, 1, 0);
}

/* core.spawn_process(argv, stdin, stdout, stderr [, env]) ->
 *   process, stdin_stream, stdout_stream, stderr_stream */
static int l_spawn_process(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  uv_process_options_t opts;
  uv_stdio_container_t stdio[3];
  const char *modes[3];
  ts_process *p;
  int i, err, base;

  luaL_checktype(L, 1, LUA_TTABLE);
  for (i = 0; i < 3; i++)
    modes[i] = luaL_optstring(L, 2 + i, NULL);
  memset(&opts, 0, sizeof(opts));
  opts.args = string_array(L, 1, "argv");
  luaL_argcheck(L, opts.args[0] != NULL, 1, "empty argv");
  opts.file = opts.args[0];
  if (lua_istable(L, 5))
    opts.env = string_array(L, 5, "env");
  p = lua_newuserdatauv(L, sizeof(*p), 0);
  memset(p, 0, sizeof(*p));
  luaL_setmetatable(L, TS_PROCESS_MT);
  base = lua_gettop(L);
  for (i = 0; i < 3; i++)
    setup_stdio(L, &stdio[i], i, modes[i], i == 0);
  opts.stdio = stdio;
  opts.stdio_count = 3;
  opts.exit_cb = exit_cb;
  p->co_ref = LUA_NOREF;
  p->h.data = p;
  lua_pushvalue(L, base);
  p->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  err = uv_spawn(loop->uv, &p->h, &opts);
  if (err != 0) {
    /* The handle is initialized even when the spawn fails. */
    p->closed = p->exited = 1;
    uv_close((uv_handle_t *)&p->h, process_closed);
    for (i = 1; i <= 3; i++)
      close_stream_at(L, base + i);
    return luaL_error(L, "Subprocess: cannot run %s: %s", opts.file,
                      uv_strerror(err));
  }
  for (i = 2; i <= 3; i++) /* the child's stdout and stderr */
    if (!lua_isnil(L, base + i))
      ts__stream_start(luaL_checkudata(L, base + i, TS_STREAM_MT));
  return 4;
}

static ts_process *check_process(lua_State *L) {
  return luaL_checkudata(L, 1, TS_PROCESS_MT);
}

static int proc_pid(lua_State *L) {
  lua_pushinteger(L, check_process(L)->h.pid);
  return 1;
}

static int proc_kill(lua_State *L) {
  ts_process *p = check_process(L);
  int sig = (int)luaL_optinteger(L, 2, 15);
  int err = p->closed ? UV_ESRCH : uv_process_kill(&p->h, sig);
  lua_pushboolean(L, err == 0);
  return 1;
}

/* wait_for_exit() -> exit status, terminating signal (0 if none) */
static int proc_wait(lua_State *L) {
  ts_process *p = check_process(L);

  if (p->exited) {
    lua_pushinteger(L, p->status);
    lua_pushinteger(L, p->term_signal);
    return 2;
  }
  if (p->co != NULL)
    return luaL_error(L, "wait_for_exit: already waiting");
  ts__check_task(L, "wait_for_exit");
  p->co = L;
  lua_pushthread(L);
  p->co_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return ts__park(L);
}

/* Raises the soft descriptor limit to the hard one; returns the limit. */
static int l_raise_fd_limit(lua_State *L) {
  struct rlimit rl;

  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return 0;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  lua_pushinteger(L, (lua_Integer)rl.rlim_cur);
  return 1;
}

static int l_cpu_count(lua_State *L) {
  unsigned int n = 0;
  uv_cpu_info_t *info;
  int count;

  if (uv_cpu_info(&info, &count) == 0) {
    n = (unsigned)count;
    uv_free_cpu_info(info, count);
  }
  lua_pushinteger(L, n > 0 ? n : 1);
  return 1;
}

/* ---- fork_processes: prefork workers under a blocking supervisor ----
 *
 * As in Tornado, the parent forks n workers and then never returns to Lua:
 * it runs a blocking loop of its own (not the libuv loop, which belongs to
 * the workers) that restarts crashed workers, forwards SIGTERM and SIGINT,
 * replaces the workers one by one on SIGHUP, and exits 0 once they are all
 * gone. Its signals are blocked and read from a signalfd; workers tell it
 * they are ready (their loop started) by writing their pid on a pipe, which
 * is what a rolling reload waits for before it stops an old worker. */

enum { SUP_CONTINUE = -1, SUP_DONE = -2, SUP_FAILED = -3 };

typedef struct worker {
  pid_t pid;
  int id;
  int retired; /* replaced by a reload: it drains, and is not restarted */
} worker;

typedef struct supervisor {
  lua_State *L;
  int log_idx;           /* stack index of the log function(level, msg) */
  int n, max_restarts, restarts;
  worker *w;             /* live workers, in no order */
  int nw, cap;
  int sfd;               /* signalfd for the blocked signals */
  int ready_rd, ready_wr;
  sigset_t saved_mask;
  struct sigaction saved_chld;
  pid_t self;
  int stopping;
  int reload_id;         /* task id a reload is replacing, -1 if none */
  pid_t reload_pid;      /* the new worker for it, until it is ready */
  int reload_again;      /* a SIGHUP came while a reload ran */
  char err[200];         /* why the supervisor gives up */
} supervisor;

/* What a forked worker knows about itself. */
static int the_task_id = -1;
static int ready_fd = -1;
static pid_t the_supervisor;

static void sup_log(supervisor *s, const char *level, const char *fmt, ...) {
  char msg[256];
  va_list ap;

  int logged = 0;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof(msg), fmt, ap);
  va_end(ap);
  if (lua_isfunction(s->L, s->log_idx)) {
    lua_pushvalue(s->L, s->log_idx);
    lua_pushstring(s->L, level);
    lua_pushstring(s->L, msg);
    logged = lua_pcall(s->L, 2, 0, 0) == LUA_OK;
    if (!logged)
      lua_pop(s->L, 1);
  }
  if (!logged)
    fprintf(stderr, "tcpserver: %s\n", msg);
}

static int sup_fail(supervisor *s, const char *what) {
  snprintf(s->err, sizeof(s->err), "fork_processes: %s: %s", what,
           strerror(errno));
  return SUP_FAILED;
}

/* Runs in a new worker: drop the supervisor's descriptors and signal mask,
 * and make sure the worker dies with the supervisor. */
static void become_worker(supervisor *s, int id) {
  close(s->sfd);
  close(s->ready_rd);
  free(s->w);
  s->w = NULL;
  the_task_id = id;
  ready_fd = s->ready_wr;
  the_supervisor = s->self;
  /* Killing the supervisor must not leave orphans (Tornado #1912): the
   * kernel sends SIGTERM when it dies; if it died before we asked, there is
   * nobody left to serve for. */
  if (prctl(PR_SET_PDEATHSIG, SIGTERM) != 0 || getppid() != s->self)
    _exit(0);
  sigaction(SIGCHLD, &s->saved_chld, NULL);
  /* The loop first: a signal unblocked before it has its own signal pipe
   * would be written to the supervisor's. */
  if (ts__loop_fork() != 0)
    fprintf(stderr, "tcpserver: worker %d: cannot reinitialize the loop\n", id);
  sigprocmask(SIG_SETMASK, &s->saved_mask, NULL);
}

/* Forks a worker for task `id`: 1 in the supervisor (*pidp is its pid), 0
 * in the worker, -1 if it cannot. */
static int spawn(supervisor *s, int id, pid_t *pidp) {
  worker *w;
  pid_t pid;

  if (s->nw == s->cap) {
    w = realloc(s->w, sizeof(*w) * (size_t)(s->cap * 2));
    if (w == NULL)
      return -1;
    s->w = w;
    s->cap *= 2;
  }
  fflush(NULL); /* or the worker would write the buffered output again */
  pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    become_worker(s, id);
    return 0;
  }
  s->w[s->nw].pid = pid;
  s->w[s->nw].id = id;
  s->w[s->nw].retired = 0;
  s->nw++;
  if (pidp != NULL)
    *pidp = pid;
  return 1;
}

/* spawn() for the supervision loop: the task id in the new worker,
 * SUP_CONTINUE in the supervisor, SUP_FAILED if fork failed. */
static int spawn_step(supervisor *s, int id, pid_t *pidp) {
  int r = spawn(s, id, pidp);
  if (r == 0)
    return id;
  return r > 0 ? SUP_CONTINUE : sup_fail(s, "cannot fork");
}

/* Whether task `id` has a worker that is not being replaced. */
static int has_worker(supervisor *s, int id) {
  int i;
  for (i = 0; i < s->nw; i++)
    if (s->w[i].id == id && !s->w[i].retired)
      return 1;
  return 0;
}

static int restart(supervisor *s, int id) {
  if (++s->restarts > s->max_restarts) {
    snprintf(s->err, sizeof(s->err),
             "fork_processes: too many child restarts (%d), giving up",
             s->max_restarts);
    return SUP_FAILED;
  }
  return spawn_step(s, id, NULL);
}

static void describe_status(char *buf, size_t size, int status) {
  if (WIFSIGNALED(status))
    snprintf(buf, size, "killed by signal %d", WTERMSIG(status));
  else
    snprintf(buf, size, "exited with status %d", WEXITSTATUS(status));
}

static int start_reload(supervisor *s);

/* Starts the new worker for the next task id that has one; finishes the
 * reload after the last. */
static int reload_step(supervisor *s) {
  for (; s->reload_id < s->n; s->reload_id++)
    if (has_worker(s, s->reload_id))
      return spawn_step(s, s->reload_id, &s->reload_pid);
  sup_log(s, "info", "reload done");
  s->reload_id = -1;
  s->reload_pid = 0;
  if (s->reload_again) {
    s->reload_again = 0;
    return start_reload(s);
  }
  return SUP_CONTINUE;
}

static int start_reload(supervisor *s) {
  sup_log(s, "info", "SIGHUP: replacing the workers one by one");
  s->reload_id = 0;
  return reload_step(s);
}

/* The new worker of a reload is ready: the old one drains and exits. */
static int on_ready(supervisor *s, pid_t pid) {
  int i;

  if (pid <= 0 || pid != s->reload_pid)
    return SUP_CONTINUE;
  for (i = 0; i < s->nw; i++) {
    if (s->w[i].id == s->reload_id && s->w[i].pid != pid && !s->w[i].retired) {
      s->w[i].retired = 1;
      kill(s->w[i].pid, SIGTERM);
    }
  }
  s->reload_pid = 0;
  s->reload_id++;
  return reload_step(s);
}

/* The new worker of a reload died before it was ready (bad new code, say):
 * the old one keeps serving and the reload stops there. */
static int reload_failed(supervisor *s, int id, pid_t pid, int status) {
  char how[64];

  describe_status(how, sizeof(how), status);
  sup_log(s, "error", "reload: the new worker for task %d (pid %d) %s before "
          "it was ready; keeping the old workers", id, (int)pid, how);
  s->reload_id = -1;
  s->reload_pid = 0;
  s->reload_again = 0;
  return has_worker(s, id) ? SUP_CONTINUE : restart(s, id);
}

static int on_worker_exit(supervisor *s, pid_t pid, int status) {
  char how[64];
  int i, id;

  for (i = 0; i < s->nw && s->w[i].pid != pid; i++)
    ;
  if (i == s->nw) /* not a worker: a Subprocess started before the fork */
    return SUP_CONTINUE;
  id = s->w[i].id;
  if (s->w[i].retired || s->stopping) {
    s->w[i] = s->w[--s->nw];
    return SUP_CONTINUE;
  }
  s->w[i] = s->w[--s->nw];
  if (pid == s->reload_pid)
    return reload_failed(s, id, pid, status);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    sup_log(s, "info", "child %d (pid %d) exited normally", id, (int)pid);
    return SUP_CONTINUE;
  }
  describe_status(how, sizeof(how), status);
  sup_log(s, "warning", "child %d (pid %d) %s, restarting", id, (int)pid, how);
  /* During a reload of this task, its new worker takes over. */
  return has_worker(s, id) ? SUP_CONTINUE : restart(s, id);
}

static void forward(supervisor *s, int signo) {
  int i;

  if (!s->stopping)
    sup_log(s, "info", "got signal %d: stopping %d workers", signo, s->nw);
  s->stopping = 1;
  s->reload_id = -1;
  s->reload_pid = 0;
  for (i = 0; i < s->nw; i++)
    kill(s->w[i].pid, signo);
}

static int reap(supervisor *s) {
  int status, r = SUP_CONTINUE;
  pid_t pid;

  while (r == SUP_CONTINUE && (pid = waitpid(-1, &status, WNOHANG)) > 0)
    r = on_worker_exit(s, pid, status);
  return r;
}

static int read_signals(supervisor *s) {
  struct signalfd_siginfo si;
  int r = SUP_CONTINUE;

  while (r == SUP_CONTINUE && read(s->sfd, &si, sizeof(si)) == sizeof(si)) {
    if (si.ssi_signo == SIGCHLD)
      r = reap(s);
    else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
      forward(s, (int)si.ssi_signo);
    else if (si.ssi_signo == SIGHUP && !s->stopping && s->reload_id >= 0)
      s->reload_again = 1;
    else if (si.ssi_signo == SIGHUP && !s->stopping)
      r = start_reload(s);
  }
  return r;
}

static int read_ready(supervisor *s) {
  pid_t pids[64];
  ssize_t n;
  int i, r = SUP_CONTINUE;

  n = read(s->ready_rd, pids, sizeof(pids));
  for (i = 0; r == SUP_CONTINUE && i < (int)(n / (ssize_t)sizeof(pid_t)); i++)
    r = on_ready(s, pids[i]);
  return r;
}

/* The supervision loop: returns a task id in a new worker, SUP_DONE once
 * every worker is gone, SUP_FAILED when it gives up. */
static int supervise(supervisor *s) {
  struct pollfd fds[2];
  int r = SUP_CONTINUE;

  while (r == SUP_CONTINUE && s->nw > 0) {
    fds[0].fd = s->ready_rd;
    fds[1].fd = s->sfd;
    fds[0].events = fds[1].events = POLLIN;
    if (poll(fds, 2, -1) < 0) {
      if (errno != EINTR)
        r = sup_fail(s, "poll");
      continue;
    }
    /* Readiness first: a worker writes it before it can exit. */
    if (fds[0].revents & POLLIN)
      r = read_ready(s);
    if (r == SUP_CONTINUE && (fds[1].revents & POLLIN))
      r = read_signals(s);
  }
  return r == SUP_CONTINUE ? SUP_DONE : r;
}

/* Stops the workers that are left and waits for them (giving up). */
static void terminate_all(supervisor *s) {
  int i;

  for (i = 0; i < s->nw; i++)
    kill(s->w[i].pid, SIGTERM);
  for (i = 0; i < s->nw; i++)
    while (waitpid(s->w[i].pid, NULL, 0) < 0 && errno == EINTR)
      ;
  s->nw = 0;
}

/* Blocks the signals the supervisor handles and reads them from a
 * signalfd. Only this thread's mask changes: a process that started other
 * threads before forking (libuv's thread pool, for a name lookup) may have
 * them take these signals instead. */
static int sup_open(supervisor *s) {
  struct sigaction dfl;
  sigset_t set;
  int fds[2];

  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGHUP);
  s->sfd = s->ready_rd = s->ready_wr = -1;
  s->w = malloc(sizeof(*s->w) * (size_t)(s->cap = 2 * s->n));
  if (s->w == NULL || pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0)
    goto fail;
  s->ready_rd = fds[0];
  s->ready_wr = fds[1];
  if (sigprocmask(SIG_BLOCK, &set, &s->saved_mask) != 0)
    goto fail;
  s->sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (s->sfd < 0) {
    sigprocmask(SIG_SETMASK, &s->saved_mask, NULL);
    goto fail;
  }
  /* A log line to a closed pipe must not kill the supervisor (the workers
   * ignore SIGPIPE anyway: the loop does). */
  signal(SIGPIPE, SIG_IGN);
  /* With SIGCHLD ignored the kernel would reap the workers unreported. */
  sigaction(SIGCHLD, NULL, &s->saved_chld);
  if (s->saved_chld.sa_handler == SIG_IGN) {
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    sigaction(SIGCHLD, &dfl, NULL);
  }
  return 0;
fail:
  sup_fail(s, "cannot set up the supervisor");
  if (s->ready_rd >= 0) {
    close(s->ready_rd);
    close(s->ready_wr);
  }
  free(s->w);
  s->w = NULL;
  return -1;
}

static void sup_close(supervisor *s) {
  close(s->sfd);
  close(s->ready_rd);
  close(s->ready_wr);
  free(s->w);
  s->w = NULL;
  sigaction(SIGCHLD, &s->saved_chld, NULL);
  sigprocmask(SIG_SETMASK, &s->saved_mask, NULL);
}

/* core.fork_processes(n, max_restarts [, log]) -> task id, in a worker.
 * The supervisor exits 0 when the workers are done, or raises when it
 * gives up (max_restarts crashes, or fork failing). log(level, message)
 * reports what happens to the workers. */
static int l_fork_processes(lua_State *L) {
  supervisor s;
  int i, r = SUP_CONTINUE;

  memset(&s, 0, sizeof(s));
  s.n = (int)luaL_checkinteger(L, 1);
  s.max_restarts = (int)luaL_checkinteger(L, 2);
  luaL_argcheck(L, s.n > 0 && s.n <= 4096, 1, "number of processes out of range");
  luaL_argcheck(L, s.max_restarts >= 0, 2, "max_restarts must not be negative");
  if (the_task_id >= 0)
    return luaL_error(L, "fork_processes: already called (this is task %d)",
                      the_task_id);
  if (ts__loop_running() || ts__in_task(L))
    return luaL_error(L, "fork_processes: cannot fork from a task or while "
                         "the loop runs");
  lua_settop(L, 3);
  s.L = L;
  s.log_idx = 3;
  s.self = getpid();
  s.reload_id = -1;
  if (sup_open(&s) != 0)
    return luaL_error(L, "%s", s.err);
  for (i = 0; i < s.n && r == SUP_CONTINUE; i++)
    r = spawn_step(&s, i, NULL);
  if (r == SUP_CONTINUE)
    r = supervise(&s);
  if (r >= 0) { /* a worker */
    lua_pushinteger(L, r);
    return 1;
  }
  if (r == SUP_DONE) {
    sup_close(&s);
    exit(0);
  }
  terminate_all(&s);
  sup_close(&s);
  return luaL_error(L, "%s", s.err);
}

/* task_id() -> the task id in a forked worker, nil elsewhere */
static int l_task_id(lua_State *L) {
  if (the_task_id < 0)
    lua_pushnil(L);
  else
    lua_pushinteger(L, the_task_id);
  return 1;
}

static int l_getpid(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)getpid());
  return 1;
}

void ts__worker_ready(void) {
  pid_t pid = getpid();

  if (ready_fd < 0)
    return;
  /* Non-blocking, and SIGPIPE is ignored: a gone supervisor costs nothing. */
  if (getppid() == the_supervisor && write(ready_fd, &pid, sizeof(pid)) < 0)
    fprintf(stderr, "tcpserver: cannot tell the supervisor: %s\n",
            strerror(errno));
  close(ready_fd);
  ready_fd = -1;
}

int ts__open_process(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"pid", proc_pid}, {"kill", proc_kill}, {"wait_for_exit", proc_wait},
    {NULL, NULL}};
  static const luaL_Reg funcs[] = {
    {"spawn_process", l_spawn_process}, {"cpu_count", l_cpu_count},
    {"raise_fd_limit", l_raise_fd_limit},
    {"fork_processes", l_fork_processes}, {"task_id", l_task_id},
    {"getpid", l_getpid},
    {NULL, NULL}};

  luaL_newmetatable(L, TS_PROCESS_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
