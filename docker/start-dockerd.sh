#!/usr/bin/env bash
# start-dockerd.sh — a Docker daemon for tests on a machine that has none running
# (CI, a development VM): Debian's docker.io, the vfs storage driver (works on any
# file system, nested too) and no default bridge (containers use --network host or
# --network none; no address range is taken). Idempotent; needs root.
#
#   docker/start-dockerd.sh [LOGFILE]      default LOGFILE: /tmp/hvdft-dockerd.log
set -euo pipefail
LOG=${1:-/tmp/hvdft-dockerd.log}
die() { echo "start-dockerd.sh: $*" >&2; exit 1; }

if docker info >/dev/null 2>&1; then echo "start-dockerd.sh: a Docker daemon is running"; exit 0; fi
[ "$(id -u)" = 0 ] || die "needs root"
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "no dockerd, and no apt-get to install ${missing[*]}"
  echo "start-dockerd.sh: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# setsid: the daemon outlives this script and the shell that ran it.
setsid dockerd --storage-driver=vfs --bridge=none --iptables=false >"$LOG" 2>&1 < /dev/null &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then echo "start-dockerd.sh: dockerd is up (log: $LOG)"; exit 0; fi
  sleep 1
done
tail -20 "$LOG" >&2
die "dockerd did not answer within 60 s (log: $LOG)"
