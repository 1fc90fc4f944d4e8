// sshtrail's BPF programs: what the processes of tracked sessions exec, open and connect to.
//
// Loaded by ebpf/tracer.py through BCC, which compiles this file at load time with the
// -D settings listed under "Settings" below. Every program is a TRACEPOINT_PROBE: this fleet's
// kernels have no kprobes and refuse fentry, but sched and syscall tracepoints work.
//
// Rules this file keeps, each forced by the kernels we run on:
//  - Never read a kernel struct through an offset from C headers. BCC compiles against Debian's
//    headers, which do not match the running kernel, so task_struct & co. would be read at the
//    wrong offsets (bcc's own exitsnoop loads here and reports nothing for that reason). We use
//    only tracepoint fields (described by tracefs, right whatever the headers), helpers, and
//    struct pt_regs, whose layout is user-visible ABI.
//  - Filter first. Every probe starts with one hash lookup on the current process (tgid) or on
//    the thread's pending syscall, and returns at once when the process belongs to no tracked
//    session: the cost for processes outside any session must stay near zero.
//  - Never drop silently. Whenever an event cannot be delivered (ring buffer full, a map full)
//    the session's counter in `lost` goes up; user space reports it as `ebpf.lost`.

#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/socket.h>

// ---- Settings (tracer.py passes them as -D; the defaults here only keep the file readable) --
#ifndef MAX_ARGS
#define MAX_ARGS 128        // argv entries read per exec
#endif
#ifndef MAX_ARG_LEN
#define MAX_ARG_LEN 512     // bytes per argv entry, NUL included
#endif
#ifndef ARGS_BUF
#define ARGS_BUF 16384      // bytes for an exec's filename and argv entries together, a power of
#endif                      // two, at most 16384 (the event must fit a per-CPU slot, <= 32 KB)
#ifndef MAX_PATH
#define MAX_PATH 1024       // bytes of an exec filename or an open path, NUL included
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 512   // ring buffer size in pages, a power of two
#endif
#ifndef MAX_CONNECTING
#define MAX_CONNECTING 10240   // tracked TCP connects waiting for their handshake at once
#endif
#ifndef MAX_PROCS
#define MAX_PROCS 65536     // processes (and threads) of tracked sessions alive at once
#endif
#ifndef MAX_KEYS
#define MAX_KEYS 16384      // sessions with a lost counter at once
#endif

// Event kinds; mirrored in decode.py.
#define EV_EXEC 1
#define EV_EXEC_FAILED 2
#define EV_OPEN 3
#define EV_CONNECT 4
#define EV_LISTEN 5
#define EV_CONNECTED 6     // a non-blocking connect's outcome; ret 0: established, -1: not

// Event flags; mirrored in decode.py.
#define F_ARGV_TRUNCATED  (1 << 0)   // fewer args than argc, or an arg cut at MAX_ARG_LEN
#define F_ARGV_UNREADABLE (1 << 1)   // the stack could not be read at all
#define F_PATH_TRUNCATED  (1 << 2)   // path cut at MAX_PATH
#define F_PATH_UNREADABLE (1 << 3)   // path could not be read from user memory

// Lost counts of events that cannot be attributed to a session (its counter slot could not be
// created because `lost` is full) go to this key.
#define KEY_UNATTRIBUTED 0xffffffff

// Processes under an sshd listener that no recorded session has claimed (Tracer.track_sshd):
// each connection's own sshd processes, and what runs in it outside a session wrapper (port
// forwarding, a login shell's startup files). Of those running as root -- the connection's
// monitor, through every authentication attempt, scanners' included -- only connects are
// reported; user space sorts the rest into sessions.
#define KEY_SSHD 0xfffffffe

// ---- Maps -------------------------------------------------------------------------------------

// Every process of a tracked session, by pid (tgid; threads get an entry too, by tid, since the
// fork tracepoint cannot tell a thread from a process). The session key is inherited at fork,
// so double forks, setsid and daemons stay in their session.
struct proc {
    u32 key;    // the session, as given to Tracer.track()
    u32 ppid;   // the process that forked this one (stays put when it is reparented)
    u32 seen;   // KEY_SSHD: an event of it has woken the reader (see submit)
    u32 _pad;
};
BPF_HASH(procs, u32, struct proc, MAX_PROCS);

// Per session: events that could not be delivered.
BPF_HASH(lost, u32, u64, MAX_KEYS);
// Every loss, counted after the session's counter: user space reads this one slot at each poll
// and walks `lost` only when it moved; and a loss neither counter slot could take is still here.
BPF_ARRAY(lost_total, u64, 1);

// A syscall of a tracked process between its enter and its exit, by thread id. The arguments are
// pointers into the process's memory; we keep them here and read what they point to at exit.
struct pending {
    u64 ptr;     // filename (execve, openat) or sockaddr (connect)
    u32 key;
    u32 ppid;
    s64 arg;     // openat flags, connect addrlen
};
BPF_HASH(pending_exec, u32, struct pending, 10240);
BPF_HASH(pending_open, u32, struct pending, 10240);
BPF_HASH(pending_connect, u32, struct pending, 10240);
BPF_HASH(pending_bind, u32, struct pending, 10240);
BPF_HASH(pending_listen, u32, struct pending, 10240);

// Every event starts with this header.
struct header {
    u64 ts_ns;      // bpf_ktime_get_ns(): CLOCK_MONOTONIC
    s64 ret;        // syscall return value (0 for a completed exec)
    u32 kind;       // EV_*
    u32 key;
    u32 pid;        // tgid
    u32 tid;
    u32 ppid;
    u32 uid;
    u32 flags;      // F_*
    u32 aux;        // open: flags; exec: argc as found on the stack
    char comm[TASK_COMM_LEN];
};

// buf holds the filename (path_len bytes, NUL included; 0 when unreadable), then the argv
// entries, each NUL-terminated, up to buf_len. One buffer for both keeps exec events as short as
// their contents in the ring.
struct exec_event {
    struct header h;
    u32 path_len;
    u32 buf_len;
    u32 args_count;
    u32 _pad;
    char buf[ARGS_BUF + MAX_ARG_LEN];   // an arg starts below ARGS_BUF and may run past it
};

struct open_event {
    struct header h;
    u32 path_len;
    u32 _pad;
    char path[MAX_PATH];
};

struct connect_event {
    struct header h;
    u16 family;     // AF_INET or AF_INET6
    u16 port;       // network byte order, as in the sockaddr
    u32 _pad;
    u8 addr[16];    // 4 bytes used for AF_INET
};

// An address a tracked process bound a socket to, by (tgid << 32 | fd), kept until the socket
// listens: listen(2) names only the fd, and the socket's own address lives in kernel structs.
struct bound {
    u16 family;
    u16 port;
    u32 _pad;
    u8 addr[16];
};
BPF_TABLE("lru_hash", u64, struct bound, bound_socks, 10240);

// Events are built in a per-CPU scratch slot, then copied into the ring buffer with only the
// bytes used: an exec with three short arguments must not take 17 KB of the ring.
union scratch {
    struct exec_event exec;
    struct open_event open;
    struct connect_event connect;
};
BPF_PERCPU_ARRAY(scratch_slot, union scratch, 1);

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

// ---- Helpers ----------------------------------------------------------------------------------

// True for a process whose execs and opens are not reported (see KEY_SSHD).
static __always_inline int quiet(struct proc *p)
{
    return p->key == KEY_SSHD && (u32)bpf_get_current_uid_gid() == 0;
}

static __always_inline void count_lost(u32 key)
{
    u64 zero = 0, *n = lost.lookup_or_try_init(&key, &zero);
    if (!n) {
        u32 other = KEY_UNATTRIBUTED;
        n = lost.lookup_or_try_init(&other, &zero);
    }
    if (n)
        __sync_fetch_and_add(n, 1);
    u32 zero_index = 0;
    u64 *total = lost_total.lookup(&zero_index);
    if (total)
        __sync_fetch_and_add(total, 1);
}

static __always_inline void fill_header(struct header *h, u32 kind, u32 key, u32 ppid, s64 ret)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    h->ts_ns = bpf_ktime_get_ns();
    h->ret = ret;
    h->kind = kind;
    h->key = key;
    h->pid = pid_tgid >> 32;
    h->tid = (u32)pid_tgid;
    h->ppid = ppid;
    h->uid = (u32)bpf_get_current_uid_gid();
    h->flags = 0;
    h->aux = 0;
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

// The reader is woken once per WAKE_BYTES submitted (a power of two: RINGBUF_PAGES is one);
// what comes between, its own timed look (Tracer.wait) takes within its timeout. A wakeup per
// event cost the agent ~0.2 ms of CPU each here, and a login alone is a hundred events.
// (BCC 0.26 has no ringbuf_query to ask what is unread; the running count needs no reset.)
// Except the first event of each KEY_SSHD process: user space places those in their connection
// through /proc, which it must read while the process lives (a login's wrapper, before its
// hello, is one: ~50 events that go by in 30 ms).
#define WAKE_BYTES (RINGBUF_PAGES * 4096 / 16)
BPF_ARRAY(submitted, u64, 1);

static __always_inline void submit(void *ev, u64 size, u32 key)
{
    u32 zero_index = 0;
    u64 flags = BPF_RB_FORCE_WAKEUP, *count = submitted.lookup(&zero_index);
    if (count) {
        u64 before = __sync_fetch_and_add(count, size);
        if (before / WAKE_BYTES == (before + size) / WAKE_BYTES)
            flags = BPF_RB_NO_WAKEUP;
    }
    if (key == KEY_SSHD) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        struct proc *p = procs.lookup(&tgid);
        if (!p || !p->seen) {
            flags = BPF_RB_FORCE_WAKEUP;
            if (p)
                p->seen = 1;
        }
    }
    if (events.ringbuf_output(ev, size, flags) < 0)
        count_lost(key);
}

// Reads a NUL-terminated user string into dst (MAX_PATH bytes); returns its length with the NUL,
// setting F_PATH_* in *flags when it was cut or unreadable.
static __always_inline u32 read_user_path(char *dst, u64 src, u32 *flags)
{
    long n = bpf_probe_read_user_str(dst, MAX_PATH, (const void *)src);
    if (n <= 0) {
        *flags |= F_PATH_UNREADABLE;
        dst[0] = 0;
        return 0;
    }
    if (n == MAX_PATH) {
        // Exactly full: cut unless the string ended right there.
        char next = 0;
        bpf_probe_read_user(&next, 1, (const void *)(src + MAX_PATH - 1));
        if (next)
            *flags |= F_PATH_TRUNCATED;
    }
    return n;
}

// ---- Session membership: fork and exit --------------------------------------------------------

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    // The forking task is current; parent_pid in the record is its thread id, so use the tgid.
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&parent);
    if (!p)
        return 0;
    struct proc child = {.key = p->key, .ppid = parent};
    u32 child_pid = args->child_pid;
    if (procs.update(&child_pid, &child) < 0)
        count_lost(p->key);   // this child and all it does would go unseen: say so
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tgid = pid_tgid >> 32, tid = (u32)pid_tgid;
    if (!procs.lookup(&tgid))
        return 0;
    pending_exec.delete(&tid);
    pending_open.delete(&tid);
    pending_connect.delete(&tid);
    pending_bind.delete(&tid);
    pending_listen.delete(&tid);
    if (tid != tgid)
        procs.delete(&tid);
    else if (args->group_dead)
        procs.delete(&tgid);
    return 0;
}

// ---- exec ---------------------------------------------------------------------------------------
#ifdef WANT_EXEC

// A completed exec. argv is read here, from the new program's stack, and not at sys_enter_execve:
// there the strings live in the caller's memory, which in a freshly forked child is often not
// paged in yet, and BPF cannot fault pages in (argv[0] was unreadable in every exec of a storm).
// Once the exec has completed, the kernel has itself just written argc, argv[] and the strings
// onto the new stack, so they are resident. The user stack pointer in the task's saved registers
// (pt_regs, ABI-stable) points at argc, followed by argv[0..argc-1].
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p || quiet(p))
        return 0;
    u32 key = p->key, ppid = p->ppid;

    // A non-leader thread that execs takes over the leader's pid; its syscall exit will come
    // under the new pid, so the entry under its old thread id would stay behind.
    if (args->old_pid != args->pid) {
        u32 old = args->old_pid;
        pending_exec.delete(&old);
    }

    u32 zero = 0;
    union scratch *s = scratch_slot.lookup(&zero);
    if (!s) {
        count_lost(key);
        return 0;
    }
    struct exec_event *e = &s->exec;
    fill_header(&e->h, EV_EXEC, key, ppid, 0);

    // The filename as the exec was asked for it (tracepoint field, in the trace record).
    unsigned short loc = args->data_loc_filename & 0xFFFF;
    long n = bpf_probe_read_kernel_str(e->buf, MAX_PATH, (char *)args + loc);
    if (n <= 0) {
        e->h.flags |= F_PATH_UNREADABLE;
        n = 0;
    } else if (n == MAX_PATH) {
        e->h.flags |= F_PATH_TRUNCATED;   // the record ends with the NUL: cannot check further
    }
    e->path_len = n;

    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    u64 sp = 0, argc = 0;
    bpf_probe_read_kernel(&sp, sizeof(sp), &regs->sp);
    if (!sp || bpf_probe_read_user(&argc, sizeof(argc), (void *)sp) < 0) {
        e->h.flags |= F_ARGV_UNREADABLE;
        argc = 0;
    }
    e->h.aux = argc;

    // The running offset and count live in the event (memory), not in registers: the verifier
    // then sees one unknown offset per iteration instead of a growing set of ranges, which made
    // verification grow faster than MAX_ARGS and fail past ~40 args. The mask (ARGS_BUF is a
    // power of two) proves the bound to it.
    e->buf_len = n;
    e->args_count = 0;
    for (int i = 0; i < MAX_ARGS; i++) {
        if (i >= argc)
            break;
        u64 off = e->buf_len;
        if (off >= ARGS_BUF) {          // the budget for all args is spent
            e->h.flags |= F_ARGV_TRUNCATED;
            break;
        }
        u64 argp = 0;
        if (bpf_probe_read_user(&argp, sizeof(argp), (void *)(sp + 8 + 8 * (u64)i)) < 0 || !argp) {
            e->h.flags |= F_ARGV_UNREADABLE;
            break;
        }
        asm volatile("" : "+r"(off));   // keeps clang from dropping the mask as useless
        off &= ARGS_BUF - 1;
        long len = bpf_probe_read_user_str(&e->buf[off], MAX_ARG_LEN, (void *)argp);
        if (len <= 0) {
            e->h.flags |= F_ARGV_UNREADABLE;
            break;
        }
        if (len == MAX_ARG_LEN) {
            char next = 0;
            bpf_probe_read_user(&next, 1, (void *)(argp + MAX_ARG_LEN - 1));
            if (next)
                e->h.flags |= F_ARGV_TRUNCATED;
        }
        e->buf_len = off + len;
        e->args_count++;
    }
    if (e->args_count < argc)
        e->h.flags |= F_ARGV_TRUNCATED;

    u64 size = offsetof(struct exec_event, buf) + e->buf_len;
    if (size > sizeof(struct exec_event))
        size = sizeof(struct exec_event);
    submit(e, size, key);
    return 0;
}

// Failed execs never reach sched_process_exec: they are caught at the syscall's exit. The
// filename pointer is kept at enter and read at exit (the old program's memory is still there,
// and the kernel has just read the string itself, so it is resident). Successful execs pass
// through here too (ret 0) and are reported by sched_process_exec instead.
static __always_inline int exec_enter(u64 filename)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p || quiet(p))
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending pe = {.ptr = filename, .key = p->key, .ppid = p->ppid};
    if (pending_exec.update(&tid, &pe) < 0)
        count_lost(p->key);
    return 0;
}

static __always_inline int exec_exit(long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending *pe = pending_exec.lookup(&tid);
    if (!pe)
        return 0;
    struct pending saved = *pe;
    pending_exec.delete(&tid);
    if (ret >= 0)
        return 0;

    u32 zero = 0;
    union scratch *s = scratch_slot.lookup(&zero);
    if (!s) {
        count_lost(saved.key);
        return 0;
    }
    struct exec_event *e = &s->exec;
    fill_header(&e->h, EV_EXEC_FAILED, saved.key, saved.ppid, ret);
    u32 n = read_user_path(e->buf, saved.ptr, &e->h.flags);
    e->path_len = n;
    e->buf_len = n;
    e->args_count = 0;
    u64 size = offsetof(struct exec_event, buf) + n;
    if (size > sizeof(struct exec_event))
        size = sizeof(struct exec_event);
    submit(e, size, saved.key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) { return exec_enter((u64)args->filename); }
TRACEPOINT_PROBE(syscalls, sys_exit_execve) { return exec_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) { return exec_enter((u64)args->filename); }
TRACEPOINT_PROBE(syscalls, sys_exit_execveat) { return exec_exit(args->ret); }

#endif  // WANT_EXEC

// ---- open ---------------------------------------------------------------------------------------
#ifdef WANT_OPEN

// The path is read at the syscall's exit, not at its enter: at enter the string may not be paged
// in yet (BPF cannot fault it in), at exit the kernel has just copied it itself. The pointer and
// flags are kept per thread in between. (open(2) and creat(2) do not exist as syscalls for
// x86-64 glibc programs, which all call openat; openat2 is rare and not traced.)
TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p || quiet(p))
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending pe = {.ptr = (u64)args->filename, .key = p->key, .ppid = p->ppid,
                         .arg = args->flags};
    if (pending_open.update(&tid, &pe) < 0)
        count_lost(p->key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending *pe = pending_open.lookup(&tid);
    if (!pe)
        return 0;
    struct pending saved = *pe;
    pending_open.delete(&tid);

    u32 zero = 0;
    union scratch *s = scratch_slot.lookup(&zero);
    if (!s) {
        count_lost(saved.key);
        return 0;
    }
    struct open_event *e = &s->open;
    fill_header(&e->h, EV_OPEN, saved.key, saved.ppid, args->ret);
    e->h.aux = (u32)saved.arg;
    u32 n = read_user_path(e->path, saved.ptr, &e->h.flags);
    e->path_len = n;
    u64 size = offsetof(struct open_event, path) + n;
    if (size > sizeof(struct open_event))
        size = sizeof(struct open_event);
    submit(e, size, saved.key);
    return 0;
}

#endif  // WANT_OPEN

// ---- connect ------------------------------------------------------------------------------------
#ifdef WANT_CONNECT

// The destination is copied from the caller's sockaddr at exit, like open paths. The source
// address is not reported: it lives in the kernel's struct sock, reachable only through struct
// offsets we cannot trust here.
TRACEPOINT_PROBE(syscalls, sys_enter_connect)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending pe = {.ptr = (u64)args->uservaddr, .key = p->key, .ppid = p->ppid,
                         .arg = args->addrlen};
    if (pending_connect.update(&tid, &pe) < 0)
        count_lost(p->key);
    return 0;
}

// Copies an IPv4 or IPv6 sockaddr of `len` bytes at `ptr` (user memory) into *b; 0 if it is
// one, else -1 (too short, unreadable, or another family: unix sockets are not the network).
// sockaddr_in6: family(2) port(2) flowinfo(4) addr(16) scope(4); sockaddr_in: family(2)
// port(2) addr(4). Read only as much as the caller said it passed.
static __always_inline int read_inet(struct bound *b, u64 ptr, u64 len)
{
    u8 sa[28] = {};
    if (len > sizeof(sa))
        len = sizeof(sa);
    if (len < 8 || bpf_probe_read_user(sa, len & 31, (void *)ptr) < 0)
        return -1;
    u16 family = sa[0] | (sa[1] << 8);
    if (family != AF_INET && family != AF_INET6)
        return -1;
    if (family == AF_INET6 && len < 24)
        return -1;
    b->family = family;
    b->port = sa[2] | (sa[3] << 8);
    __builtin_memset(b->addr, 0, sizeof(b->addr));
    if (family == AF_INET)
        __builtin_memcpy(b->addr, &sa[4], 4);
    else
        __builtin_memcpy(b->addr, &sa[8], 16);
    return 0;
}

// This CPU's scratch slot as a connect event, for the session `key`; NULL (counted lost) if
// it cannot be had.
static __always_inline struct connect_event *connect_slot(u32 key)
{
    u32 zero = 0;
    union scratch *s = scratch_slot.lookup(&zero);
    if (!s) {
        count_lost(key);
        return 0;
    }
    return &s->connect;
}

static __always_inline void submit_net(u32 kind, struct pending *saved, struct bound *b, s64 ret)
{
    struct connect_event *e = connect_slot(saved->key);
    if (!e)
        return;
    fill_header(&e->h, kind, saved->key, saved->ppid, ret);
    e->family = b->family;
    e->port = b->port;
    __builtin_memcpy(e->addr, b->addr, sizeof(e->addr));
    submit(e, sizeof(*e), saved->key);
}

// ---- a non-blocking connect's outcome ----------------------------------------------------------
// sshd's forwarded connects (ssh -W, -L, -D) are all non-blocking: the syscall says only "in
// progress" (EINPROGRESS). The socket's TCP state changes say the rest, by the socket's address
// (skaddr): SYN_SENT inside connect(2), in the connecting thread; then, from the network's
// softirq, ESTABLISHED or CLOSE. A connect that ends in the syscall (blocking, or on loopback
// where the handshake may finish before the syscall returns) is told by its return code, or
// by the outcome event at once when the syscall said "in progress" all the same.
#define CONN_IN_SYSCALL 0
#define CONN_ESTABLISHED 1
#define CONN_FAILED 2
#define CONN_WAITING 3
struct connecting {
    u32 key;
    u32 ppid;
    u32 tgid;
    u32 tid;
    u32 uid;
    u32 state;          // CONN_*
    char comm[TASK_COMM_LEN];
    struct bound dst;
};
// Not an LRU: one would make room by dropping the oldest connect still in progress, whose outcome
// would then never be told, nor counted (a session could open connects nobody answers to push a
// real one out). Full, a new connect's outcome is counted lost. Every entry goes: each socket
// in SYN_SENT leaves it, for ESTABLISHED or CLOSE.
BPF_HASH(connecting, u64, struct connecting, MAX_CONNECTING);
BPF_HASH(connect_sock, u32, u64, 10240);   // thread in connect(2) -> its socket's skaddr

static __always_inline void submit_outcome(struct connecting *c, u32 state)
{
    struct connect_event *e = connect_slot(c->key);
    if (!e)
        return;
    // Not fill_header: in softirq the current task is whoever the packet interrupted.
    e->h.ts_ns = bpf_ktime_get_ns();
    e->h.ret = state == CONN_ESTABLISHED ? 0 : -1;
    e->h.kind = EV_CONNECTED;
    e->h.key = c->key;
    e->h.pid = c->tgid;
    e->h.tid = c->tid;
    e->h.ppid = c->ppid;
    e->h.uid = c->uid;
    e->h.flags = 0;
    e->h.aux = 0;
    __builtin_memcpy(e->h.comm, c->comm, sizeof(e->h.comm));
    e->family = c->dst.family;
    e->port = c->dst.port;
    __builtin_memcpy(e->addr, c->dst.addr, sizeof(e->addr));
    submit(e, sizeof(*e), c->key);
}

static __always_inline void connect_state(const void *skaddr, int oldstate, int newstate,
                                          u32 tid)
{
    u64 sk = (u64)skaddr;
    if (newstate == 2 /* TCP_SYN_SENT */) {
        struct pending *pe = pending_connect.lookup(&tid);
        if (!pe)
            return;   // not a tracked process's connect(2)
        // .dst: filled at the syscall's exit, from the sockaddr its connect event reads.
        struct connecting c = {.key = pe->key, .ppid = pe->ppid,
                               .tgid = bpf_get_current_pid_tgid() >> 32, .tid = tid,
                               .uid = (u32)bpf_get_current_uid_gid(),
                               .state = CONN_IN_SYSCALL};
        bpf_get_current_comm(&c.comm, sizeof(c.comm));
        if (connecting.update(&sk, &c) < 0) {
            count_lost(pe->key);
        } else if (connect_sock.update(&tid, &sk) < 0) {
            connecting.delete(&sk);   // its syscall's exit could not find it: nothing would
            count_lost(pe->key);
        }
        return;
    }
    if (oldstate != 2 /* TCP_SYN_SENT */)
        return;
    struct connecting *c = connecting.lookup(&sk);
    if (!c)
        return;
    u32 state = newstate == 1 /* TCP_ESTABLISHED */ ? CONN_ESTABLISHED : CONN_FAILED;
    if (c->state == CONN_IN_SYSCALL) {
        c->state = state;   // sys_exit_connect tells it, if the syscall said "in progress"
        return;
    }
    submit_outcome(c, state);
    connecting.delete(&sk);
}

// At the exit of a tracked connect(2), after its own event; `dst` its destination (NULL: not
// an IP address the call could read).
static __always_inline void connect_exit(u32 tid, s64 ret, struct bound *dst)
{
    u64 *skp = connect_sock.lookup(&tid);
    if (!skp)
        return;
    u64 sk = *skp;
    connect_sock.delete(&tid);
    struct connecting *c = connecting.lookup(&sk);
    if (!c)
        return;
    if (ret != -115 /* -EINPROGRESS */ || !dst) {
        connecting.delete(&sk);   // the return code said how it went
        return;
    }
    c->dst = *dst;
    if (c->state == CONN_IN_SYSCALL) {
        c->state = CONN_WAITING;
        return;
    }
    submit_outcome(c, c->state);
    connecting.delete(&sk);
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending *pe = pending_connect.lookup(&tid);
    if (!pe)
        return 0;
    struct pending saved = *pe;
    pending_connect.delete(&tid);
    struct bound b = {};
    if (read_inet(&b, saved.ptr, saved.arg) < 0) {
        connect_exit(tid, args->ret, 0);   // not an IP address, or unreadable: the kernel
        return 0;                          // refused it too
    }
    submit_net(EV_CONNECT, &saved, &b, args->ret);
    connect_exit(tid, args->ret, &b);
    return 0;
}

// ---- listen -------------------------------------------------------------------------------------
// A socket listening, with the address it was bound to, and the port the kernel chose where it
// was bound to port 0 (`ssh -R 0:...`). ssh -R makes the connection's sshd listen; so does any
// server a session runs.

TRACEPOINT_PROBE(syscalls, sys_enter_bind)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p || quiet(p))
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct pending pe = {.ptr = (u64)args->umyaddr, .key = p->key, .ppid = p->ppid,
                         .arg = ((s64)(u32)args->fd << 32) | (u32)args->addrlen};
    if (pending_bind.update(&tid, &pe) < 0)
        count_lost(p->key);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_bind)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct pending *pe = pending_bind.lookup(&tid);
    if (!pe)
        return 0;
    struct pending saved = *pe;
    pending_bind.delete(&tid);
    struct bound b = {};
    if (args->ret != 0 || read_inet(&b, saved.ptr, saved.arg & 0xffffffff) < 0)
        return 0;
    u64 sock = (pid_tgid & 0xffffffff00000000ULL) | (u64)(saved.arg >> 32);
    bound_socks.update(&sock, &b);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc *p = procs.lookup(&tgid);
    if (!p || quiet(p))
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    // .ptr: the port the socket listens on, once the state change below has said it.
    struct pending pe = {.key = p->key, .ppid = p->ppid, .arg = (u32)args->fd};
    if (pending_listen.update(&tid, &pe) < 0)
        count_lost(p->key);
    return 0;
}

// TCP state changes: a connect's outcome (above), and, within listen(2), in the listening
// thread, the socket's port as the kernel chose it for a socket bound to port 0 (the
// tracepoint gives it; the struct sock would need offsets).
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != 6 /* IPPROTO_TCP */)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    if (args->newstate != 10 /* TCP_LISTEN */) {
        connect_state(args->skaddr, args->oldstate, args->newstate, tid);
        return 0;
    }
    struct pending *pe = pending_listen.lookup(&tid);
    if (pe)
        pe->ptr = args->sport;   // host byte order
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_listen)
{
    u64 pid_tgid = bpf_get_current_pid_tgid();
    u32 tid = (u32)pid_tgid;
    struct pending *pe = pending_listen.lookup(&tid);
    if (!pe)
        return 0;
    struct pending saved = *pe;
    pending_listen.delete(&tid);
    u64 sock = (pid_tgid & 0xffffffff00000000ULL) | (u64)saved.arg;
    struct bound *b = bound_socks.lookup(&sock);
    if (!b)
        return 0;   // not bound to an IP address by this process (a unix socket, or inherited)
    struct bound copy = *b;
    bound_socks.delete(&sock);
    if (copy.port == 0 && saved.ptr)
        copy.port = (u16)((saved.ptr >> 8) | (saved.ptr << 8));  // as the sockaddr holds it
    submit_net(EV_LISTEN, &saved, &copy, args->ret);
    return 0;
}

#endif  // WANT_CONNECT
