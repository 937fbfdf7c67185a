/*
 * The contract between the supervisor and the built-in guest.
 *
 * The supervisor writes one `mpvmm_guest_params` block into guest RAM and
 * enters every vCPU at the guest's entry point with RDI = vCPU index and
 * RSI = the block's guest-physical address (identity-mapped). The guest takes
 * every port and address it uses from the block, so the only place they are
 * written down is mpvmm/x86/layout.py. Each vCPU keeps its own counts in its
 * `mpvmm_guest_report`, which the supervisor reads out of the shared guest
 * RAM while the VM runs and after it stops.
 *
 * This header is compiled into the guest and into the run-loop extension,
 * which exports the offsets so that mpvmm/guest/abi.py is checked against it.
 */
#ifndef MPVMM_GUEST_ABI_H
#define MPVMM_GUEST_ABI_H

#include <stdint.h>

#define MPVMM_GUEST_ABI_VERSION 3
#define MPVMM_PARAMS_MAGIC 0x524150564d56504dULL /* "MPVMVPAR" little-endian */
#define MPVMM_REPORT_MAGIC 0x545045524d56504dULL /* "MPVMREPT" little-endian */

enum mpvmm_workload {
    MPVMM_WORKLOAD_DEMO = 0,
    MPVMM_WORKLOAD_COMPUTE = 1,
    MPVMM_WORKLOAD_PIO_NULL = 2,
    MPVMM_WORKLOAD_PIO_DEVICE = 3,
    MPVMM_WORKLOAD_MMIO = 4,
    MPVMM_WORKLOAD_UART = 5,
    MPVMM_WORKLOAD_ATOMICS = 6,
    MPVMM_WORKLOAD_HOSTILE = 7,      /* floods and pokes everything; see builtin.c */
    MPVMM_WORKLOAD_TRIPLE_FAULT = 8, /* executes ud2 with no IDT: the VMM must report it */
    MPVMM_WORKLOAD_DIRTY = 9,        /* writes pages at dirty_rate_mib: a migration's load */
    MPVMM_WORKLOAD_DOORBELL = 10,    /* rings the test devices' doorbells (KVM_IOEVENTFD) */
    MPVMM_WORKLOAD_WRITES = 11,      /* test-device writes only, never a read: fills a coalesced ring */
};

/* What a vCPU counts: every exit it causes falls in exactly one of the
 * exit-causing ops, so the VMM's exit counts can be checked against them.
 * Where the VMM registered them with KVM, writes to the test devices'
 * registers are coalesced (they exit only when KVM's ring is full) and
 * doorbell rings signal an eventfd (they never exit). */
enum mpvmm_guest_op {
    MPVMM_OP_PIO_NULL_WRITES = 0,  /* native: writes to the null port */
    MPVMM_OP_PIO_DEVICE_WRITES,    /* posted: writes to the pio test device */
    MPVMM_OP_PIO_DEVICE_READS,     /* sync: reads of the pio test device */
    MPVMM_OP_MMIO_WRITES,          /* posted: writes to the mmio test device */
    MPVMM_OP_MMIO_READS,           /* sync: reads of the mmio test device */
    MPVMM_OP_UART_BYTES,           /* posted: bytes written to the UART */
    MPVMM_OP_UART_SYNCS,           /* sync: LSR reads that end each line */
    MPVMM_OP_SLEEPS,               /* native: writes to the sleep port */
    MPVMM_OP_DEBUG_EXITS,          /* native: the final debug-exit write */
    MPVMM_OP_ATOMIC_INCREMENTS,    /* no exit: locked adds to shared counters */
    MPVMM_OP_COMPUTE_ITERATIONS,   /* no exit: rounds of pure arithmetic */
    MPVMM_OP_READ_MISMATCHES,      /* no exit: device reads with a wrong value */
    /* The hostile workload's pokes: some ports are handled inside KVM (PIC,
     * PIT), so these bound the exits they cause rather than count them. */
    MPVMM_OP_HOSTILE_PORT_WRITES,  /* varies: posted, or none where KVM handles the port */
    MPVMM_OP_HOSTILE_PORT_READS,   /* varies: sync, or none where KVM handles the port */
    MPVMM_OP_HOSTILE_MMIO_WRITES,  /* varies: posted (the hostile workload avoids KVM's pages) */
    MPVMM_OP_HOSTILE_MMIO_READS,   /* varies: sync (likewise) */
    MPVMM_OP_DIRTY_PAGES,          /* no exit: pages the dirty workload wrote */
    MPVMM_OP_PIO_DOORBELLS,        /* posted: the pio test device's doorbell (any value) */
    MPVMM_OP_MMIO_DOORBELLS,       /* posted: the mmio test device's doorbell, its datamatch value */
    MPVMM_OP_MMIO_DOORBELL_MISSES, /* posted: the mmio doorbell written with another value */
    MPVMM_OP_COUNT
};

#define MPVMM_ATOMIC_COUNTERS 8

/* Guest RAM every vCPU writes: the atomics counters and the console lock. */
struct mpvmm_guest_shared {
    uint64_t counters[MPVMM_ATOMIC_COUNTERS];
    uint64_t uart_lock;        /* held while a vCPU writes one console line */
};

struct mpvmm_guest_params {
    uint64_t magic;
    uint32_t abi_version;
    uint32_t cpus;
    uint32_t workload;
    uint32_t demo_sleep_us;    /* pause between demo rounds */
    uint64_t stop;             /* set non-zero by the supervisor: finish and exit */
    uint64_t reports_addr;     /* vCPU i's report at reports_addr + i * report_stride */
    uint64_t report_stride;
    uint64_t shared_addr;      /* a struct mpvmm_guest_shared */
    uint64_t mmio_testdev_addr;
    uint16_t uart_port;
    uint16_t null_port;
    uint16_t debug_exit_port;
    uint16_t sleep_port;
    uint16_t pio_testdev_port;
    uint16_t pio_doorbell_port;
    uint16_t reserved[2];
    /* The dirty workload: dirty_rate_mib MiB/s in all, split evenly between
     * the vCPUs, each over its share of [dirty_base, dirty_base + dirty_size),
     * in bursts every dirty_round_us. */
    uint32_t dirty_rate_mib;
    uint32_t dirty_round_us;
    uint64_t dirty_base;
    uint64_t dirty_size;
    uint64_t mmio_doorbell_addr;
    uint32_t doorbell_value;   /* rings the mmio doorbell (its datamatch); any other value misses */
    uint32_t reserved2;
};

struct mpvmm_guest_report {
    uint64_t magic;
    uint64_t state;            /* 0 not started, 1 online, 2 done */
    uint64_t status;           /* the status written to the debug-exit port */
    uint64_t pio_write_sum;    /* sum of values written to the pio test device */
    uint64_t mmio_write_sum;   /* sum of values written to the mmio test device */
    uint64_t ops[MPVMM_OP_COUNT];
};

#define MPVMM_REPORT_STATE_ONLINE 1
#define MPVMM_REPORT_STATE_DONE 2

/* Exit statuses the guest writes to the debug-exit port. */
#define MPVMM_STATUS_OK 0
#define MPVMM_STATUS_BAD_PARAMS 2
#define MPVMM_STATUS_READ_MISMATCH 3
/* A workload's own count, kept in a register, disagrees with its count in
 * RAM: registers and RAM came back from different moments (a snapshot or a
 * migration that lost a page). */
#define MPVMM_STATUS_STATE_LOST 4

#endif
