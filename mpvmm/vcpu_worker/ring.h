/*
 * Shared-memory message rings: the second transport between a vCPU and the
 * device model (docs/protocol.md, "Ring transport"), beside the POSIX
 * message queues. Each vCPU has a request ring (it produces, the device
 * model consumes) and a reply ring (the other way round); both carry the
 * same msgpack records as the queues, one record per slot. This file is the
 * one implementation of the rings: the native loop calls it directly, and
 * the device model and the Python loop through the extension's ring_*
 * functions (mpvmm/transport/ring.py, which mirrors the layout, checked by
 * tests/transport/test_ring_layout.py against layout()).
 *
 * Event suppression, as virtio does it: nobody is woken who is not asleep.
 *  - The device model, before it sleeps in epoll, sets `server_sleeping` in
 *    the area's header, issues a full fence and looks at every request ring
 *    once more. A vCPU pushes a record, issues a full fence and only if it
 *    then sees `server_sleeping` does it clear it and write the wake eventfd.
 *    One of the two always sees the other's store (a Dekker pair), so no
 *    record is left unseen while the device model sleeps.
 *  - A vCPU waiting for a reply spins briefly (only when the device model
 *    was awake when the request went out, so the reply is coming soon), then
 *    sets its reply ring's `consumer_waiting`, fences, looks again and
 *    futex-waits on the ring's `head`. The device model pushes a reply,
 *    fences, and calls FUTEX_WAKE only if `consumer_waiting` is set.
 *  - A full request ring (the device model is behind) makes the vCPU set
 *    `producer_waiting` and futex-wait on `tail`; the device model wakes it
 *    after taking records. Every wait has the run loop's 100 ms timeout.
 *
 * Indices are free-running 32-bit counters (slot = index % RING_SLOTS), each
 * written by one side only; a slot is filled before `head` is published
 * with release order and read after `head` is loaded with acquire order.
 * The futexes are shared (not FUTEX_PRIVATE): the two ends are different
 * processes mapping the same POSIX shared memory object.
 */
#ifndef MPVMM_RING_H
#define MPVMM_RING_H

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RING_SLOTS 32             /* records a ring holds; a power of two */
#define RING_MESSAGE_SIZE 128     /* the largest record, as a message queue's */
#define RING_AREA_MAGIC 0x474e49524d56504dULL /* "MPVMRING" little-endian */
#define RING_AREA_VERSION 1
#define RING_HEADER_SIZE 4096     /* the header page; the rings follow it */
#define RING_SPIN_NS 30000L       /* how long a vCPU spins for a reply before it sleeps */

struct ring_slot {
    uint32_t length;              /* bytes of `data` the record uses */
    uint32_t reserved;
    uint8_t data[RING_MESSAGE_SIZE];
};

/* The producer's and the consumer's words sit on cache lines of their own,
 * so the two sides never write the same line. */
struct msg_ring {
    uint32_t head;                /* records pushed; written by the producer only */
    uint32_t producer_waiting;    /* 1 while the producer sleeps on `tail` for a free slot */
    uint8_t producer_pad[56];
    uint32_t tail;                /* records taken; written by the consumer only */
    uint32_t consumer_waiting;    /* 1 while the consumer sleeps on `head` (reply rings) */
    uint8_t consumer_pad[56];
    struct ring_slot slots[RING_SLOTS];
};

/* The first page of the area; vCPU i's request ring and reply ring follow
 * at RING_HEADER_SIZE + (2 i) * sizeof(struct msg_ring) and the next one. */
struct ring_area_header {
    uint64_t magic;
    uint32_t version;
    uint32_t vcpus;
    uint8_t pad[48];
    uint32_t server_sleeping;     /* the device model sleeps in epoll: wake it through the eventfd */
    uint8_t sleeping_pad[60];
};

static inline void ring_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Pushes one record; -1 when the ring is full. */
static int ring_push(struct msg_ring *ring, const uint8_t *record, uint32_t length)
{
    uint32_t head = ring->head;
    if (head - __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE) >= RING_SLOTS)
        return -1;
    struct ring_slot *slot = &ring->slots[head % RING_SLOTS];
    memcpy(slot->data, record, length);
    slot->length = length;
    __atomic_store_n(&ring->head, head + 1, __ATOMIC_RELEASE);
    return 0;
}

/* Records in the ring now. */
static uint32_t ring_count(const struct msg_ring *ring)
{
    return __atomic_load_n(&ring->head, __ATOMIC_ACQUIRE) - __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
}

/* Takes one record into `out` (RING_MESSAGE_SIZE bytes); its length, -1 when
 * the ring is empty, or RING_MESSAGE_SIZE + 1 for a slot whose length is
 * impossible (the record is dropped: the caller counts it). */
static long ring_pop(struct msg_ring *ring, uint8_t *out)
{
    uint32_t tail = ring->tail;
    if (__atomic_load_n(&ring->head, __ATOMIC_ACQUIRE) == tail)
        return -1;
    const struct ring_slot *slot = &ring->slots[tail % RING_SLOTS];
    uint32_t length = slot->length;
    long result = length <= RING_MESSAGE_SIZE ? (long)length : RING_MESSAGE_SIZE + 1;
    if (length <= RING_MESSAGE_SIZE)
        memcpy(out, slot->data, length);
    __atomic_store_n(&ring->tail, tail + 1, __ATOMIC_RELEASE);
    return result;
}

/* FUTEX_WAIT on a word of the shared area while it still holds `expected`;
 * returns at a FUTEX_WAKE, a signal (EINTR) or after `timeout_ns`. */
static void ring_futex_wait(uint32_t *word, uint32_t expected, long timeout_ns)
{
    struct timespec timeout = {.tv_sec = timeout_ns / 1000000000L, .tv_nsec = timeout_ns % 1000000000L};
    syscall(SYS_futex, word, FUTEX_WAIT, expected, &timeout, NULL, 0);
}

static void ring_futex_wake(uint32_t *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* After pushes (the consumer sleeps on `head`) or pops (the producer sleeps
 * on `tail`): FUTEX_WAKE the other side if, and only if, it said it waits. */
static int ring_wake_if_waiting(uint32_t *waiting, uint32_t *word)
{
    ring_fence(); /* our index is visible before we look at the flag */
    if (!__atomic_load_n(waiting, __ATOMIC_RELAXED))
        return 0;
    ring_futex_wake(word);
    return 1;
}

/* After a push: wake the device model if (and only if) it sleeps. Returns 1
 * when this call woke it. */
static int ring_wake_server(struct ring_area_header *header, int wake_fd)
{
    ring_fence(); /* our record is visible before we look at the flag */
    if (!__atomic_load_n(&header->server_sleeping, __ATOMIC_RELAXED) ||
        !__atomic_exchange_n(&header->server_sleeping, 0, __ATOMIC_SEQ_CST))
        return 0;
    uint64_t one = 1;
    return write(wake_fd, &one, sizeof one) == sizeof one;
}

/* The device model is awake (polling or serving), so a reply is due soon. */
static int ring_server_awake(const struct ring_area_header *header)
{
    return !__atomic_load_n(&header->server_sleeping, __ATOMIC_RELAXED);
}

/* Waits up to `timeout_ns` for a free slot in a full ring (the device model
 * wakes us after it took records). */
static void ring_wait_for_space(struct msg_ring *ring, long timeout_ns)
{
    __atomic_store_n(&ring->producer_waiting, 1, __ATOMIC_RELAXED);
    ring_fence();
    uint32_t tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
    if (ring->head - tail >= RING_SLOTS)
        ring_futex_wait(&ring->tail, tail, timeout_ns);
    __atomic_store_n(&ring->producer_waiting, 0, __ATOMIC_RELAXED);
}

/* Waits up to `timeout_ns` for a record in an empty ring. Returns 1 if it
 * slept (the device model had to wake it), 0 if a record was already there. */
static int ring_wait_for_record(struct msg_ring *ring, long timeout_ns)
{
    __atomic_store_n(&ring->consumer_waiting, 1, __ATOMIC_RELAXED);
    ring_fence();
    uint32_t head = __atomic_load_n(&ring->head, __ATOMIC_ACQUIRE);
    int slept = head == ring->tail;
    if (slept)
        ring_futex_wait(&ring->head, head, timeout_ns);
    __atomic_store_n(&ring->consumer_waiting, 0, __ATOMIC_RELAXED);
    return slept;
}

#endif
