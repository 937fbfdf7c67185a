/*
 * How a vCPU run loop ended: the one definition shared by the native run
 * loop (_runloop.c) and the bench's raw loop (mpvmm/bench/_rawloop.c), and
 * mirrored by mpvmm/vcpu_worker/outcome.py (checked by
 * tests/vcpu_worker/test_layout.py). Each comes with a 64-bit value.
 */
#ifndef MPVMM_OUTCOME_H
#define MPVMM_OUTCOME_H

enum outcome {
    OUTCOME_NONE = 0,      /* still running, or never ran */
    OUTCOME_STOPPED = 1,   /* the supervisor asked */
    OUTCOME_EXITED = 2,    /* the guest wrote the debug-exit port; value = status */
    OUTCOME_FAULT = 3,     /* an exit reason the loop cannot continue from; value = reason */
    OUTCOME_ERROR = 4,     /* a syscall failed; value = errno */
};

#endif
