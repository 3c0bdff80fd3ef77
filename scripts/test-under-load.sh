#!/usr/bin/env bash
# Runs libvirt tests (real libvirtd + QEMU guests) with CPU hogs beside them: the suite must not depend on a quiet
# machine. Default: the QEMU/libvirt tests whose loop-blocking and guest-boot checks used to flake under load.
#
#   scripts/test-under-load.sh                    # 2 hogs per CPU, the default selection
#   HOGS=6 scripts/test-under-load.sh tests/daemon/test_lifecycle.py -k console
#
# Does not install anything (run scripts/install.sh first); pytest's per-test timeout is raised (the hogs slow
# every guest), the tests' own limits stretch with the load (moldlab.testing.load).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || exec sudo -E "$0" "$@"
hogs=${HOGS:-$(( 2 * $(nproc) ))}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq "$hogs"); do
    sh -c 'while :; do :; done' &
    pids+=("$!")
done
sleep 5  # let the load average show the hogs
echo "# $hogs CPU hogs running; load: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
if [ "$#" -eq 0 ]; then
    set -- tests/libvirt/test_libvirt_loopwatch.py tests/libvirt/test_libvirt_qemu.py tests/api/test_api_systemd.py
fi
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider -o timeout=900 "$@" || status=$?
echo "# end: load $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$status"
