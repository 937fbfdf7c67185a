"""The nested-KVM harness: test infrastructure, not product code.

These machines' /dev/kvm emulates guest ring 0, so a Linux guest cannot boot
on it. The harness boots an L1 Linux under QEMU TCG with emulated AMD SVM
(l1.py, l1_image.py), whose kvm-amd gives a real /dev/kvm, runs commands
there in a chroot of the host's root, and boots kernels with mpvmm inside it
(l2.py on the host, l2_run.py in L1; l2_fault.py ends such a run by a fault,
for the nested soak). Every layer is bounded and named when
it fails; QEMU never outlives the test process (process.py). docs/linux.md
describes it and what it measured.
"""
