/*
 * The raw reference loop of `mpvmm bench`: KVM_RUN and the least work that
 * keeps the built-in guest correct, nothing else. No route table, no stats
 * page, no device model, no queues: the same guest making the same exits,
 * so its exit rate is what KVM alone costs on this host, and every other
 * runner's figure is a ratio to it (docs/design.md, "The GIL ceiling",
 * measured the same thing on a 16-core machine).
 *
 * Each exit is answered in place:
 *   a read of a test device   testdev_pattern(offset, size), as devices.py
 *   a read of the UART's LSR  "transmitter empty", so console lines end
 *   any other read            zeros for mpvmm's paravirtual ports, all ones
 *                             elsewhere (what the device model's bus gives)
 *   a write                   dropped, except the debug-exit port, which
 *                             ends the vCPU with the written status
 *
 * Stopping is the native loop's: the bench sets `stop`, sets the kvm_run
 * page's immediate_exit and sends the kick signal (its no-op handler is the
 * one _runloop.install_kick_handler installed), so KVM_RUN returns EINTR.
 * The loop never blocks anywhere else, so no poll timeout is needed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../vcpu_worker/outcome.h"

#define CONTROL_STRIDE 64 /* one cache line per vCPU */

/* One per vCPU, CONTROL_STRIDE bytes apart (mpvmm/bench/raw.py mirrors it,
 * checked against layout()). Only `stop` is written by the bench. */
struct raw_control {
    uint32_t stop;     /* non-zero: leave the loop at the next check */
    uint32_t tid;      /* the worker thread's kernel thread id, for --pin */
    uint64_t exits;    /* port-I/O and MMIO exits so far; sampled at the window's edges */
};

/* Where the guest's devices are and what they answer: taken from layout.py,
 * devices.py and serial.py by the caller, so nothing is written down twice. */
struct raw_machine {
    uint64_t mmio_testdev_addr;
    uint64_t mmio_testdev_size;
    uint32_t pio_testdev_port;
    uint32_t pio_testdev_count;
    uint32_t null_port;
    uint32_t sleep_port;
    uint32_t debug_exit_port;
    uint32_t paravirt_port_count; /* each paravirtual port's span */
    uint32_t uart_lsr_port;
    uint32_t uart_lsr_empty;      /* LSR.THRE | LSR.TEMT: nothing left to send */
    uint64_t testdev_pattern;     /* the test device answers this XOR the offset */
};

struct raw_vcpu {
    int vcpu_fd;
    struct kvm_run *run;
    struct raw_control *control;
    struct raw_machine machine;
    uint64_t io_exits;
    uint64_t mmio_exits;
};

static uint64_t testdev_pattern(const struct raw_machine *m, uint64_t offset, uint32_t size)
{
    uint64_t value = m->testdev_pattern ^ offset;
    return size >= 8 ? value : value & ((1ULL << (8 * size)) - 1);
}

static int is_paravirt_port(const struct raw_machine *m, uint64_t port)
{
    return port - m->null_port < m->paravirt_port_count || port - m->sleep_port < m->paravirt_port_count ||
           port - m->debug_exit_port < m->paravirt_port_count;
}

/* The value a port read gets. */
static uint64_t pio_read(const struct raw_machine *m, uint64_t port, uint32_t size)
{
    if (port - m->pio_testdev_port < m->pio_testdev_count)
        return testdev_pattern(m, port - m->pio_testdev_port, size);
    if (port == m->uart_lsr_port)
        return m->uart_lsr_empty;
    if (is_paravirt_port(m, port))
        return 0;
    return ~0ULL; /* nothing there: every data line high */
}

/* Answers one KVM_EXIT_IO; 1 when the guest wrote the debug-exit port. */
static int handle_io(struct raw_vcpu *v, uint64_t *status)
{
    struct kvm_run *run = v->run;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint32_t size = run->io.size;
    /* String instructions (rep outsb) hand over `count` elements at once. */
    for (uint32_t i = 0; i < run->io.count; i++, data += size) {
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            if (run->io.port - v->machine.debug_exit_port < v->machine.paravirt_port_count) {
                uint64_t value = 0;
                memcpy(&value, data, size);
                *status = value;
                return 1;
            }
            continue; /* every other write is dropped */
        }
        uint64_t value = pio_read(&v->machine, run->io.port, size);
        memcpy(data, &value, size); /* little-endian, as the guest loads it */
    }
    return 0;
}

static void handle_mmio(struct raw_vcpu *v)
{
    struct kvm_run *run = v->run;
    if (run->mmio.is_write)
        return;
    uint64_t offset = run->mmio.phys_addr - v->machine.mmio_testdev_addr;
    uint64_t value = offset < v->machine.mmio_testdev_size ? testdev_pattern(&v->machine, offset, run->mmio.len)
                                                           : ~0ULL;
    memcpy(run->mmio.data, &value, run->mmio.len);
}

/* The loop; runs without the GIL. */
static enum outcome raw_loop(struct raw_vcpu *v, uint64_t *value)
{
    for (;;) {
        if (__atomic_load_n(&v->control->stop, __ATOMIC_ACQUIRE))
            return OUTCOME_STOPPED;
        if (ioctl(v->vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR) {
                /* A kick: clear the flag the bench set, then look at `stop`. */
                __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_RELAXED);
                continue;
            }
            if (errno == EAGAIN)
                continue;
            *value = (uint64_t)errno;
            return OUTCOME_ERROR;
        }
        switch (v->run->exit_reason) {
        case KVM_EXIT_IO:
            v->io_exits++;
            /* A relaxed store to a line no other thread writes: a plain mov,
             * nothing next to the exit itself, and the bench can read the
             * count mid-run without stopping the vCPU. */
            __atomic_store_n(&v->control->exits, v->io_exits + v->mmio_exits, __ATOMIC_RELAXED);
            if (handle_io(v, value))
                return OUTCOME_EXITED;
            break;
        case KVM_EXIT_MMIO:
            v->mmio_exits++;
            __atomic_store_n(&v->control->exits, v->io_exits + v->mmio_exits, __ATOMIC_RELAXED);
            handle_mmio(v);
            break;
        case KVM_EXIT_INTR: /* a signal arrived while the guest ran */
            break;
        default:
            *value = v->run->exit_reason;
            return OUTCOME_FAULT;
        }
    }
}

/* ---- Python API. ---- */

static PyObject *rawloop_run(PyObject *self, PyObject *args)
{
    int vcpu_fd;
    unsigned long long run_address, control_address;
    struct raw_machine m;
    const char *name;
    if (!PyArg_ParseTuple(args, "iKK(KKIIIIIIIIK)s", &vcpu_fd, &run_address, &control_address,
                          &m.mmio_testdev_addr, &m.mmio_testdev_size, &m.pio_testdev_port,
                          &m.pio_testdev_count, &m.null_port, &m.sleep_port, &m.debug_exit_port,
                          &m.paravirt_port_count, &m.uart_lsr_port, &m.uart_lsr_empty,
                          &m.testdev_pattern, &name))
        return NULL;
    struct raw_vcpu v = {
        .vcpu_fd = vcpu_fd,
        .run = (struct kvm_run *)(uintptr_t)run_address,
        .control = (struct raw_control *)(uintptr_t)control_address,
        .machine = m,
    };
    uint64_t value = 0;
    enum outcome outcome;
    Py_BEGIN_ALLOW_THREADS
    prctl(PR_SET_NAME, name, 0, 0, 0);
    __atomic_store_n(&v.control->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
    outcome = raw_loop(&v, &value);
    Py_END_ALLOW_THREADS
    return Py_BuildValue("(iKKK)", (int)outcome, (unsigned long long)value,
                         (unsigned long long)v.io_exits, (unsigned long long)v.mmio_exits);
}

static int add_int(PyObject *dict, const char *key, long long value)
{
    PyObject *number = PyLong_FromLongLong(value);
    int failed = !number || PyDict_SetItemString(dict, key, number);
    Py_XDECREF(number);
    return failed;
}

/* The control block's layout, so the Python mirror is checked against it. */
static PyObject *rawloop_layout(PyObject *self, PyObject *noargs)
{
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    if (add_int(d, "raw_control.sizeof", sizeof(struct raw_control)) ||
        add_int(d, "raw_control.stop", offsetof(struct raw_control, stop)) ||
        add_int(d, "raw_control.tid", offsetof(struct raw_control, tid)) ||
        add_int(d, "raw_control.exits", offsetof(struct raw_control, exits)) ||
        add_int(d, "CONTROL_STRIDE", CONTROL_STRIDE)) {
        Py_DECREF(d);
        return NULL;
    }
    return d;
}

static PyMethodDef rawloop_methods[] = {
    {"run", rawloop_run, METH_VARARGS,
     "run(vcpu_fd, run_address, control_address, (mmio_testdev_addr, mmio_testdev_size, "
     "pio_testdev_port, pio_testdev_count, null_port, sleep_port, debug_exit_port, "
     "paravirt_port_count, uart_lsr_port, uart_lsr_empty, testdev_pattern), thread_name) "
     "-> (outcome, value, io_exits, mmio_exits)\n\n"
     "Run one vCPU on KVM alone until it exits or is stopped, without the GIL."},
    {"layout", rawloop_layout, METH_NOARGS, "Offsets and constants of the control block."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef rawloop_module = {
    PyModuleDef_HEAD_INIT, "_rawloop", "The raw reference vCPU loop of mpvmm bench.", -1,
    rawloop_methods,
};

PyMODINIT_FUNC PyInit__rawloop(void)
{
    return PyModule_Create(&rawloop_module);
}
