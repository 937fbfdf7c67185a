"""``python -m mpvmm.devicemodel <control_fd>``: the device-model process."""

import sys

from mpvmm.devicemodel.process import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
