/*
 * Entry of the built-in guest. The supervisor enters every vCPU here in
 * 64-bit mode at CPL 3 with RDI = vCPU index, RSI = parameter block and RSP
 * = the top of this vCPU's stack (16-byte aligned), so the call below leaves
 * the stack aligned as the C ABI wants. guest_main never returns: it ends
 * the vCPU through the debug-exit port. If that write were ever ignored, the
 * vCPU spins here rather than running off into memory.
 */
    .section .text.entry, "ax"
    .globl _start
_start:
    call guest_main
1:  pause
    jmp 1b

    .section .note.GNU-stack, "", @progbits
