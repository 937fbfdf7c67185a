#!/usr/bin/env bash
# Installs what the tests need (scripts/install.sh) and runs them on real KVM.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for slow tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -c /dev/kvm ]; then
    echo "test.sh: /dev/kvm is missing: the tests run real VMs and cannot run here" >&2
    exit 1
fi
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
