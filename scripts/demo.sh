#!/usr/bin/env bash
# Installs everything, starts two real local libvirtd "hosts" and moldd with a demo config, in the foreground.
# In another terminal: .venv/bin/moldctl --socket var/demo/moldd.sock vm deploy --template tiny --offering small --ha
set -euo pipefail
cd "$(dirname "$0")/.."
# libvirtd hosts in private mount namespaces need root
[ "$(id -u)" -eq 0 ] || exec sudo "$0" "$@"
scripts/install.sh
exec .venv/bin/python -m moldlab.demo --root var/demo "$@"
