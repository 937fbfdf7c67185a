"""Live migration: moving a running VM to another VMM, over TCP or, on one host, by passing its RAM.

``address`` parses ``tcp:HOST:PORT`` and ``unix:PATH``; ``stream`` is the
record stream both ends speak (docs/migration.md); ``dirty_log`` turns
KVM's dirty bitmaps into runs of pages; ``source`` migrates a running VM
away (``mpvmm ctl migrate``); ``destination`` is the guest source
``mpvmm start --incoming`` builds from what arrives.
"""
