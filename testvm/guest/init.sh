#!/bin/sh
# /init of the testvm guest (runs under busybox sh as PID 1).
#
# Boot: mount the API file systems, load the kernel modules listed in
# /etc/testvm/modules (dependencies first), mount the host's 9p share
# (tag "testvm") on /share, then run /share/.testvm/run.sh under bash (the
# host writes it: environment, cd /share, the script). Its exit status
# goes to /share/.testvm/exit and, as "TESTVM-EXIT=<n>", to the console;
# the kernel log goes to /share/.testvm/dmesg; then the VM powers off.
# There is no udev: libdevmapper creates /dev/mapper nodes itself.
export PATH=/usr/sbin:/usr/bin
export HOME=/root TMPDIR=/tmp LANG=C LC_ALL=C TERM=dumb
export DM_DISABLE_UDEV=1 LVM_SUPPRESS_FD_WARNINGS=1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mapper
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/lock/lvm /run/lvm /run/cryptsetup
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname testvm

KV=$(uname -r)
t0=$(cut -d' ' -f1 /proc/uptime)
# one busybox process for all of them (an exec costs ~30 ms under TCG)
modprobe -a $(cat /etc/testvm/modules) || echo "[testvm] modprobe -a failed"
# anything else the kernel asks for is loaded on demand
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
t1=$(cut -d' ' -f1 /proc/uptime)
[ -e /dev/mapper/control ] || dmsetup mknodes > /dev/null 2>&1

# A task stuck in uninterruptible sleep (the kernel's hung-task
# warning) gets its kernel stack, every blocked task's and the block
# devices' in-flight counts on the console once: the console shows only
# warnings, and a VM killed at its timeout never writes its dmesg.
# The same when one task stays in D state for 3 minutes of 20-second
# samples: a direct I/O waiting for a bio that never completes sleeps in
# blk_io_schedule()'s slices of half the hung-task timeout, which the
# kernel's detector never reports (seen: a read of a dm snapshot).
echo 60 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null
(
	stuck="" n=0 kernel=0 reports=0
	while sleep 20; do
		dnow=" "
		for s in /proc/[0-9]*/stat; do
			read -r st < "$s" 2>/dev/null || continue
			case "${st##*) }" in D*) p=${s#/proc/}; dnow="$dnow${p%/stat} " ;; esac
		done
		[ -n "$stuck" ] || stuck=$dnow
		keep=" "
		for p in $stuck; do
			case "$dnow" in *" $p "*) keep="$keep$p " ;; esac
		done
		stuck=$keep
		if [ "$stuck" = " " ]; then stuck="" n=0; else n=$((n + 1)); fi
		if [ "$kernel" = 0 ] && dmesg | grep -q 'blocked for more than'; then
			kernel=1
		elif [ "$n" -lt 9 ]; then
			continue
		fi
		echo "[testvm] HUNG TASK (in D state for minutes:$stuck): kernel log follows"
		for p in $stuck; do
			echo "[testvm] task $p: $(tr '\0' ' ' < /proc/$p/cmdline 2>/dev/null) wchan=$(cat /proc/$p/wchan 2>/dev/null)"
		done
		echo w > /proc/sysrq-trigger 2>/dev/null
		sleep 1
		dmesg | grep -v -e '^\[[ 0-9.]*\] *$' | tail -n 200
		for f in /sys/block/*/inflight; do
			read r w < "$f"
			[ "$r$w" = 00 ] || echo "[testvm] in flight on ${f%/inflight}: $r reads, $w writes"
		done
		dmsetup info -c -o name,attr,open 2>&1
		dmsetup table 2>&1 | sed 's/ crypt \([^ ]*\) [^ ]* / crypt \1 <key> /'
		echo "[testvm] HUNG TASK: end"
		# At most three reports (a task busy with I/O for minutes is
		# reported too, and must not hide a hang that comes later).
		reports=$((reports + 1)) stuck="" n=0
		[ "$reports" -lt 3 ] || break
	done
) &

rc=125
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none testvm /share; then
	if [ -f /share/.testvm/run.sh ]; then
		echo "TESTVM-READY kernel=$KV uptime=$(cut -d' ' -f1 /proc/uptime) modules=${t0}-${t1}"
		cd /share
		bash /share/.testvm/run.sh < /dev/null
		rc=$?
		cd /
	else
		echo "[testvm] /share/.testvm/run.sh is missing"
	fi
	if [ -f /share/.testvm/shell ]; then
		echo "[testvm] interactive shell on the console; exit it to power off"
		setsid cttyhack bash -l
	fi
	dmesg > /share/.testvm/dmesg 2>&1
	echo "$rc" > /share/.testvm/exit
	sync
else
	echo "[testvm] cannot mount the 9p share (tag testvm); modules:"
	cut -d" " -f1 /proc/modules | tr "\n" " "; echo
	dmesg | tail -n 50
fi
echo "TESTVM-EXIT=$rc"
umount /share 2>/dev/null
poweroff -f
