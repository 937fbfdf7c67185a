"""``python -m mpvmm.virtio_device <control_fd>``: one virtio device's process."""

import sys

from mpvmm.virtio_device.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
