#!/bin/bash
# make test: host packages, Go toolchain, go vet, then every test of the
# module (unit tests, and with DMCONVERT_VM=1 the real-kernel tests that
# each package's TestVM runs inside the QEMU guest), then the guest totals.
# It fails if any test fails or if no guest test ran inside the VM. Last,
# with the host otherwise idle, the rekey benchmark (BenchmarkGuestRekey:
# dm-crypt, online cryptsetup reencrypt and dmconvert rekey on identical
# disks in one 2-CPU VM; two rounds, make bench three, DMCONVERT_BENCH_ROUNDS=n
# to change): it fails only if a run fails or loses data; its ratios are
# reported.
#   scripts/test.sh         the whole suite (make test)
#   scripts/test.sh bench   guest benchmarks too (make bench): each TestVM with
#                           -test.bench, and TestVMBench (convert: docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/host-deps.sh
gobin=$(scripts/go.sh)
export PATH="$gobin:$PATH" GOTOOLCHAIN=local

echo "== $(go version)"
echo "== go vet ./..."
go vet ./...

tool=$(mktemp -d)
reports=$(mktemp -d)
trap 'rm -rf "$tool" "$reports"' EXIT
go build -o "$tool/testvm" ./testvm/cmd/testvm
echo "== guest image"
"$tool/testvm" prepare

export DMCONVERT_VM=1 DMCONVERT_VM_REPORT_DIR=$reports
# -parallel 32 admits every VM test of a package at once; the package's
# VM queue (testvm.Queue) then runs them longest first, one more at a
# time than the host has CPUs (DMCONVERT_VM_SLOTS): a guest keeps about
# 0.6-0.7 of a core busy (its tests wait on the disk, on timers, on
# their writers), and with four at a time on two cores they cost 14%
# more QEMU CPU.
args=(-parallel 32 -count=1 -timeout 80m)
if [ "${1:-}" = bench ]; then
	export DMCONVERT_VM_BENCH=${DMCONVERT_VM_BENCH:-.}
	args+=(-p 2 -run '^TestVM(Bench)?$' -v)
fi
rc=0
if [ "${1:-}" = bench ]; then
	echo "== go test ${args[*]} ./...  (DMCONVERT_VM=1: guest tests run inside QEMU)"
	go test "${args[@]}" ./... || rc=$?
else
	# Two lanes at once. convert's VMs are the long pole (31 min of
	# wall time, three at a time, in the run of 2026-11-24): they start
	# now, not after convert's unit tests (3 min alone, 7 min beside
	# the other packages' VMs in that run). Three guests kept 1.3 of
	# the 2 cores busy there (they wait on timers, writers and disks);
	# the other lane fills the rest: every other package (one at a
	# time, each with its own VM), then convert's unit tests. The VM
	# lane's output is printed after the other's.
	vmlog="$tool/convert-vms.log"
	echo "== go test ${args[*]} -run '^TestVM' ./convert  (its VMs, in the background; DMCONVERT_VM=1: guest tests run inside QEMU)"
	go test "${args[@]}" -run '^TestVM' ./convert >"$vmlog" 2>&1 &
	vmpid=$!
	others=$(go list ./... | grep -vx 'github.com/dmconvert/dmconvert/convert')
	echo "== go test -p 1 ${args[*]} (every other package), then convert's unit tests (-skip '^TestVM')"
	# shellcheck disable=SC2086
	go test -p 1 "${args[@]}" $others || rc=$?
	go test "${args[@]}" -skip '^TestVM' ./convert || rc=$?
	vrc=0
	wait "$vmpid" || vrc=$?
	echo "== convert's VMs (exit $vrc)"
	cat "$vmlog"
	[ $vrc -eq 0 ] || rc=1
fi
echo "== guest tests"
"$tool/testvm" report -module . "$reports" || rc=1
if [ "${1:-}" != bench ]; then
	echo "== rekey benchmark (BenchmarkGuestRekey in its own 2-CPU VM, the other VMs done; make bench adds the sweeps and larger disks)"
	log="$tool/bench.log"
	brc=0
	DMCONVERT_VM_REPORT_DIR= DMCONVERT_VM_BENCH='^BenchmarkGuestRekey$' DMCONVERT_BENCH_ROUNDS=${DMCONVERT_BENCH_ROUNDS:-2} \
		DMCONVERT_BENCH_SIZES=off DMCONVERT_BENCH_SWEEP=off \
		go test -count=1 -timeout 40m -run '^TestVMBench$' -v ./convert >"$log" 2>&1 || brc=$?
	# The summary the benchmark logs, and the Go test verdict.
	sed -n '/rekey summary of this VM run/,/peak RSS/p' "$log" | sed 's/^[[:space:]]*//'
	grep -E '^(--- |ok |FAIL|PASS)' "$log" || true
	if [ $brc -ne 0 ] || ! grep -q 'rekey summary of this VM run' "$log"; then
		echo "rekey benchmark FAILED (exit $brc); its log:"
		tail -n 80 "$log"
		rc=1
	fi
fi
exit $rc
