#!/usr/bin/env bash
# phaul demo: two phauld daemons on this machine stand for two hosts, A
# (127.0.0.1) and B (127.0.0.2). A process tree holding 64 MiB of
# pseudo-random memory and a ticking counter starts on A; phaulctl moves it
# to B, where it keeps running with its memory intact. Everything the demo
# starts is stopped at the end, and its files are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "the demo needs root (CRIU dumps and restores processes)" >&2; exit 1; }
[ -x bin/phauld ] && [ -x bin/phaulctl ] || { echo "run 'make build' first (or 'make demo')" >&2; exit 1; }

work=$(mktemp -d /tmp/phaul-demo.XXXXXX)
pids=()
cleanup() {
	set +e
	for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
	for d in A B; do
		[ -f "$work/$d.pid" ] && kill -TERM "$(cat "$work/$d.pid")" 2>/dev/null
	done
	sleep 1
	rm -rf "$work"
}
trap cleanup EXIT

bold=$(tput bold 2>/dev/null || true)
plain=$(tput sgr0 2>/dev/null || true)
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
run() { printf '%s$ %s%s\n' "$bold" "$*" "$plain" >&2; "$@"; }
# field NAME FILE: a field of a flat JSON object (the workload's report).
field() { sed -n "s/.*\"$1\": *\"\{0,1\}\([^,\"}]*\).*/\1/p" "$2"; }

go build -o "$work/workload" ./test/workload

step "Make a CA and a certificate for each host: the daemons authenticate each other (mutual TLS)"
run bin/phaulctl pki init --dir "$work/A-tls" --name 127.0.0.1
run bin/phaulctl pki issue --dir "$work/A-tls" --name 127.0.0.2 --out "$work/B-tls"

step "Start phauld on host A (127.0.0.1:23451) and host B (127.0.0.2:23452)"
for d in A:127.0.0.1:23451 B:127.0.0.2:23452; do
	name=${d%%:*} addr=${d#*:}
	bin/phauld --listen "$addr" --control "$work/$name.sock" --state-dir "$work/$name" \
		--tls-dir "$work/$name-tls" >"$work/$name.log" 2>&1 &
	echo $! >"$work/$name.pid"
done
for name in A B; do
	for _ in $(seq 100); do bin/phaulctl --socket "$work/$name.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
done
run bin/phaulctl --socket "$work/A.sock" status

step "Start a workload on A: a process tree in its own pid namespace, 64 MiB of memory each"
setsid unshare -p -f -- setsid "$work/workload" --mem 64 --children 1 --status "$work/status.json" \
	</dev/null >/dev/null 2>&1 &
holder=$!
for _ in $(seq 100); do
	pid=$(cat /proc/$holder/task/$holder/children 2>/dev/null | awk '{print $1}')
	[ -n "$pid" ] && [ -s "$work/status.json" ] && break
	sleep 0.1
done
pids+=("$pid")
report() { # report PID: ask the workload for its state and print it
	local f=$work/status.json seq
	seq=$(field seq "$f")
	kill -USR1 "$1"
	for _ in $(seq 50); do [ "$(field seq "$f")" != "$seq" ] && break; sleep 0.1; done
	printf '  host pid %s, counter %s, memory checksum %s (at start %s), token %s\n' \
		"$(field host_pid "$f")" "$(field counter "$f")" "$(field sum "$f")" "$(field expect "$f")" "$(field token "$f")"
}
run ps -o pid,ppid,stat,rss,cmd --forest -g "$(ps -o sid= -p "$pid" | tr -d ' ')"
echo "The workload reports:"
report "$pid"

step "Migrate it from A to B (--mode auto: post-copy where both kernels allow it)"
run bin/phaulctl --socket "$work/A.sock" migrate --pid "$pid" --to 127.0.0.2:23452 | tee "$work/result.txt"
newpid=$(sed -n 's/.* as pid \([0-9]*\)$/\1/p' "$work/result.txt")
pids+=("$newpid")

step "On B it runs as pid $newpid; its counter went on and its memory is intact"
run ps -o pid,ppid,stat,rss,cmd --forest -p "$newpid" --ppid "$newpid"
report "$newpid"
sleep 1
report "$newpid"

step "Nothing of it is left on A"
if kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ]; then
	echo "  pid $pid still exists on A!" >&2
	exit 1
fi
echo "  pid $pid is gone"

step "A's history of migrations (kept across restarts)"
run bin/phaulctl --socket "$work/A.sock" history

step "What the daemons logged"
grep -h -E 'outgoing|incoming|phase done|committed|succeeded' "$work/A.log" "$work/B.log" | cut -c1-220

step "Done: stopping the workload and both daemons"
