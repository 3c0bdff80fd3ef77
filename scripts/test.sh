#!/usr/bin/env bash
# The whole test suite: install (idempotent), lint, type-check, then every test on real libvirtd + QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
# libvirtd hosts in private mount namespaces need root
[ "$(id -u)" -eq 0 ] || exec sudo "$0" "$@"
scripts/install.sh
.venv/bin/ruff check events moldd moldlab tests bench
.venv/bin/mypy --strict events moldd moldlab
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
