#!/usr/bin/env bash
# Installs mpvmm into ./.venv on a fresh Debian machine: the Debian packages it
# builds with (gcc, Python headers, venv) where they are missing, then the
# package itself, which compiles the run-loop extension and the built-in guest.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v gcc >/dev/null || need_apt+=(gcc libc6-dev)
command -v python3 >/dev/null || need_apt+=(python3)
if command -v python3 >/dev/null; then
    python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
    include=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [ -f "$include/Python.h" ] || need_apt+=(python3-dev)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "install.sh: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The metrics tests run a real Prometheus (and its promtool) from Debian's
# package. They start their own server on a free port and never use the
# package's systemd service; the node exporter it recommends is not needed.
if ! command -v prometheus >/dev/null; then
    echo "install.sh: installing Debian package: prometheus (for the metrics tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The device model's seccomp allow-list is checked against what a real
# device model calls, recorded with strace (tests/devicemodel/test_syscalls.py).
if ! command -v strace >/dev/null; then
    echo "install.sh: installing Debian package: strace (for the sandbox tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends strace >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

if [ ! -c /dev/kvm ]; then
    echo "install.sh: warning: /dev/kvm is missing; mpvmm needs KVM to run a VM" >&2
fi
