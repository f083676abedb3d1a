#!/bin/bash
# make demo: boot the real-kernel VM with a sample live LVM disk (a VG, two
# LVs, mounted file systems, a process writing) and convert it to
# LVM-over-LUKS2 in place with dmconvert, then check the result.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/host-deps.sh
gobin=$(scripts/go.sh)
export PATH="$gobin:$PATH" GOTOOLCHAIN=local
share=$(mktemp -d)
trap 'rm -rf "$share"' EXIT
CGO_ENABLED=0 go build -o "$share/dmconvert" ./cmd/dmconvert
go run ./testvm/cmd/testvm demo -share "$share" "$@"
