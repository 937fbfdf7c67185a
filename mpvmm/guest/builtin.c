/*
 * The built-in guest: one copy runs on every vCPU, at CPL 3 with IOPL 3, so
 * port I/O is allowed and nothing privileged is ever executed (supervisor-mode
 * guest code is emulated instruction by instruction on the nested KVM these
 * machines run; user mode runs natively: docs/design.md, "PVM hosts").
 *
 * Every exit the guest causes is counted in its report before it is made, in
 * exactly one op (abi.h), so tests can check the VMM's exit counts against
 * the guest's own. The run ends when the supervisor sets v->params->stop.
 */
#include "abi.h"

#define COMPUTE_CHUNK 1000000u  /* iterations between checks of the stop flag */
#define DEMO_LINE_EVERY 500u    /* demo rounds between console lines */
#define UART_THR 0              /* transmit holding register offset */
#define UART_LSR 5              /* line status register offset */

/* Per-vCPU state. All vCPUs run this code over the same RAM, so nothing
 * per-vCPU may live in a global: it lives on the vCPU's own stack. */
struct vcpu {
    uint64_t index;
    volatile struct mpvmm_guest_params *params;
    volatile struct mpvmm_guest_report *report;
    volatile struct mpvmm_guest_shared *shared;
};

/* --- Port and MMIO accessors: one instruction each, so each is one exit. */

static inline void outb(uint16_t port, uint8_t value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline void outl(uint16_t port, uint32_t value)
{
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline uint32_t inl(uint16_t port)
{
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static inline void mmio_write64(uint64_t address, uint64_t value)
{
    __asm__ volatile("movq %0, (%1)" : : "r"(value), "r"(address) : "memory");
}

static inline uint64_t mmio_read64(uint64_t address)
{
    uint64_t value;
    __asm__ volatile("movq (%1), %0" : "=r"(value) : "r"(address) : "memory");
    return value;
}

static inline void count(struct vcpu *v, enum mpvmm_guest_op op)
{
    v->report->ops[op]++;
}

static inline int stopping(struct vcpu *v)
{
    return v->params->stop != 0;
}

/* The value the device model's test device returns for a read (devices.py). */
static inline uint64_t testdev_pattern(uint64_t offset, unsigned size)
{
    uint64_t value = 0x5A5A5A5A5A5A5A5AULL ^ offset;
    return size == 8 ? value : value & ((1ULL << (8 * size)) - 1);
}

/* --- Console: whole lines, never interleaved between vCPUs. Each vCPU's
 * UART writes go through its own queue, so the device model may interleave
 * two vCPUs' bytes. Holding a guest lock until a read of LSR has come back
 * (a sync exit, answered only after this vCPU's earlier writes were handled)
 * keeps every line whole. */

static void console_lock(struct vcpu *v)
{
    while (__atomic_exchange_n(&v->shared->uart_lock, 1, __ATOMIC_ACQUIRE))
        while (v->shared->uart_lock)
            __asm__ volatile("pause");
}

static void console_unlock(struct vcpu *v)
{
    __atomic_store_n(&v->shared->uart_lock, 0, __ATOMIC_RELEASE);
}

static void put_char(struct vcpu *v, char c)
{
    count(v, MPVMM_OP_UART_BYTES);
    outb(v->params->uart_port + UART_THR, (uint8_t)c);
}

static void put_string(struct vcpu *v, const char *s)
{
    while (*s)
        put_char(v, *s++);
}

static void put_decimal(struct vcpu *v, uint64_t value)
{
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        put_char(v, digits[--n]);
}

static void end_line(struct vcpu *v)
{
    put_char(v, '\n');
    count(v, MPVMM_OP_UART_SYNCS);
    (void)inb(v->params->uart_port + UART_LSR);
}

static void print_vcpu_line(struct vcpu *v, const char *what, uint64_t number, int with_number)
{
    console_lock(v);
    put_string(v, "vcpu ");
    put_decimal(v, v->index);
    put_char(v, ' ');
    put_string(v, what);
    if (with_number) {
        put_char(v, ' ');
        put_decimal(v, number);
    }
    end_line(v);
    console_unlock(v);
}

/* --- Workload steps: each does one kind of work once. */

static void null_write(struct vcpu *v, uint32_t value)
{
    count(v, MPVMM_OP_PIO_NULL_WRITES);
    outl(v->params->null_port, value);
}

/* The test device checks the order of each vCPU's writes: a 4-byte value
 * carries the vCPU in its top byte and a count in the rest, an 8-byte one
 * the vCPU in its top half; each vCPU's counts go up by one (devices.py). */
static void pio_device_write(struct vcpu *v, uint32_t sequence)
{
    uint32_t value = (uint32_t)(v->index << 24) | (sequence & 0xFFFFFFu);
    count(v, MPVMM_OP_PIO_DEVICE_WRITES);
    v->report->pio_write_sum += value;
    outl(v->params->pio_testdev_port, value);
}

static void pio_device_read(struct vcpu *v, unsigned offset)
{
    count(v, MPVMM_OP_PIO_DEVICE_READS);
    if (inl(v->params->pio_testdev_port + offset) != testdev_pattern(offset, 4))
        count(v, MPVMM_OP_READ_MISMATCHES);
}

static void mmio_write(struct vcpu *v, uint64_t offset, uint32_t sequence)
{
    uint64_t value = (v->index << 32) | sequence;
    count(v, MPVMM_OP_MMIO_WRITES);
    v->report->mmio_write_sum += value;
    mmio_write64(v->params->mmio_testdev_addr + offset, value);
}

static void mmio_read(struct vcpu *v, uint64_t offset)
{
    count(v, MPVMM_OP_MMIO_READS);
    if (mmio_read64(v->params->mmio_testdev_addr + offset) != testdev_pattern(offset, 8))
        count(v, MPVMM_OP_READ_MISMATCHES);
}

static void ring_doorbells(struct vcpu *v, uint64_t round)
{
    count(v, MPVMM_OP_PIO_DOORBELLS);
    outl(v->params->pio_doorbell_port, (uint32_t)round);
    count(v, MPVMM_OP_MMIO_DOORBELLS);
    mmio_write64(v->params->mmio_doorbell_addr, v->params->doorbell_value);
    if (round % 16 == 15) {
        count(v, MPVMM_OP_MMIO_DOORBELL_MISSES);
        mmio_write64(v->params->mmio_doorbell_addr, v->params->doorbell_value + 1);
    }
}

static void atomic_increment(struct vcpu *v, uint64_t round)
{
    count(v, MPVMM_OP_ATOMIC_INCREMENTS);
    __atomic_fetch_add(&v->shared->counters[(round + v->index) % MPVMM_ATOMIC_COUNTERS], 1,
                       __ATOMIC_RELAXED);
}

static void sleep_us(struct vcpu *v, uint32_t microseconds)
{
    count(v, MPVMM_OP_SLEEPS);
    outl(v->params->sleep_port, microseconds);
}

/* A round of integer mixing the compiler cannot fold away. */
static uint64_t compute_chunk(struct vcpu *v, uint64_t state)
{
    for (uint32_t i = 0; i < COMPUTE_CHUNK; i++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
    }
    /* Nothing reads the final state, so without this gcc drops the loop and
     * "compute" would count iterations it never ran. */
    __asm__ volatile("" : : "r"(state));
    v->report->ops[MPVMM_OP_COMPUTE_ITERATIONS] += COMPUTE_CHUNK;
    return state;
}

/* --- Workloads: loop until the supervisor asks to stop.
 *
 * Each runs at least one round before it looks at the stop flag: a vCPU
 * that comes online late (eight worker processes starting on two host
 * CPUs) may find the stop already set, and must still have done, and
 * counted, some of its work. */

static void run_demo(struct vcpu *v)
{
    uint64_t state = v->index + 1;
    uint64_t round = 0;
    do {
        for (int i = 0; i < 4; i++)
            null_write(v, (uint32_t)round);
        pio_device_write(v, (uint32_t)round);
        pio_device_read(v, (round & 1) * 4);
        mmio_write(v, (round * 8) & 0xff8, (uint32_t)round);
        mmio_read(v, (round * 8) & 0xff8);
        ring_doorbells(v, round);
        for (int i = 0; i < 16; i++)
            atomic_increment(v, round + i);
        if (round % 64 == 0)
            state = compute_chunk(v, state);
        if (round % DEMO_LINE_EVERY == DEMO_LINE_EVERY - 1)
            print_vcpu_line(v, "demo round", round + 1, 1);
        sleep_us(v, v->params->demo_sleep_us);
    } while (round++, !stopping(v));
}

static void run_compute(struct vcpu *v)
{
    uint64_t state = v->index + 1;
    do
        state = compute_chunk(v, state);
    while (!stopping(v));
}

static void run_pio_null(struct vcpu *v)
{
    uint32_t value = 0;
    do
        null_write(v, value++);
    while (!stopping(v));
}

/* Four posted writes, then one sync read of the value pattern. */
static void run_pio_device(struct vcpu *v)
{
    uint32_t round = 0;
    do {
        for (uint32_t i = 0; i < 4; i++)
            pio_device_write(v, round * 4 + i);
        pio_device_read(v, (round & 1) * 4);
    } while (round++, !stopping(v));
}

static void run_mmio(struct vcpu *v)
{
    uint64_t round = 0;
    do {
        for (uint64_t i = 0; i < 4; i++)
            mmio_write(v, ((round * 4 + i) * 8) & 0xff8, (uint32_t)(round * 4 + i));
        mmio_read(v, (round * 8) & 0xff8);
    } while (round++, !stopping(v));
}

/* Doorbells: each round rings the pio test device's (any value) and the mmio
 * test device's (its datamatch value); every 16th round also writes the
 * mmio doorbell with a value that does not match, which exits. */
static void run_doorbell(struct vcpu *v)
{
    uint64_t round = 0;
    do
        ring_doorbells(v, round);
    while (round++, !stopping(v));
}

/* Writes to both test devices and no read, so nothing ever waits for the
 * device model: with the device model stopped, KVM's coalesced ring fills. */
static void run_writes(struct vcpu *v)
{
    uint32_t round = 0;
    do {
        pio_device_write(v, round);
        mmio_write(v, (round * 8) & 0xff8, round);
    } while (round++, !stopping(v));
}

static void run_uart(struct vcpu *v)
{
    uint64_t line = 1;
    do
        print_vcpu_line(v, "uart line", line++, 1);
    while (!stopping(v));
}

/* A guest that means harm: it floods the UART, writes every port in turn
 * with small values, reads ports, and writes and reads random addresses in
 * the MMIO hole, from every vCPU at once. It skips the paravirtual ports
 * (0x510-0x51f) so it keeps running for the whole test, and keeps values
 * below 0x20 so it does not ask for a reset (0xFE) or an ACPI sleep (SLP_EN,
 * bit 13): those end a VM cleanly and are tested on their own. It stays out
 * of the IOAPIC and local APIC pages, which KVM emulates in the kernel, so
 * one vCPU cannot INIT another. */
#define HOSTILE_MMIO_BASE 0xC0000000ull
#define HOSTILE_MMIO_SIZE 0x3EC00000ull /* up to the IOAPIC at 0xFEC00000 */

static uint64_t next_random(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return *state;
}

static int paravirt_port(uint16_t port)
{
    return port >= 0x510 && port < 0x520;
}

static void run_hostile(struct vcpu *v)
{
    uint64_t random = 0x9E3779B97F4A7C15ull * (v->index + 1);
    uint16_t port = (uint16_t)(v->index * 0x1000);
    uint64_t round = 0;
    do {
        for (int i = 0; i < 16; i++)
            put_char(v, (char)('!' + (round + i) % 90));
        for (int i = 0; i < 8; i++, port++) {
            if (paravirt_port(port))
                continue;
            count(v, MPVMM_OP_HOSTILE_PORT_WRITES);
            outb(port, (uint8_t)(round & 0x1f));
        }
        uint16_t read_port = (uint16_t)next_random(&random);
        if (!paravirt_port(read_port)) {
            count(v, MPVMM_OP_HOSTILE_PORT_READS);
            (void)inb(read_port);
        }
        uint64_t address = HOSTILE_MMIO_BASE + (next_random(&random) % HOSTILE_MMIO_SIZE & ~7ull);
        count(v, MPVMM_OP_HOSTILE_MMIO_WRITES);
        mmio_write64(address, round);
        count(v, MPVMM_OP_HOSTILE_MMIO_READS);
        (void)mmio_read64(address + 8);
    } while (round++, !stopping(v));
}

static void run_triple_fault(struct vcpu *v)
{
    (void)v;
    /* #UD with no IDT to deliver it through: #DF, then a triple fault. */
    __asm__ volatile("ud2");
}

/* Returns whether its own count (in a register) still matches the one in
 * its report (in RAM): see MPVMM_STATUS_STATE_LOST. */
static int run_atomics(struct vcpu *v)
{
    uint64_t round = 0;
    do
        atomic_increment(v, round++);
    while (!stopping(v));
    return round == v->report->ops[MPVMM_OP_ATOMIC_INCREMENTS];
}

/* Writes one word in each of this vCPU's pages of the dirty region in turn,
 * so many pages per burst that the whole VM dirties dirty_rate_mib MiB/s,
 * resting dirty_round_us between bursts: the load a live migration has to
 * outrun (it copies what the guest dirtied while it copied). */
#define PAGE_SIZE 4096u
#define PAGES_PER_MIB 256u
#define CREDIT_PER_PAGE 1000000u /* page-microseconds: pages/s times microseconds */

static int run_dirty(struct vcpu *v)
{
    volatile struct mpvmm_guest_params *p = v->params;
    uint64_t pages = p->dirty_size / PAGE_SIZE / p->cpus;
    uint64_t base = p->dirty_base + v->index * pages * PAGE_SIZE;
    uint64_t pages_per_second = (uint64_t)p->dirty_rate_mib * PAGES_PER_MIB / p->cpus;
    uint64_t credit = 0, next = 0, round = 0, written = 0;
    do {
        sleep_us(v, p->dirty_round_us);
        credit += pages_per_second * p->dirty_round_us;
        for (; credit >= CREDIT_PER_PAGE && pages; credit -= CREDIT_PER_PAGE) {
            *(volatile uint64_t *)(base + next * PAGE_SIZE) = round;
            count(v, MPVMM_OP_DIRTY_PAGES);
            written++;
            if (++next == pages)
                next = 0;
        }
    } while (round++, !stopping(v));
    return written == v->report->ops[MPVMM_OP_DIRTY_PAGES];
}

static void finish(struct vcpu *v, uint64_t status)
{
    v->report->status = status;
    v->report->state = MPVMM_REPORT_STATE_DONE;
    count(v, MPVMM_OP_DEBUG_EXITS);
    outl(v->params->debug_exit_port, (uint32_t)status);
}

void guest_main(uint64_t index, volatile struct mpvmm_guest_params *block)
{
    struct vcpu vcpu = {.index = index, .params = block};
    struct vcpu *v = &vcpu;

    if (block->magic != MPVMM_PARAMS_MAGIC || block->abi_version != MPVMM_GUEST_ABI_VERSION) {
        /* Without valid parameters there is no port to report on: spin in
         * the entry stub, where the supervisor's stop will find this vCPU. */
        return;
    }
    v->report = (volatile struct mpvmm_guest_report *)(block->reports_addr + index * block->report_stride);
    v->shared = (volatile struct mpvmm_guest_shared *)block->shared_addr;
    v->report->magic = MPVMM_REPORT_MAGIC;
    v->report->state = MPVMM_REPORT_STATE_ONLINE;
    print_vcpu_line(v, "online", 0, 0);

    int consistent = 1;
    switch (block->workload) {
    case MPVMM_WORKLOAD_DEMO: run_demo(v); break;
    case MPVMM_WORKLOAD_COMPUTE: run_compute(v); break;
    case MPVMM_WORKLOAD_PIO_NULL: run_pio_null(v); break;
    case MPVMM_WORKLOAD_PIO_DEVICE: run_pio_device(v); break;
    case MPVMM_WORKLOAD_MMIO: run_mmio(v); break;
    case MPVMM_WORKLOAD_UART: run_uart(v); break;
    case MPVMM_WORKLOAD_ATOMICS: consistent = run_atomics(v); break;
    case MPVMM_WORKLOAD_HOSTILE: run_hostile(v); break;
    case MPVMM_WORKLOAD_TRIPLE_FAULT: run_triple_fault(v); break;
    case MPVMM_WORKLOAD_DIRTY: consistent = run_dirty(v); break;
    case MPVMM_WORKLOAD_DOORBELL: run_doorbell(v); break;
    case MPVMM_WORKLOAD_WRITES: run_writes(v); break;
    default: finish(v, MPVMM_STATUS_BAD_PARAMS); return;
    }
    if (!consistent)
        finish(v, MPVMM_STATUS_STATE_LOST);
    else
        finish(v, v->report->ops[MPVMM_OP_READ_MISMATCHES] ? MPVMM_STATUS_READ_MISMATCH : MPVMM_STATUS_OK);
}
