/*
 * The built-in guest's virtio-blk driver: polled, at CPL 3, one queue per vCPU.
 *
 * The guest has no interrupts, so it polls its used ring; it asks for no
 * interrupt either (used_event kept half the ring's index space away). vCPU
 * i drives queue i / disks of disk i % disks; the vCPU with queue 0 of a
 * disk brings the device up (status handshake, features, every queue that
 * has a vCPU) and then marks the disk ready for the others. Kicks are
 * QueueNotify writes of the queue's index, which KVM turns into an
 * ioeventfd signal without an exit; with EVENT_IDX a kick is made only when
 * the device asked for one (avail_event).
 *
 * Each request is 4 KiB at a random 4 KiB-aligned offset; a read is checked
 * word by word against the disk pattern (abi.h). The read-write workload
 * reads the disk's first half only and writes the pattern into the second
 * half, sequentially through this queue's share of it, with a flush every
 * eighth request and one at the end.
 */
#include "abi.h"

/* virtio-mmio registers (virtio 1.2, 4.2.2) and the few constants the driver needs. */
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC 0x080
#define REG_QUEUE_DRIVER 0x090
#define REG_QUEUE_DEVICE 0x0A0
#define REG_CONFIG 0x100
#define VIRTIO_MAGIC 0x74726976u
#define VIRTIO_ID_BLOCK 2
#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u
#define F_BLK_RO (1u << 5)
#define F_BLK_FLUSH (1u << 9)
#define F_BLK_MQ (1u << 12)
#define F_EVENT_IDX (1u << 29)
#define F_VERSION_1_HIGH 1u /* bit 32 */
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4

#define QSIZE 256u
#define BLOCK 4096u
#define SECTORS_PER_BLOCK (BLOCK / 512)

/* One vCPU's slot (MPVMM_VIRTIO_SLOT_SIZE): its queue's rings and buffers,
 * and, in the slot of a disk's first vCPU, what the others need to know. */
#define SLOT_DESC 0x0000
#define SLOT_AVAIL 0x1000
#define SLOT_USED 0x2000
#define SLOT_HEADERS 0x3000
#define SLOT_STATUS 0x3400
#define SLOT_DISK 0x3800
#define SLOT_DATA 0x4000

#define DISK_STARTING 0
#define DISK_READY 1
#define DISK_FAILED 2

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* Set by a disk's first vCPU for every vCPU on that disk. */
struct disk_info {
    uint64_t state;
    uint64_t blocks;
    uint64_t read_only;
    uint64_t event_idx;
};

struct queue {
    volatile struct mpvmm_guest_params *params;
    volatile struct mpvmm_guest_report *report;
    uint64_t window, slot;
    uint32_t index, depth;
    volatile struct desc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[QSIZE], used_event */
    volatile uint16_t *used;  /* flags, idx, then {u32 id, u32 len}[QSIZE], avail_event */
    volatile struct blk_header *headers;
    volatile uint8_t *status;
    uint16_t avail_idx, used_seen;
    uint64_t read_blocks, write_base, write_blocks, next_write, requests, random;
    int writes, event_idx;
};

static inline void op(volatile struct mpvmm_guest_report *r, enum mpvmm_guest_op which)
{
    r->ops[which]++;
}

static inline uint32_t reg_read(struct queue *q, uint64_t offset)
{
    uint32_t value;
    op(q->report, MPVMM_OP_VIRTIO_REG_READS);
    __asm__ volatile("movl (%1), %0" : "=r"(value) : "r"(q->window + offset) : "memory");
    return value;
}

static inline void reg_write(struct queue *q, uint64_t offset, uint32_t value)
{
    op(q->report, MPVMM_OP_VIRTIO_REG_WRITES);
    __asm__ volatile("movl %0, (%1)" : : "r"(value), "r"(q->window + offset) : "memory");
}

static inline void full_fence(void)
{
    __asm__ volatile("mfence" : : : "memory");
}

static uint64_t slot_address(volatile struct mpvmm_guest_params *p, uint64_t vcpu)
{
    return p->virtio_area_addr + vcpu * MPVMM_VIRTIO_SLOT_SIZE;
}

static void set_ring_address(struct queue *q, uint64_t reg, uint64_t address)
{
    reg_write(q, reg, (uint32_t)address);
    reg_write(q, reg + 4, (uint32_t)(address >> 32));
}

/* The status handshake and every queue that has a vCPU; returns DISK_READY or DISK_FAILED. */
static int bring_up(struct queue *q, uint64_t disk, uint64_t queues, volatile struct disk_info *info)
{
    volatile struct mpvmm_guest_params *p = q->params;
    if (reg_read(q, REG_MAGIC) != VIRTIO_MAGIC || reg_read(q, REG_VERSION) != 2 ||
        reg_read(q, REG_DEVICE_ID) != VIRTIO_ID_BLOCK)
        return DISK_FAILED;
    reg_write(q, REG_STATUS, 0);
    reg_write(q, REG_STATUS, STATUS_ACKNOWLEDGE);
    reg_write(q, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    reg_write(q, REG_DEVICE_FEATURES_SEL, 0);
    uint32_t low = reg_read(q, REG_DEVICE_FEATURES) & (F_BLK_RO | F_BLK_FLUSH | F_BLK_MQ | F_EVENT_IDX);
    reg_write(q, REG_DEVICE_FEATURES_SEL, 1);
    uint32_t high = reg_read(q, REG_DEVICE_FEATURES) & F_VERSION_1_HIGH;
    reg_write(q, REG_DRIVER_FEATURES_SEL, 0);
    reg_write(q, REG_DRIVER_FEATURES, low);
    reg_write(q, REG_DRIVER_FEATURES_SEL, 1);
    reg_write(q, REG_DRIVER_FEATURES, high);
    reg_write(q, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(reg_read(q, REG_STATUS) & STATUS_FEATURES_OK))
        return DISK_FAILED;
    uint64_t sectors = reg_read(q, REG_CONFIG) | (uint64_t)reg_read(q, REG_CONFIG + 4) << 32;
    for (uint64_t i = 0; i < queues; i++) {
        uint64_t vcpu = i * p->virtio_disks + disk;
        if (vcpu >= p->cpus)
            break;
        uint64_t slot = slot_address(p, vcpu);
        reg_write(q, REG_QUEUE_SEL, (uint32_t)i);
        if (reg_read(q, REG_QUEUE_NUM_MAX) < QSIZE)
            return DISK_FAILED;
        reg_write(q, REG_QUEUE_NUM, QSIZE);
        set_ring_address(q, REG_QUEUE_DESC, slot + SLOT_DESC);
        set_ring_address(q, REG_QUEUE_DRIVER, slot + SLOT_AVAIL);
        set_ring_address(q, REG_QUEUE_DEVICE, slot + SLOT_USED);
        reg_write(q, REG_QUEUE_READY, 1);
    }
    uint32_t running = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    reg_write(q, REG_STATUS, running);
    /* A read answers after every write before it: the device runs when it comes back. */
    if (reg_read(q, REG_STATUS) != running)
        return DISK_FAILED;
    info->blocks = sectors / SECTORS_PER_BLOCK;
    info->read_only = (low & F_BLK_RO) != 0;
    info->event_idx = (low & F_EVENT_IDX) != 0;
    return DISK_READY;
}

static uint64_t next_random(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

/* Fill slot k's descriptors and header with the queue's next request; returns its chain head. */
static uint16_t prepare(struct queue *q, uint16_t k)
{
    volatile struct desc *d = q->desc + 3u * k;
    volatile struct blk_header *h = q->headers + k;
    uint64_t data = q->slot + SLOT_DATA + (uint64_t)k * BLOCK;
    uint64_t n = q->requests++;
    uint32_t type = BLK_T_IN;
    uint64_t block = next_random(&q->random) % q->read_blocks;
    if (q->writes && n % 8 == 3) {
        type = BLK_T_OUT;
        block = q->write_base + q->next_write++ % q->write_blocks;
        volatile uint64_t *words = (volatile uint64_t *)data;
        for (uint32_t i = 0; i < BLOCK / 8; i++)
            words[i] = block * BLOCK + i * 8 + MPVMM_DISK_PATTERN_SALT;
    } else if (q->writes && n % 8 == 7) {
        type = BLK_T_FLUSH;
        block = 0;
    }
    h->type = type;
    h->reserved = 0;
    h->sector = block * SECTORS_PER_BLOCK;
    q->status[k] = 0xFF;
    d[0].addr = (uint64_t)h;
    d[0].len = sizeof(struct blk_header);
    d[0].flags = DESC_F_NEXT;
    d[0].next = type == BLK_T_FLUSH ? 3u * k + 2 : 3u * k + 1;
    d[1].addr = data;
    d[1].len = BLOCK;
    d[1].flags = DESC_F_NEXT | (type == BLK_T_IN ? DESC_F_WRITE : 0);
    d[1].next = 3u * k + 2;
    d[2].addr = (uint64_t)(q->status + k);
    d[2].len = 1;
    d[2].flags = DESC_F_WRITE;
    d[2].next = 0;
    return (uint16_t)(3u * k);
}

static void offer(struct queue *q, uint16_t k)
{
    q->avail[2 + q->avail_idx % QSIZE] = prepare(q, k);
    q->avail_idx++;
}

/* Publish what was offered since ``old`` and kick if the device wants it. */
static void publish(struct queue *q, uint16_t old)
{
    if (q->avail_idx == old)
        return;
    q->avail[2 + QSIZE] = (uint16_t)(q->used_seen + 0x8000); /* used_event: no interrupt, ever */
    __atomic_store_n(&q->avail[1], q->avail_idx, __ATOMIC_RELEASE);
    full_fence(); /* the index is visible before avail_event is read (docs/virtio.md, fence) */
    if (q->event_idx) {
        uint16_t event = q->used[2 + 4 * QSIZE];
        if ((uint16_t)(q->avail_idx - event - 1) >= (uint16_t)(q->avail_idx - old))
            return;
    } else if (q->used[0] & 1) { /* VIRTQ_USED_F_NO_NOTIFY */
        return;
    }
    op(q->report, MPVMM_OP_VIRTIO_KICKS);
    __asm__ volatile("movl %0, (%1)" : : "r"(q->index), "r"(q->window + REG_QUEUE_NOTIFY) : "memory");
}

/* Account for slot k's finished request, checking a read's data. */
static void complete(struct queue *q, uint16_t k)
{
    volatile struct blk_header *h = q->headers + k;
    if (q->status[k] != 0) {
        op(q->report, MPVMM_OP_BLK_ERRORS);
        return;
    }
    if (h->type == BLK_T_FLUSH) {
        op(q->report, MPVMM_OP_BLK_FLUSHES);
    } else if (h->type == BLK_T_OUT) {
        op(q->report, MPVMM_OP_BLK_WRITES);
    } else {
        op(q->report, MPVMM_OP_BLK_READS);
        volatile uint64_t *words = (volatile uint64_t *)(q->slot + SLOT_DATA + (uint64_t)k * BLOCK);
        uint64_t offset = h->sector * 512;
        for (uint32_t i = 0; i < BLOCK / 8; i++)
            if (words[i] != offset + i * 8 + MPVMM_DISK_PATTERN_SALT) {
                op(q->report, MPVMM_OP_READ_MISMATCHES);
                break;
            }
    }
}

/* Keep depth requests in flight until asked to stop, then drain them (and flush, with writes). */
static void serve(struct queue *q)
{
    uint32_t in_flight = q->depth;
    for (uint16_t k = 0; k < q->depth; k++)
        offer(q, k);
    publish(q, 0);
    int final_flush = q->writes;
    while (in_flight) {
        uint16_t old = q->avail_idx;
        uint16_t used_idx = __atomic_load_n(&q->used[1], __ATOMIC_ACQUIRE);
        while (q->used_seen != used_idx) {
            volatile uint32_t *entry = (volatile uint32_t *)(q->used + 2) + 2 * (q->used_seen % QSIZE);
            uint16_t k = (uint16_t)(entry[0] / 3);
            q->used_seen++;
            complete(q, k);
            in_flight--;
            if (!q->params->stop) {
                offer(q, k);
                in_flight++;
            } else if (final_flush && in_flight == 0) {
                q->writes = 1;
                q->requests = 7; /* the next request is a flush */
                offer(q, k);
                in_flight++;
                final_flush = 0;
            }
        }
        publish(q, old);
        if (used_idx == q->used_seen)
            __asm__ volatile("pause");
    }
}

/* Returns the status the vCPU finishes with. */
int run_virtio_blk(uint64_t vcpu, volatile struct mpvmm_guest_params *p, volatile struct mpvmm_guest_report *r,
                   int writes)
{
    if (!p->virtio_disks || !p->virtio_queue_depth || p->virtio_queue_depth > MPVMM_VIRTIO_MAX_DEPTH)
        return MPVMM_STATUS_BAD_PARAMS;
    uint64_t disk = vcpu % p->virtio_disks;
    uint64_t queues = (p->cpus + p->virtio_disks - 1) / p->virtio_disks;
    struct queue q = {.params = p, .report = r, .index = (uint32_t)(vcpu / p->virtio_disks),
                      .depth = p->virtio_queue_depth, .random = 0x9E3779B97F4A7C15ull * (vcpu + 1)};
    q.window = p->virtio_mmio_base + disk * 4096;
    q.slot = slot_address(p, vcpu);
    q.desc = (volatile struct desc *)(q.slot + SLOT_DESC);
    q.avail = (volatile uint16_t *)(q.slot + SLOT_AVAIL);
    q.used = (volatile uint16_t *)(q.slot + SLOT_USED);
    q.headers = (volatile struct blk_header *)(q.slot + SLOT_HEADERS);
    q.status = (volatile uint8_t *)(q.slot + SLOT_STATUS);
    volatile struct disk_info *info = (volatile struct disk_info *)(slot_address(p, disk) + SLOT_DISK);
    if (q.index == 0)
        __atomic_store_n(&info->state, bring_up(&q, disk, queues, info), __ATOMIC_RELEASE);
    while (__atomic_load_n(&info->state, __ATOMIC_ACQUIRE) == DISK_STARTING && !p->stop)
        __asm__ volatile("pause");
    if (info->state != DISK_READY || info->blocks < 2)
        return MPVMM_STATUS_BAD_PARAMS;
    q.event_idx = (int)info->event_idx;
    q.writes = writes && !info->read_only;
    q.read_blocks = writes ? info->blocks / 2 : info->blocks; /* a read-only disk too: its second half may be anything */
    q.write_blocks = (info->blocks - info->blocks / 2) / queues;
    q.write_base = info->blocks / 2 + q.index * q.write_blocks;
    if (q.writes && q.write_blocks == 0)
        return MPVMM_STATUS_BAD_PARAMS;
    serve(&q);
    return MPVMM_STATUS_OK;
}
