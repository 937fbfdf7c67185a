"""Saving a VM and bringing it back: its KVM state, its devices, guest RAM, the snapshot directory.

``kvm_state`` reads and writes each vCPU's and the VM's state through the
ioctls; ``machine_state`` gathers that with the devices' records and the
guest's description into one ``MachineState``; ``records`` frames it as
checksummed records (shared with the migration stream); ``ram`` writes and
reads guest RAM as a sparse file; ``directory`` is the on-disk snapshot
(docs/snapshot.md); ``restore`` is the guest source ``--restore`` builds.
"""
