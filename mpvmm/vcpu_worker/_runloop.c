/*
 * The native vCPU run loop: one call runs one vCPU until it stops, without
 * the GIL (docs/design.md, "The GIL ceiling": Python threads cap at ~86k exits/s in total).
 *
 * It runs on a thread of the supervisor, because KVM only accepts KVM_RUN
 * from the address space that created the VM (docs/design.md, "The address-space rule"). Between KVM_RUN calls
 * it routes each port-I/O and MMIO exit by the supervisor's route table:
 *   native    handled here: the null port, the sleep port, the debug-exit port
 *   posted    a write, sent to the device model; the vCPU resumes at once
 *   sync      a read, sent to the device model; the vCPU waits for the reply
 *   fallback  a write to a coalesced range that found KVM's ring full: sent
 *             and acknowledged, so that it cannot overtake the ring's entries
 * Writes to coalesced ranges and doorbells normally never reach this loop:
 * KVM takes them in the kernel (docs/design.md, "In-kernel device routes").
 * Messages travel over one of two transports: POSIX message queues, or the
 * shared-memory rings of ring.h. The loop counts every exit in its vCPU's
 * stats area (shared memory the exporter reads at scrape time), and calls no
 * Python API while the GIL is released.
 *
 * Stopping and pausing: the supervisor writes `request`, sets the kvm_run
 * page's immediate_exit and sends the kick signal to this thread. Whatever
 * the thread is blocked in (KVM_RUN, a queue, a sleep) returns EINTR; every
 * blocking call also has a short timeout, so a kick that lands between the
 * check of `request` and the call is noticed within KICK_POLL_NS anyway.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/futex.h>
#include <linux/kvm.h>
#include <mqueue.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../guest/abi.h"
#include "outcome.h"
#include "ring.h"

/* ---- Shared-memory layouts (mpvmm/vcpu_worker/stats_page.py and
 * route_table.py mirror them and are checked against layout() below). ---- */

#define STATS_EXIT_REASONS 64     /* KVM exit reasons are < 64; larger count in the last slot */
#define LATENCY_BUCKETS 21        /* sync round trip: <= latency_bound_ns(k) for k < 20, then +Inf */
#define MESSAGE_SIZE 128          /* docs/protocol.md: max size of one message */
#define KICK_POLL_NS 100000000L   /* 100 ms: the longest a missed kick can go unseen */
#define MAX_SLEEP_US 1000000u     /* a guest sleep request is capped at 1 s */

enum route_space { SPACE_PIO = 0, SPACE_MMIO = 1 };
enum route_action {
    ACTION_DEVICE = 0, ACTION_NULL = 1, ACTION_DEBUG_EXIT = 2, ACTION_SLEEP = 3,
    ACTION_COALESCED = 4,  /* KVM appends writes to its coalesced ring; one here found it full */
    ACTION_IOEVENTFD = 5,  /* KVM signals an eventfd; a write here missed the datamatch */
};
enum exit_path { PATH_NATIVE = 0, PATH_POSTED = 1, PATH_SYNC = 2, PATH_FALLBACK = 3, PATH_COUNT = 4 };
enum transport_kind { TRANSPORT_MQ = 0, TRANSPORT_RING = 1 };
/* Request kinds of docs/protocol.md. */
enum request_kind { KIND_WRITE = 0, KIND_READ = 1, KIND_WRITE_ACKED = 2 };
enum request { REQUEST_RUN = 0, REQUEST_PAUSE = 1, REQUEST_STOP = 2 };
enum worker_state { STATE_IDLE = 0, STATE_RUNNING = 1, STATE_PAUSED = 2, STATE_DONE = 3 };

/* One route: accesses to [base, base + length) in `space` get `action`.
 * Anything no route covers goes to the device model, which owns "unmapped". */
struct route {
    uint64_t base;
    uint64_t length;
    uint32_t space;
    uint32_t action;
};

/* One per vCPU, one page each. The worker is the only writer of everything
 * but `request`; readers on other threads see whole 64-bit values because
 * aligned 8-byte stores are atomic on x86-64 (the stores are relaxed atomics
 * so the compiler keeps them whole too). */
struct vcpu_stats {
    uint32_t request;          /* written by the supervisor: enum request */
    uint32_t state;            /* enum worker_state */
    uint32_t tid;              /* the worker thread's kernel thread id */
    uint32_t outcome;          /* enum outcome (outcome.h), once state is DONE */
    uint64_t outcome_value;
    uint64_t runs;             /* KVM_RUN calls that returned an exit */
    uint64_t interrupted;      /* KVM_RUN calls that returned EINTR (kicks) */
    uint64_t exits[STATS_EXIT_REASONS];
    uint64_t paths[PATH_COUNT];
    uint64_t sync_latency_buckets[LATENCY_BUCKETS];
    uint64_t sync_latency_sum_ns;
    uint64_t sleep_ns;
    uint64_t posted_stalls;    /* posted writes that found the request queue full */
    uint64_t stale_replies;    /* replies dropped for a wrong sequence number */
    uint64_t server_wakeups;   /* ring transport: times this vCPU woke the sleeping device model */
    uint64_t reply_sleeps;     /* ring transport: replies waited for asleep (the rest came while spinning) */
};

/* Where the vCPU's messages go: a queue pair or a ring pair (ring.h). */
struct transport {
    enum transport_kind kind;
    uint64_t *order;           /* the machine-wide request counter every request is stamped from */
    mqd_t request_mqd, reply_mqd;
    struct msg_ring *requests, *replies;
    struct ring_area_header *header;
    int wake_fd;
    int server_was_awake;      /* when the last request went out: worth spinning for the reply */
};

struct worker {
    int vcpu_fd;
    struct kvm_run *run;
    struct vcpu_stats *stats;
    const struct route *routes;
    size_t route_count;
    struct transport transport;
    uint64_t vcpu_index;
};

#define BUMP(field) __atomic_store_n(&(field), (field) + 1, __ATOMIC_RELAXED)
#define ADD(field, n) __atomic_store_n(&(field), (field) + (n), __ATOMIC_RELAXED)

static int stop_requested(const struct worker *w)
{
    return __atomic_load_n(&w->stats->request, __ATOMIC_ACQUIRE) == REQUEST_STOP;
}

/* A stop or a pause: either ends a guest's sleep early. */
static int anything_requested(const struct worker *w)
{
    return __atomic_load_n(&w->stats->request, __ATOMIC_ACQUIRE) != REQUEST_RUN;
}

static uint64_t monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000ull + (uint64_t)now.tv_nsec;
}

/* Message-queue timeouts are absolute CLOCK_REALTIME times. */
static struct timespec realtime_after(long ns)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_nsec += ns;
    while (t.tv_nsec >= 1000000000L) {
        t.tv_nsec -= 1000000000L;
        t.tv_sec++;
    }
    return t;
}

/* ---- msgpack: the two fixed records of docs/protocol.md. ---- */

static size_t put_uint(uint8_t *p, uint64_t v)
{
    if (v < 0x80) { p[0] = (uint8_t)v; return 1; }
    if (v <= 0xff) { p[0] = 0xcc; p[1] = (uint8_t)v; return 2; }
    if (v <= 0xffff) { p[0] = 0xcd; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)v; return 3; }
    size_t width = v <= 0xffffffffull ? 4 : 8;
    p[0] = width == 4 ? 0xce : 0xcf;
    for (size_t i = 0; i < width; i++)
        p[1 + i] = (uint8_t)(v >> (8 * (width - 1 - i)));
    return 1 + width;
}

/* Reads one unsigned integer at *pos; returns -1 on anything else. */
static int get_uint(const uint8_t *p, size_t len, size_t *pos, uint64_t *out)
{
    if (*pos >= len)
        return -1;
    uint8_t tag = p[(*pos)++];
    size_t width;
    if (tag < 0x80) { *out = tag; return 0; }
    switch (tag) {
    case 0xcc: width = 1; break;
    case 0xcd: width = 2; break;
    case 0xce: width = 4; break;
    case 0xcf: width = 8; break;
    default: return -1;
    }
    if (*pos + width > len)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < width; i++)
        v = (v << 8) | p[(*pos)++];
    *out = v;
    return 0;
}

static size_t encode_request(uint8_t *buf, uint64_t kind, uint64_t vcpu, uint64_t space,
                             uint64_t address, uint64_t size, uint64_t value, uint64_t seq)
{
    const uint64_t fields[8] = {1, kind, vcpu, space, address, size, value, seq};
    size_t n = 0;
    buf[n++] = 0x98; /* fixarray of 8 */
    for (int i = 0; i < 8; i++)
        n += put_uint(buf + n, fields[i]);
    return n;
}

static int decode_reply(const uint8_t *buf, size_t len, uint64_t *seq, uint64_t *value)
{
    size_t pos = 1;
    uint64_t version;
    if (len < 1 || buf[0] != 0x93) /* fixarray of 3 */
        return -1;
    if (get_uint(buf, len, &pos, &version) || version != 1 || get_uint(buf, len, &pos, seq) ||
        get_uint(buf, len, &pos, value) || pos != len)
        return -1;
    return 0;
}

/* ---- The device-model hand-off, over either transport. ---- */

/* Message queue: sends one request, waiting while the queue is full. */
static int mq_send_request(struct worker *w, const uint8_t *msg, size_t len)
{
    /* An already-expired deadline makes a full queue answer ETIMEDOUT at
     * once, so a stall can be counted without a second syscall per send. */
    struct timespec now = realtime_after(0);
    if (mq_timedsend(w->transport.request_mqd, (const char *)msg, len, 0, &now) == 0)
        return 0;
    if (errno == ETIMEDOUT)
        BUMP(w->stats->posted_stalls);
    for (;;) {
        if (errno != ETIMEDOUT && errno != EINTR)
            return -1;
        if (stop_requested(w))
            return -1;
        struct timespec deadline = realtime_after(KICK_POLL_NS);
        if (mq_timedsend(w->transport.request_mqd, (const char *)msg, len, 0, &deadline) == 0)
            return 0;
    }
}

/* Ring: pushes one request and wakes the device model if it sleeps. */
static int ring_send_request(struct worker *w, const uint8_t *msg, size_t len)
{
    struct transport *t = &w->transport;
    if (ring_push(t->requests, msg, (uint32_t)len)) {
        BUMP(w->stats->posted_stalls);
        do {
            if (ring_wake_server(t->header, t->wake_fd)) /* it may be asleep with a full ring */
                BUMP(w->stats->server_wakeups);
            if (stop_requested(w))
                return -1;
            ring_wait_for_space(t->requests, KICK_POLL_NS);
        } while (ring_push(t->requests, msg, (uint32_t)len));
    }
    t->server_was_awake = ring_server_awake(t->header);
    if (ring_wake_server(t->header, t->wake_fd))
        BUMP(w->stats->server_wakeups);
    return 0;
}

/* 0 once sent; -1 when a stop was requested meanwhile or the transport failed. */
static int send_request(struct worker *w, const uint8_t *msg, size_t len)
{
    return w->transport.kind == TRANSPORT_RING ? ring_send_request(w, msg, len)
                                               : mq_send_request(w, msg, len);
}

/* Ring: takes a reply, spinning first while the device model is awake, then
 * sleeping on the ring; -1 with errno ETIMEDOUT when none came in time. */
static long ring_receive_reply(struct worker *w, uint8_t *msg)
{
    struct transport *t = &w->transport;
    long n = ring_pop(t->replies, msg);
    if (n >= 0)
        return n;
    if (t->server_was_awake) {
        t->server_was_awake = 0; /* spin once per request, not after every timeout */
        uint64_t end = monotonic_ns() + RING_SPIN_NS;
        while (monotonic_ns() < end) {
            /* Spin without keeping the core from anyone who wants it: the
             * device model may be waiting to run on this very CPU. */
            sched_yield();
            if ((n = ring_pop(t->replies, msg)) >= 0)
                return n;
        }
    }
    if (ring_wait_for_record(t->replies, KICK_POLL_NS))
        BUMP(w->stats->reply_sleeps);
    if ((n = ring_pop(t->replies, msg)) >= 0)
        return n;
    errno = ETIMEDOUT;
    return -1;
}

/* Waits up to KICK_POLL_NS for one reply; its length, or -1 (ETIMEDOUT, EINTR, or a failure). */
static long receive_reply(struct worker *w, uint8_t *msg)
{
    if (w->transport.kind == TRANSPORT_RING)
        return ring_receive_reply(w, msg);
    struct timespec deadline = realtime_after(KICK_POLL_NS);
    return (long)mq_timedreceive(w->transport.reply_mqd, (char *)msg, MESSAGE_SIZE, NULL, &deadline);
}

/* The sync round-trip histogram: bucket k < LATENCY_BUCKETS - 1 counts round
 * trips of at most 1 us << k, the last one everything longer. The only
 * definition: Python reads the bounds from layout() and buckets with
 * latency_bucket() below. */
static uint64_t latency_bound_ns(unsigned bucket)
{
    return 1000ull << bucket;
}

static unsigned latency_bucket(uint64_t ns)
{
    unsigned bucket = 0;
    while (bucket < LATENCY_BUCKETS - 1 && ns > latency_bound_ns(bucket))
        bucket++;
    return bucket;
}

static void record_latency(struct worker *w, uint64_t ns)
{
    BUMP(w->stats->sync_latency_buckets[latency_bucket(ns)]);
    ADD(w->stats->sync_latency_sum_ns, ns);
}

/* Every request's sequence number: the next of the machine-wide counter, so
 * that the device model performs the requests of all vCPUs in the order
 * they were made (devicemodel/rounds.py). Taken after the exit, before the
 * request is sent: a request that happened before another in the guest
 * (through its own locks) has the smaller number and is already in its
 * channel when the later one is sent. */
static uint64_t next_stamp(struct worker *w)
{
    return __atomic_add_fetch(w->transport.order, 1, __ATOMIC_SEQ_CST);
}

/* A request the vCPU waits for (a read, or an acknowledged write): send it
 * and wait for the reply carrying its sequence number. */
static int sync_request(struct worker *w, enum request_kind kind, uint64_t space, uint64_t address,
                        uint64_t size, uint64_t *value)
{
    uint8_t msg[MESSAGE_SIZE + 1];
    uint64_t start = monotonic_ns();
    uint64_t stamp = next_stamp(w);
    size_t len = encode_request(msg, kind, w->vcpu_index, space, address, size,
                                kind == KIND_READ ? 0 : *value, stamp);
    if (send_request(w, msg, len))
        return -1;
    for (;;) {
        uint64_t seq;
        long n = receive_reply(w, msg);
        if (n < 0) {
            if ((errno != ETIMEDOUT && errno != EINTR) || stop_requested(w))
                return -1;
            continue;
        }
        if (n > MESSAGE_SIZE || decode_reply(msg, (size_t)n, &seq, value) || seq != stamp) {
            BUMP(w->stats->stale_replies);
            continue;
        }
        if (kind == KIND_READ)
            record_latency(w, monotonic_ns() - start);
        return 0;
    }
}

static int posted_write(struct worker *w, uint64_t space, uint64_t address, uint64_t size,
                        uint64_t value)
{
    uint8_t msg[MESSAGE_SIZE];
    size_t len = encode_request(msg, KIND_WRITE, w->vcpu_index, space, address, size, value,
                                next_stamp(w));
    return send_request(w, msg, len);
}

/* Sleeps in slices so that a stop or a pause is seen within KICK_POLL_NS
 * (a pause cuts the guest's rest short rather than wait for it). */
static void guest_sleep(struct worker *w, uint64_t microseconds)
{
    uint64_t start = monotonic_ns();
    uint64_t end = start + (microseconds < MAX_SLEEP_US ? microseconds : MAX_SLEEP_US) * 1000;
    for (uint64_t now = start; now < end && !anything_requested(w); now = monotonic_ns()) {
        uint64_t left = end - now < (uint64_t)KICK_POLL_NS ? end - now : (uint64_t)KICK_POLL_NS;
        struct timespec slice = {.tv_sec = 0, .tv_nsec = (long)left};
        nanosleep(&slice, NULL);
    }
    ADD(w->stats->sleep_ns, monotonic_ns() - start);
}

/* ---- Exit routing. ---- */

enum step { STEP_CONTINUE, STEP_STOP, STEP_EXITED };

static uint32_t route_action(const struct worker *w, uint32_t space, uint64_t address)
{
    for (size_t i = 0; i < w->route_count; i++) {
        const struct route *r = &w->routes[i];
        if (r->space == space && address - r->base < r->length)
            return r->action;
    }
    return ACTION_DEVICE;
}

/* Handles one access of `size` bytes at `data` (the kvm_run page's buffer). */
static enum step handle_access(struct worker *w, uint32_t space, uint64_t address, uint32_t size,
                               int is_write, uint8_t *data, uint64_t *exit_status)
{
    uint64_t value = 0;
    if (is_write)
        memcpy(&value, data, size); /* little-endian, as the guest stored it */

    switch (route_action(w, space, address)) {
    case ACTION_NULL:
        BUMP(w->stats->paths[PATH_NATIVE]);
        if (!is_write)
            memset(data, 0, size);
        return STEP_CONTINUE;
    case ACTION_SLEEP:
        BUMP(w->stats->paths[PATH_NATIVE]);
        if (is_write)
            guest_sleep(w, value);
        else
            memset(data, 0, size);
        return STEP_CONTINUE;
    case ACTION_DEBUG_EXIT:
        BUMP(w->stats->paths[PATH_NATIVE]);
        if (!is_write) {
            memset(data, 0, size);
            return STEP_CONTINUE;
        }
        *exit_status = value;
        return STEP_EXITED;
    case ACTION_COALESCED:
        if (is_write) {
            /* KVM's ring was full. Posted, this write could be handled
             * before the entries still in the ring (the device model drains
             * the ring before every request, and we would go on adding to
             * it): wait until it is acknowledged instead. */
            BUMP(w->stats->paths[PATH_FALLBACK]);
            return sync_request(w, KIND_WRITE_ACKED, space, address, size, &value) ? STEP_STOP
                                                                                   : STEP_CONTINUE;
        }
        __attribute__((fallthrough)); /* reads are never coalesced */
    default: /* ACTION_DEVICE, and ACTION_IOEVENTFD writes that missed the datamatch */
        if (is_write) {
            BUMP(w->stats->paths[PATH_POSTED]);
            return posted_write(w, space, address, size, value) ? STEP_STOP : STEP_CONTINUE;
        }
        BUMP(w->stats->paths[PATH_SYNC]);
        if (sync_request(w, KIND_READ, space, address, size, &value))
            return STEP_STOP;
        memcpy(data, &value, size);
        return STEP_CONTINUE;
    }
}

static enum step handle_io(struct worker *w, uint64_t *exit_status)
{
    struct kvm_run *run = w->run;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    int is_write = run->io.direction == KVM_EXIT_IO_OUT;
    /* String instructions (rep outsb) hand over `count` elements at once. */
    for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
        enum step step = handle_access(w, SPACE_PIO, run->io.port, run->io.size, is_write, data,
                                       exit_status);
        if (step != STEP_CONTINUE)
            return step;
    }
    return STEP_CONTINUE;
}

static void wait_while_paused(struct worker *w)
{
    __atomic_store_n(&w->stats->state, STATE_PAUSED, __ATOMIC_RELEASE);
    while (__atomic_load_n(&w->stats->request, __ATOMIC_ACQUIRE) == REQUEST_PAUSE) {
        struct timespec timeout = {.tv_sec = 0, .tv_nsec = KICK_POLL_NS};
        syscall(SYS_futex, &w->stats->request, FUTEX_WAIT, REQUEST_PAUSE, &timeout, NULL, 0);
    }
    __atomic_store_n(&w->stats->state, STATE_RUNNING, __ATOMIC_RELEASE);
}

/* The loop itself; runs without the GIL. Returns the outcome. */
static enum outcome run_loop(struct worker *w, uint64_t *value)
{
    struct vcpu_stats *stats = w->stats;
    /* The last KVM_RUN returned an exit whose instruction KVM finishes only
     * on the next KVM_RUN: an IN's value goes into RAX and RIP moves past
     * an OUT then (api.rst, KVM_RUN). */
    int exit_pending = 0;
    for (;;) {
        uint32_t request = __atomic_load_n(&stats->request, __ATOMIC_ACQUIRE);
        if (request == REQUEST_STOP)
            return OUTCOME_STOPPED;
        if (request == REQUEST_PAUSE) {
            if (!exit_pending) {
                wait_while_paused(w);
                continue;
            }
            /* Pause only with the vCPU's state whole, so that a snapshot
             * reads it as the guest left it: KVM_RUN with immediate_exit
             * completes the pending exit and returns EINTR without running
             * the guest (or, mid string I/O, one more exit to handle). */
            __atomic_store_n(&w->run->immediate_exit, 1, __ATOMIC_RELAXED);
        }
        if (ioctl(w->vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) {
                /* A kick: clear the flag the supervisor set, then look at
                 * `request` again at the top. */
                __atomic_store_n(&w->run->immediate_exit, 0, __ATOMIC_RELAXED);
                BUMP(stats->interrupted);
                exit_pending = 0;
                continue;
            }
            if (errno == EAGAIN)
                continue;
            *value = (uint64_t)errno;
            return OUTCOME_ERROR;
        }
        exit_pending = 1;
        BUMP(stats->runs);
        uint32_t reason = w->run->exit_reason;
        BUMP(stats->exits[reason < STATS_EXIT_REASONS ? reason : STATS_EXIT_REASONS - 1]);

        enum step step;
        switch (reason) {
        case KVM_EXIT_IO:
            step = handle_io(w, value);
            break;
        case KVM_EXIT_MMIO:
            step = handle_access(w, SPACE_MMIO, w->run->mmio.phys_addr, w->run->mmio.len,
                                 w->run->mmio.is_write, w->run->mmio.data, value);
            break;
        case KVM_EXIT_INTR: /* a signal arrived while the guest ran */
            step = STEP_CONTINUE;
            break;
        default:
            *value = reason;
            return OUTCOME_FAULT;
        }
        if (step == STEP_EXITED)
            return OUTCOME_EXITED;
        if (step == STEP_STOP)
            return stop_requested(w) ? OUTCOME_STOPPED : (*value = (uint64_t)errno, OUTCOME_ERROR);
    }
}

/* ---- Python API. ---- */

/* The transport tuple of channel.py: (TRANSPORT_MQ, request_mqd,
 * reply_mqd, 0, -1, order) or (TRANSPORT_RING, request ring, reply ring,
 * area header, wake eventfd, order), the addresses mapped in this process;
 * order is the machine-wide request counter's. */
static int parse_transport(PyObject *tuple, struct transport *t)
{
    int kind, wake_fd;
    unsigned long long a, b, header, order;
    if (!PyArg_ParseTuple(tuple, "iKKKiK", &kind, &a, &b, &header, &wake_fd, &order))
        return -1;
    if (!order) {
        PyErr_SetString(PyExc_ValueError, "no request counter");
        return -1;
    }
    if (kind == TRANSPORT_MQ) {
        *t = (struct transport){.kind = TRANSPORT_MQ, .order = (uint64_t *)(uintptr_t)order,
                                .request_mqd = (mqd_t)a, .reply_mqd = (mqd_t)b};
        return 0;
    }
    if (kind == TRANSPORT_RING && a && b && header) {
        *t = (struct transport){.kind = TRANSPORT_RING, .order = (uint64_t *)(uintptr_t)order,
                                .requests = (struct msg_ring *)(uintptr_t)a,
                                .replies = (struct msg_ring *)(uintptr_t)b,
                                .header = (struct ring_area_header *)(uintptr_t)header,
                                .wake_fd = wake_fd};
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "bad transport %d", kind);
    return -1;
}

static PyObject *runloop_run(PyObject *self, PyObject *args)
{
    int vcpu_fd;
    unsigned long long run_address, stats_address, vcpu_index;
    Py_buffer routes;
    PyObject *transport;
    const char *name;
    if (!PyArg_ParseTuple(args, "iKKy*O!Ks", &vcpu_fd, &run_address, &stats_address, &routes,
                          &PyTuple_Type, &transport, &vcpu_index, &name))
        return NULL;
    if (routes.len % sizeof(struct route)) {
        PyBuffer_Release(&routes);
        return PyErr_Format(PyExc_ValueError, "route table size %zd is not a multiple of %zu",
                            routes.len, sizeof(struct route));
    }
    struct worker w = {
        .vcpu_fd = vcpu_fd,
        .run = (struct kvm_run *)(uintptr_t)run_address,
        .stats = (struct vcpu_stats *)(uintptr_t)stats_address,
        .route_count = (size_t)routes.len / sizeof(struct route),
        .vcpu_index = vcpu_index,
    };
    if (parse_transport(transport, &w.transport)) {
        PyBuffer_Release(&routes);
        return NULL;
    }
    /* A private copy: the table is fixed for the run and read without the GIL. */
    struct route *table = PyMem_RawMalloc(routes.len ? (size_t)routes.len : 1);
    if (!table) {
        PyBuffer_Release(&routes);
        return PyErr_NoMemory();
    }
    memcpy(table, routes.buf, (size_t)routes.len);
    w.routes = table;
    PyBuffer_Release(&routes);

    uint64_t value = 0;
    enum outcome outcome;
    Py_BEGIN_ALLOW_THREADS
    prctl(PR_SET_NAME, name, 0, 0, 0);
    __atomic_store_n(&w.stats->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELAXED);
    __atomic_store_n(&w.stats->state, STATE_RUNNING, __ATOMIC_RELEASE);
    outcome = run_loop(&w, &value);
    __atomic_store_n(&w.stats->outcome_value, value, __ATOMIC_RELAXED);
    __atomic_store_n(&w.stats->outcome, outcome, __ATOMIC_RELAXED);
    __atomic_store_n(&w.stats->state, STATE_DONE, __ATOMIC_RELEASE);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(table);
    return Py_BuildValue("(iK)", (int)outcome, (unsigned long long)value);
}

static void kick_handler(int signum)
{
    (void)signum; /* its only job is to make blocking calls return EINTR */
}

static PyObject *runloop_install_kick_handler(PyObject *self, PyObject *args)
{
    int signum;
    if (!PyArg_ParseTuple(args, "i", &signum))
        return NULL;
    struct sigaction action = {.sa_handler = kick_handler}; /* no SA_RESTART */
    sigemptyset(&action.sa_mask);
    if (sigaction(signum, &action, NULL))
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *runloop_wake(PyObject *self, PyObject *args)
{
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address))
        return NULL;
    syscall(SYS_futex, (uint32_t *)(uintptr_t)address, FUTEX_WAKE, 1, NULL, NULL, 0);
    Py_RETURN_NONE;
}

static int add_int(PyObject *dict, const char *key, long long value)
{
    PyObject *number = PyLong_FromLongLong(value);
    int failed = !number || PyDict_SetItemString(dict, key, number);
    Py_XDECREF(number);
    return failed;
}

/* The upper bounds of the finite latency buckets, as a tuple of nanoseconds. */
static int add_latency_bounds(PyObject *dict)
{
    PyObject *bounds = PyTuple_New(LATENCY_BUCKETS - 1);
    if (!bounds)
        return -1;
    for (unsigned k = 0; k < LATENCY_BUCKETS - 1; k++) {
        PyObject *bound = PyLong_FromUnsignedLongLong(latency_bound_ns(k));
        if (!bound) {
            Py_DECREF(bounds);
            return -1;
        }
        PyTuple_SET_ITEM(bounds, k, bound);
    }
    int failed = PyDict_SetItemString(dict, "latency_bounds_ns", bounds);
    Py_DECREF(bounds);
    return failed;
}

static PyObject *runloop_latency_bucket(PyObject *self, PyObject *args)
{
    unsigned long long ns;
    if (!PyArg_ParseTuple(args, "K", &ns))
        return NULL;
    return PyLong_FromUnsignedLong(latency_bucket(ns));
}

#define FIELD(dict, type, field) add_int(dict, #type "." #field, (long long)offsetof(struct type, field))

/* Offsets and constants of every layout above, so the Python mirrors are
 * checked against the one definition (tests/vcpu_worker/test_layout.py). */
static PyObject *runloop_layout(PyObject *self, PyObject *noargs)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    if (add_int(d, "vcpu_stats.sizeof", sizeof(struct vcpu_stats)) ||
        FIELD(d, vcpu_stats, request) || FIELD(d, vcpu_stats, state) ||
        FIELD(d, vcpu_stats, tid) || FIELD(d, vcpu_stats, outcome) ||
        FIELD(d, vcpu_stats, outcome_value) || FIELD(d, vcpu_stats, runs) ||
        FIELD(d, vcpu_stats, interrupted) || FIELD(d, vcpu_stats, exits) ||
        FIELD(d, vcpu_stats, paths) || FIELD(d, vcpu_stats, sync_latency_buckets) ||
        FIELD(d, vcpu_stats, sync_latency_sum_ns) || FIELD(d, vcpu_stats, sleep_ns) ||
        FIELD(d, vcpu_stats, posted_stalls) || FIELD(d, vcpu_stats, stale_replies) ||
        FIELD(d, vcpu_stats, server_wakeups) || FIELD(d, vcpu_stats, reply_sleeps) ||
        add_int(d, "ring_slot.sizeof", sizeof(struct ring_slot)) || FIELD(d, ring_slot, length) ||
        FIELD(d, ring_slot, data) ||
        add_int(d, "msg_ring.sizeof", sizeof(struct msg_ring)) || FIELD(d, msg_ring, head) ||
        FIELD(d, msg_ring, producer_waiting) || FIELD(d, msg_ring, tail) ||
        FIELD(d, msg_ring, consumer_waiting) || FIELD(d, msg_ring, slots) ||
        add_int(d, "ring_area_header.sizeof", sizeof(struct ring_area_header)) ||
        FIELD(d, ring_area_header, magic) || FIELD(d, ring_area_header, version) ||
        FIELD(d, ring_area_header, vcpus) || FIELD(d, ring_area_header, server_sleeping) ||
        add_int(d, "RING_SLOTS", RING_SLOTS) || add_int(d, "RING_MESSAGE_SIZE", RING_MESSAGE_SIZE) ||
        add_int(d, "RING_HEADER_SIZE", RING_HEADER_SIZE) ||
        add_int(d, "RING_AREA_MAGIC", (long long)RING_AREA_MAGIC) ||
        add_int(d, "RING_AREA_VERSION", RING_AREA_VERSION) || add_int(d, "RING_SPIN_NS", RING_SPIN_NS) ||
        add_int(d, "route.sizeof", sizeof(struct route)) || FIELD(d, route, base) ||
        FIELD(d, route, length) || FIELD(d, route, space) || FIELD(d, route, action) ||
        add_int(d, "mpvmm_guest_params.sizeof", sizeof(struct mpvmm_guest_params)) ||
        FIELD(d, mpvmm_guest_params, magic) || FIELD(d, mpvmm_guest_params, abi_version) ||
        FIELD(d, mpvmm_guest_params, cpus) || FIELD(d, mpvmm_guest_params, workload) ||
        FIELD(d, mpvmm_guest_params, demo_sleep_us) || FIELD(d, mpvmm_guest_params, stop) ||
        FIELD(d, mpvmm_guest_params, reports_addr) ||
        FIELD(d, mpvmm_guest_params, report_stride) ||
        FIELD(d, mpvmm_guest_params, shared_addr) ||
        FIELD(d, mpvmm_guest_params, mmio_testdev_addr) ||
        FIELD(d, mpvmm_guest_params, uart_port) || FIELD(d, mpvmm_guest_params, null_port) ||
        FIELD(d, mpvmm_guest_params, debug_exit_port) ||
        FIELD(d, mpvmm_guest_params, sleep_port) ||
        FIELD(d, mpvmm_guest_params, pio_testdev_port) ||
        FIELD(d, mpvmm_guest_params, pio_doorbell_port) ||
        FIELD(d, mpvmm_guest_params, mmio_doorbell_addr) ||
        FIELD(d, mpvmm_guest_params, doorbell_value) ||
        FIELD(d, mpvmm_guest_params, dirty_rate_mib) ||
        FIELD(d, mpvmm_guest_params, dirty_round_us) ||
        FIELD(d, mpvmm_guest_params, dirty_base) || FIELD(d, mpvmm_guest_params, dirty_size) ||
        FIELD(d, mpvmm_guest_params, virtio_mmio_base) || FIELD(d, mpvmm_guest_params, virtio_area_addr) ||
        FIELD(d, mpvmm_guest_params, virtio_disks) || FIELD(d, mpvmm_guest_params, virtio_queue_depth) ||
        add_int(d, "mpvmm_guest_report.sizeof", sizeof(struct mpvmm_guest_report)) ||
        FIELD(d, mpvmm_guest_report, magic) || FIELD(d, mpvmm_guest_report, state) ||
        FIELD(d, mpvmm_guest_report, status) || FIELD(d, mpvmm_guest_report, pio_write_sum) ||
        FIELD(d, mpvmm_guest_report, mmio_write_sum) || FIELD(d, mpvmm_guest_report, ops) ||
        add_int(d, "mpvmm_guest_shared.sizeof", sizeof(struct mpvmm_guest_shared)) ||
        add_int(d, "STATS_EXIT_REASONS", STATS_EXIT_REASONS) ||
        add_int(d, "LATENCY_BUCKETS", LATENCY_BUCKETS) || add_latency_bounds(d) ||
        add_int(d, "MESSAGE_SIZE", MESSAGE_SIZE) ||
        add_int(d, "MPVMM_OP_COUNT", MPVMM_OP_COUNT) ||
        add_int(d, "MPVMM_GUEST_ABI_VERSION", MPVMM_GUEST_ABI_VERSION)) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyMethodDef runloop_methods[] = {
    {"run", runloop_run, METH_VARARGS,
     "run(vcpu_fd, run_address, stats_address, routes, transport, vcpu_index, "
     "thread_name) -> (outcome, value)\n\nRun one vCPU until it stops, without the GIL."},
    {"install_kick_handler", runloop_install_kick_handler, METH_VARARGS,
     "Install a no-op handler (no SA_RESTART) so the signal interrupts blocking calls."},
    {"wake", runloop_wake, METH_VARARGS, "FUTEX_WAKE the worker paused on this address."},
    {"layout", runloop_layout, METH_NOARGS, "Offsets and constants of the shared layouts."},
    {"latency_bucket", runloop_latency_bucket, METH_VARARGS,
     "latency_bucket(ns) -> the sync latency bucket a round trip of ns nanoseconds is counted in."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef runloop_module = {
    PyModuleDef_HEAD_INIT, "_runloop", "The native, GIL-free vCPU run loop.", -1,
    runloop_methods,
};

/* ring_python.c: ring.h's protocol for the device model and the Python loop. */
extern PyMethodDef ring_python_methods[];

PyMODINIT_FUNC PyInit__runloop(void)
{
    PyObject *module = PyModule_Create(&runloop_module);
    if (module && PyModule_AddFunctions(module, ring_python_methods)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
