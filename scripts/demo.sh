#!/bin/bash
# make demo: boot the real-kernel VM with a sample live LVM disk (a VG, two
# LVs, mounted file systems, a process writing) and show it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/host-deps.sh
gobin=$(scripts/go.sh)
export PATH="$gobin:$PATH" GOTOOLCHAIN=local
exec go run ./testvm/cmd/testvm demo "$@"
