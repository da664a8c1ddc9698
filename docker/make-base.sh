#!/usr/bin/env bash
# make-base.sh — a Debian bookworm base image made locally, for machines that reach a
# Debian mirror but no container registry (docker/README.md, "No registry").
#
#   docker/make-base.sh [IMAGE]        default IMAGE: hvdft-base:bookworm
#
# debootstrap (Debian package `debootstrap`, run as root) builds a minimal root file
# system from DEBIAN_MIRROR (default: the first deb.debian.org-style URI in this
# machine's apt sources, else http://deb.debian.org/debian); `docker import` turns it
# into an image. Where a registry is reachable, `debian:bookworm-slim` does the same job.
set -euo pipefail

IMAGE=${1:-hvdft-base:bookworm}
SUITE=${DEBIAN_SUITE:-bookworm}
die() { echo "make-base.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
command -v docker >/dev/null || die "docker is missing"
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "make-base.sh: $IMAGE exists (docker rmi $IMAGE to remake it)"
  exit 0
fi
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$(grep -rhoE '^(URIs:|deb) *https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                  | head -1 | grep -oE 'https?://[^ ]*' || true)
  DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi

ROOTFS=$(mktemp -d "${TMPDIR:-/tmp}/hvdft-rootfs.XXXXXX")
trap 'rm -rf "$ROOTFS"' EXIT
echo "make-base.sh: debootstrap $SUITE from $DEBIAN_MIRROR (a few minutes)"
# minbase: dpkg, apt and essentials only; the Dockerfiles install what they need.
debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$DEBIAN_MIRROR" > "$ROOTFS.log" 2>&1 \
  || { tail -20 "$ROOTFS.log" >&2; die "debootstrap failed (log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"
# debootstrap lists the release alone; images need its updates and security fixes too.
if [ "$SUITE" = bookworm ] || [ "$SUITE" = trixie ]; then
  SECURITY=${DEBIAN_SECURITY_MIRROR:-$(dirname "$DEBIAN_MIRROR")/debian-security}
  cat > "$ROOTFS/etc/apt/sources.list" <<SOURCES
deb $DEBIAN_MIRROR $SUITE main
deb $DEBIAN_MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
SOURCES
fi
# What the official Debian images do: no apt caches or downloaded .debs in the image.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
echo "make-base.sh: made $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
