/* fork_processes (prefork workers under a blocking supervisor), the task
 * id, and what a process knows of itself: pid, CPU count, descriptor
 * limit. */
#define _GNU_SOURCE
#include "fork.h"

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
#include <time.h>
#include <unistd.h>

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

/* Restarts back off: the first after 0.1 s, doubling with each crash of
 * the same task up to 10 s; a worker that served 10 s starts it over. */
#define BACKOFF_FIRST 0.1
#define BACKOFF_MAX 10.0
#define BACKOFF_RESET 10.0

typedef struct worker {
  pid_t pid;
  int id;
  int retired; /* replaced by a reload: it drains, and is not restarted */
  int ready;   /* its loop has run */
  double born;
} worker;

typedef struct task {
  int crashes;   /* in a row, for the back-off */
  int was_ready; /* some worker of it got its loop running */
  double due;    /* when its restart is due; 0: none pending */
} task;

/* What a worker tells the supervisor on the pipe: its loop runs, or it
 * failed before and why. One write each, under PIPE_BUF: never split. */
typedef struct note {
  pid_t pid;
  int failed;
  char why[248];
} note;

typedef struct supervisor {
  lua_State *L;
  int log_idx; /* stack index of the log function(level, msg) */
  int n, max_restarts, restarts;
  worker *w; /* live workers, in no order */
  int nw, cap;
  task *t;     /* by task id */
  int pending; /* restarts waiting for their back-off */
  int sfd;     /* signalfd for the blocked signals */
  int ready_rd, ready_wr;
  sigset_t saved_mask;
  struct sigaction saved_chld;
  pid_t self;
  int stopping;
  int reload_id;    /* task id a reload is replacing, -1 if none */
  pid_t reload_pid; /* the new worker for it, until it is ready */
  int reload_again; /* a SIGHUP came while a reload ran */
  char err[400];    /* why the supervisor gives up */
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

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int sup_fail(supervisor *s, const char *what) {
  snprintf(s->err, sizeof(s->err), "fork_processes: %s: %s", what, strerror(errno));
  return SUP_FAILED;
}

static void free_tables(supervisor *s) {
  free(s->w);
  free(s->t);
  s->w = NULL;
  s->t = NULL;
}

/* Runs in a new worker: drop the supervisor's descriptors and signal mask,
 * and make sure the worker dies with the supervisor. */
static void worker_ready(ts_loop *loop);

static void become_worker(supervisor *s, int id) {
  close(s->sfd);
  close(s->ready_rd);
  free_tables(s);
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
  ts__loop_on_start(ts__loop(s->L), worker_ready);
  if (ts__loop_fork(s->L) != 0)
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
  s->w[s->nw].ready = 0;
  s->w[s->nw].born = now();
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

static void describe_status(char *buf, size_t size, int status) {
  if (WIFSIGNALED(status))
    snprintf(buf, size, "killed by signal %d", WTERMSIG(status));
  else
    snprintf(buf, size, "exited with status %d", WEXITSTATUS(status));
}

/* Schedules a new worker for task `id`, whose worker `pid` died (`how`)
 * after `lived` seconds; gives up past max_restarts. */
static int restart(supervisor *s, int id, pid_t pid, const char *how, double lived) {
  task *t = &s->t[id];
  double delay = BACKOFF_FIRST;
  int i;

  if (++s->restarts > s->max_restarts) {
    snprintf(s->err, sizeof(s->err),
             "fork_processes: too many child "
             "restarts (%d), giving up: child %d (pid %d) %s",
             s->max_restarts, id, (int)pid, how);
    return SUP_FAILED;
  }
  t->crashes = lived >= BACKOFF_RESET ? 1 : t->crashes + 1;
  for (i = 1; i < t->crashes && delay < BACKOFF_MAX; i++)
    delay *= 2;
  if (delay > BACKOFF_MAX)
    delay = BACKOFF_MAX;
  sup_log(s, "warning",
          "child %d (pid %d) %s, restarting in %g s "
          "(restart %d of %d)",
          id, (int)pid, how, delay, s->restarts, s->max_restarts);
  if (t->due == 0)
    s->pending++;
  t->due = now() + delay;
  return SUP_CONTINUE;
}

/* Starts the restarts that are due: the task id in a new worker. */
static int start_due(supervisor *s) {
  double t = now();
  int id, r = SUP_CONTINUE;

  for (id = 0; id < s->n && r == SUP_CONTINUE; id++) {
    if (s->t[id].due == 0 || s->t[id].due > t)
      continue;
    s->t[id].due = 0;
    s->pending--;
    r = spawn_step(s, id, NULL);
  }
  return r;
}

/* Milliseconds until the next restart is due, -1 if none is. */
static int next_due_ms(supervisor *s) {
  double first = 0, t = now();
  int id;

  for (id = 0; id < s->n; id++)
    if (s->t[id].due != 0 && (first == 0 || s->t[id].due < first))
      first = s->t[id].due;
  if (first == 0)
    return -1;
  return first <= t ? 0 : (int)((first - t) * 1000) + 1;
}

static void cancel_restarts(supervisor *s) {
  int id;
  for (id = 0; id < s->n; id++)
    s->t[id].due = 0;
  s->pending = 0;
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

static worker *find_worker(supervisor *s, pid_t pid) {
  int i;
  for (i = 0; i < s->nw; i++)
    if (s->w[i].pid == pid)
      return &s->w[i];
  return NULL;
}

/* A worker's loop runs. If it is the new worker of a reload, the old one
 * drains and exits. */
static int on_ready(supervisor *s, pid_t pid) {
  worker *w = find_worker(s, pid);
  int i;

  if (w == NULL)
    return SUP_CONTINUE;
  w->ready = 1;
  s->t[w->id].was_ready = 1;
  if (pid != s->reload_pid)
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

/* A task none of whose workers ever got its loop running failed: the start
 * failed (a port in use, a bug in the script), and restarting would only
 * fail again. `why` is the worker's message, or how it exited. */
static int start_failed(supervisor *s, int id, pid_t pid, const char *why) {
  snprintf(s->err, sizeof(s->err), "fork_processes: worker %d (pid %d) %s", id, (int)pid,
           why);
  return SUP_FAILED;
}

/* A worker reports that it fails before its loop runs, and why: it exits
 * next. */
static int on_failed(supervisor *s, pid_t pid, const char *why) {
  worker *w = find_worker(s, pid);
  char msg[300];

  if (w == NULL || w->retired || s->stopping)
    return SUP_CONTINUE;
  snprintf(msg, sizeof(msg), "failed before its loop ran: %s", why);
  if (pid == s->reload_pid)
    sup_log(s, "error", "reload: the new worker for task %d (pid %d) %s", w->id, (int)pid,
            msg);
  else if (!s->t[w->id].was_ready)
    return start_failed(s, w->id, pid, msg);
  else
    sup_log(s, "error", "child %d (pid %d) %s", w->id, (int)pid, msg);
  return SUP_CONTINUE;
}

/* The new worker of a reload died before it was ready (bad new code, say):
 * the old one keeps serving and the reload stops there. */
static int reload_failed(supervisor *s, worker *w, int status) {
  char how[64];

  describe_status(how, sizeof(how), status);
  sup_log(s, "error",
          "reload: the new worker for task %d (pid %d) %s before "
          "it was ready; keeping the old workers",
          w->id, (int)w->pid, how);
  s->reload_id = -1;
  s->reload_pid = 0;
  s->reload_again = 0;
  return has_worker(s, w->id) ? SUP_CONTINUE
                              : restart(s, w->id, w->pid, how, now() - w->born);
}

static int on_worker_exit(supervisor *s, pid_t pid, int status) {
  worker *found = find_worker(s, pid), w;
  char how[64], why[100];

  if (found == NULL) /* not a worker: a Subprocess started before the fork */
    return SUP_CONTINUE;
  w = *found;
  *found = s->w[--s->nw];
  if (w.retired || s->stopping)
    return SUP_CONTINUE;
  if (pid == s->reload_pid)
    return reload_failed(s, &w, status);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
    sup_log(s, "info", "child %d (pid %d) exited normally", w.id, (int)pid);
    return SUP_CONTINUE;
  }
  describe_status(how, sizeof(how), status);
  if (!w.ready && !s->t[w.id].was_ready) {
    snprintf(why, sizeof(why), "%s before its loop ran", how);
    return start_failed(s, w.id, pid, why);
  }
  /* During a reload of this task, its new worker takes over. */
  return has_worker(s, w.id) ? SUP_CONTINUE : restart(s, w.id, pid, how, now() - w.born);
}

static void forward(supervisor *s, int signo) {
  int i;

  if (!s->stopping)
    sup_log(s, "info", "got signal %d: stopping %d workers", signo, s->nw);
  s->stopping = 1;
  s->reload_id = -1;
  s->reload_pid = 0;
  cancel_restarts(s);
  for (i = 0; i < s->nw; i++)
    kill(s->w[i].pid, signo);
}

/* Reads the notes that wait on the pipe, all of them. */
static int read_notes(supervisor *s) {
  note notes[16];
  ssize_t n = sizeof(notes);
  int i, r = SUP_CONTINUE;

  while (r == SUP_CONTINUE && n == (ssize_t)sizeof(notes)) {
    n = read(s->ready_rd, notes, sizeof(notes));
    for (i = 0; r == SUP_CONTINUE && i < (int)(n / (ssize_t)sizeof(note)); i++) {
      notes[i].why[sizeof(notes[i].why) - 1] = '\0';
      r = notes[i].failed ? on_failed(s, notes[i].pid, notes[i].why)
                          : on_ready(s, notes[i].pid);
    }
  }
  return r;
}

static int reap(supervisor *s) {
  int status, r = SUP_CONTINUE;
  pid_t pid;

  while (r == SUP_CONTINUE && (pid = waitpid(-1, &status, WNOHANG)) > 0) {
    /* What it wrote before it exited may have come after the last read
     * (it exited since): whether it was ready depends on it. */
    r = read_notes(s);
    if (r == SUP_CONTINUE)
      r = on_worker_exit(s, pid, status);
  }
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

/* The supervision loop: returns a task id in a new worker, SUP_DONE once
 * every worker is gone, SUP_FAILED when it gives up. */
static int supervise(supervisor *s) {
  struct pollfd fds[2];
  int r = SUP_CONTINUE;

  while (r == SUP_CONTINUE && (s->nw > 0 || s->pending > 0)) {
    fds[0].fd = s->ready_rd;
    fds[1].fd = s->sfd;
    fds[0].events = fds[1].events = POLLIN;
    if (poll(fds, 2, next_due_ms(s)) < 0) {
      if (errno != EINTR)
        r = sup_fail(s, "poll");
      continue;
    }
    /* Notes first: a worker writes them before it can exit. */
    if (fds[0].revents & POLLIN)
      r = read_notes(s);
    if (r == SUP_CONTINUE && (fds[1].revents & POLLIN))
      r = read_signals(s);
    if (r == SUP_CONTINUE && s->pending > 0)
      r = start_due(s);
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
  s->t = calloc((size_t)s->n, sizeof(*s->t));
  if (s->w == NULL || s->t == NULL || pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0)
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
  free_tables(s);
  return -1;
}

static void sup_close(supervisor *s) {
  close(s->sfd);
  close(s->ready_rd);
  close(s->ready_wr);
  free_tables(s);
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
    return luaL_error(L, "fork_processes: already called (this is task %d)", the_task_id);
  if ((ts__loop_find(L) != NULL && ts__loop_find(L)->running) || ts__in_task(L))
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
  /* No position: luahost prints it as the one line that explains. */
  lua_pushstring(L, s.err);
  return lua_error(L);
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

/* Sends a note to the supervisor, once: 1 if it went out. */
static int tell_supervisor(int failed, const char *why) {
  note n;
  int sent = 0;

  if (ready_fd < 0)
    return 0;
  memset(&n, 0, sizeof(n));
  n.pid = getpid();
  n.failed = failed;
  if (why != NULL)
    snprintf(n.why, sizeof(n.why), "%.*s", (int)strcspn(why, "\n"), why);
  /* Non-blocking, and SIGPIPE is ignored: a gone supervisor costs nothing. */
  if (getppid() == the_supervisor) {
    sent = write(ready_fd, &n, sizeof(n)) == (ssize_t)sizeof(n);
    if (!sent)
      fprintf(stderr, "tcpserver: cannot tell the supervisor: %s\n", strerror(errno));
  }
  close(ready_fd);
  ready_fd = -1;
  return sent;
}

/* The worker's loop runs: it is ready (see fork_processes). */
static void worker_ready(ts_loop *loop) {
  (void)loop;
  tell_supervisor(0, NULL);
}

/* core.start_failed(message) -> whether the supervisor got it: in a worker
 * whose loop has not run yet, the supervisor reports the first line of
 * `message` for it (once for all workers) and stops the start. */
static int l_start_failed(lua_State *L) {
  lua_pushboolean(L, tell_supervisor(1, luaL_checkstring(L, 1)));
  return 1;
}

int ts__open_fork(lua_State *L) {
  static const luaL_Reg funcs[] = {{"cpu_count", l_cpu_count},
                                   {"raise_fd_limit", l_raise_fd_limit},
                                   {"fork_processes", l_fork_processes},
                                   {"task_id", l_task_id},
                                   {"getpid", l_getpid},
                                   {"start_failed", l_start_failed},
                                   {NULL, NULL}};

  luaL_setfuncs(L, funcs, 0);
  return 0;
}
