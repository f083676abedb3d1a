#!/bin/bash
# Prints the bin directory of a Go toolchain >= $GO_MIN (default 1.26).
# Uses the go on PATH or in /usr/local/go if it is new enough; otherwise
# fetches golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-amd64 from the Go
# module proxy (the module GOTOOLCHAIN downloads) into the cache, with any
# older go as the client (installing Debian's golang-go first if there is
# no go at all). GO_FETCH=1 ignores the local toolchains (always use the
# fetched one). Progress goes to stderr; only the directory to stdout.
set -euo pipefail

GO_VERSION=${GO_VERSION:-1.26.8}
GO_MIN=${GO_MIN:-1.26}
cache=${DMCONVERT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}}/dmconvert/go
fetched=$cache/go$GO_VERSION

# version_of GO: prints e.g. 1.26.8 (empty if it does not run)
version_of() {
	(cd / && GOTOOLCHAIN=local "$1" version 2>/dev/null) | sed -n 's/^go version go\([0-9][0-9.]*\).*/\1/p'
}
# new_enough 1.26.8 -> true if >= GO_MIN
new_enough() {
	local IFS=.
	read -r a b _ <<< "$1"
	read -r x y _ <<< "$GO_MIN"
	[ -n "$a" ] && { [ "$a" -gt "$x" ] || { [ "$a" -eq "$x" ] && [ "${b:-0}" -ge "$y" ]; }; }
}

candidates=()
command -v go > /dev/null 2>&1 && candidates+=("$(command -v go)")
candidates+=(/usr/local/go/bin/go "$fetched/bin/go")
for g in "${candidates[@]}"; do
	[ -x "$g" ] || continue
	[ "${GO_FETCH:-}" = 1 ] && [ "$g" != "$fetched/bin/go" ] && continue
	v=$(version_of "$g")
	if [ -n "$v" ] && new_enough "$v"; then
		dirname "$g"
		exit 0
	fi
done

# A client for the module proxy: any go that runs (old is fine);
# GO_BOOT names one explicitly.
boot=${GO_BOOT:-}
[ -n "$boot" ] || for g in "${candidates[@]}" /usr/lib/go/bin/go /usr/bin/go; do
	if [ -x "$g" ] && [ -n "$(version_of "$g")" ]; then boot=$g; break; fi
done
if [ -z "$boot" ]; then
	echo "go.sh: no Go toolchain; installing Debian's golang-go to fetch go$GO_VERSION" >&2
	sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
	if ! apt-cache show golang-go > /dev/null 2>&1; then
		$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
	fi
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends golang-go ca-certificates > /dev/null
	boot=/usr/lib/go/bin/go
	[ -x "$boot" ] || boot=$(command -v go)
fi

mod=golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-amd64
echo "go.sh: fetching $mod with $boot ($(version_of "$boot"))" >&2
mkdir -p "$cache"
modcache=$cache/modcache
dir=$(cd "$cache" && GOTOOLCHAIN=local GO111MODULE=on GOFLAGS=-modcacherw GOMODCACHE=$modcache \
	"$boot" mod download -json "$mod" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
if [ -z "$dir" ] || [ ! -f "$dir/bin/go" ]; then
	echo "go.sh: go mod download $mod gave no toolchain" >&2
	exit 1
fi
rm -rf "$fetched.tmp"
cp -a "$dir" "$fetched.tmp"
# module zips carry no file modes: make the tools executable again
chmod -R u+w "$fetched.tmp"
chmod +x "$fetched.tmp"/bin/* "$fetched.tmp"/pkg/tool/*/*
rm -rf "$fetched" "$modcache"
mv "$fetched.tmp" "$fetched"
v=$(version_of "$fetched/bin/go")
if [ -z "$v" ] || ! new_enough "$v"; then
	echo "go.sh: $fetched/bin/go does not run as go >= $GO_MIN" >&2
	exit 1
fi
echo "go.sh: using go $v from $fetched" >&2
echo "$fetched/bin"
