import sys

from mpvmm.cli import main

sys.exit(main())
