# dmconvert. The two commands a newcomer needs (see README.md):
#   make demo   boot the real-kernel VM and show a live LVM disk
#   make test   everything CI runs: host packages, Go, vet, unit and guest tests
SHELL := /bin/bash

.PHONY: test demo bench unit vm prepare deps crashtest

test:
	@scripts/test.sh

demo:
	@scripts/demo.sh

# guest benchmarks (Benchmark* functions, run inside the VM) and all guest tests
bench:
	@scripts/test.sh bench

# unit tests only: no VM, no root
unit:
	@PATH="$$(scripts/go.sh):$$PATH" go test ./...

# one package's guest tests, verbose: make vm PKG=./testvm
PKG ?= ./...
vm:
	@scripts/host-deps.sh
	@PATH="$$(scripts/go.sh):$$PATH" DMCONVERT_VM=1 go test -count=1 -v -run '^TestVM' $(PKG)

# power cuts: make crashtest N=50 (DMCONVERT_CRASH_SEED=s replays a run)
N ?= 10
crashtest:
	@scripts/host-deps.sh
	@PATH="$$(scripts/go.sh):$$PATH" DMCONVERT_VM=1 DMCONVERT_POWERCUTS=$(N) go test -count=1 -v -timeout 0 -run '^TestVMPowerCut$$' ./convert

# build (or find) the cached guest image
prepare:
	@scripts/host-deps.sh
	@PATH="$$(scripts/go.sh):$$PATH" go run ./testvm/cmd/testvm prepare

# host packages and the Go toolchain only
deps:
	@scripts/host-deps.sh
	@scripts/go.sh > /dev/null
