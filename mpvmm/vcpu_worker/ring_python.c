/*
 * The shared-memory rings (ring.h) for Python: the device model and the
 * Python run loop (mpvmm/transport/ring.py) call these functions, so ring.h
 * stays the rings' one implementation. They are part of the run loop's
 * extension (_runloop.c adds them to its module). Every address is a ring,
 * or the ring area's header, mapped in the calling process.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "ring.h"

static PyObject *runloop_fence(PyObject *self, PyObject *noargs)
{
    ring_fence();
    Py_RETURN_NONE;
}

static PyObject *runloop_ring_push(PyObject *self, PyObject *args)
{
    unsigned long long address;
    Py_buffer record;
    if (!PyArg_ParseTuple(args, "Ky*", &address, &record))
        return NULL;
    if (record.len > RING_MESSAGE_SIZE) {
        PyBuffer_Release(&record);
        return PyErr_Format(PyExc_ValueError, "a %zd-byte record does not fit a %d-byte slot", record.len,
                            RING_MESSAGE_SIZE);
    }
    int full = ring_push((struct msg_ring *)(uintptr_t)address, record.buf, (uint32_t)record.len);
    PyBuffer_Release(&record);
    return PyBool_FromLong(!full);
}

/* A slot with an impossible length comes out one byte too long, which the
 * decoder rejects as too_large: counted and dropped like any bad record. */
static PyObject *runloop_ring_pop(PyObject *self, PyObject *args)
{
    unsigned long long address;
    uint8_t record[RING_MESSAGE_SIZE + 1] = {0};
    if (!PyArg_ParseTuple(args, "K", &address))
        return NULL;
    long n = ring_pop((struct msg_ring *)(uintptr_t)address, record);
    if (n < 0)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)record, n);
}

static PyObject *runloop_ring_count(PyObject *self, PyObject *args)
{
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address))
        return NULL;
    return PyLong_FromUnsignedLong(ring_count((struct msg_ring *)(uintptr_t)address));
}

static PyObject *runloop_ring_wake(PyObject *self, PyObject *args)
{
    unsigned long long address;
    int producer;
    if (!PyArg_ParseTuple(args, "Kp", &address, &producer))
        return NULL;
    struct msg_ring *ring = (struct msg_ring *)(uintptr_t)address;
    return PyBool_FromLong(producer ? ring_wake_if_waiting(&ring->producer_waiting, &ring->tail)
                                    : ring_wake_if_waiting(&ring->consumer_waiting, &ring->head));
}

static PyObject *runloop_ring_wait(PyObject *self, PyObject *args)
{
    unsigned long long address;
    int for_space;
    long long timeout_ns;
    int slept = 0;
    if (!PyArg_ParseTuple(args, "KpL", &address, &for_space, &timeout_ns))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    if (for_space)
        ring_wait_for_space((struct msg_ring *)(uintptr_t)address, (long)timeout_ns);
    else
        slept = ring_wait_for_record((struct msg_ring *)(uintptr_t)address, (long)timeout_ns);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(slept);
}

static PyObject *runloop_ring_wake_server(PyObject *self, PyObject *args)
{
    unsigned long long header;
    int wake_fd;
    if (!PyArg_ParseTuple(args, "Ki", &header, &wake_fd))
        return NULL;
    return PyBool_FromLong(ring_wake_server((struct ring_area_header *)(uintptr_t)header, wake_fd));
}

/* The Python loop's next_stamp (_runloop.c): one atomic add on the machine-wide counter. */
static PyObject *runloop_next_stamp(PyObject *self, PyObject *args)
{
    unsigned long long order;
    if (!PyArg_ParseTuple(args, "K", &order))
        return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_add_fetch((uint64_t *)(uintptr_t)order, 1, __ATOMIC_SEQ_CST));
}

PyMethodDef ring_python_methods[] = {
    {"fence", runloop_fence, METH_NOARGS, "A full memory fence (ring.h's event suppression)."},
    {"ring_push", runloop_ring_push, METH_VARARGS, "ring_push(ring, record) -> False if the ring is full."},
    {"ring_pop", runloop_ring_pop, METH_VARARGS, "ring_pop(ring) -> the oldest record, or None."},
    {"ring_count", runloop_ring_count, METH_VARARGS, "ring_count(ring) -> records in it now."},
    {"ring_wake", runloop_ring_wake, METH_VARARGS,
     "ring_wake(ring, producer) -> True if the other side waited and was woken."},
    {"ring_wait", runloop_ring_wait, METH_VARARGS,
     "ring_wait(ring, for_space, timeout_ns) -> True if it slept waiting for a record."},
    {"next_stamp", runloop_next_stamp, METH_VARARGS,
     "next_stamp(counter) -> the machine-wide request counter's next value (an atomic add)."},
    {"ring_wake_server", runloop_ring_wake_server, METH_VARARGS,
     "ring_wake_server(header, wake_fd) -> True if the sleeping device model was woken."},
    {NULL, NULL, 0, NULL},
};
