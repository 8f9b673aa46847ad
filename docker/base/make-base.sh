#!/usr/bin/env bash
# A local stand-in for the Dockerfile's base image (python:3.11-slim-bookworm), for machines that cannot pull
# from a container registry but reach Debian's package mirror: Debian bookworm (minbase) with its own
# Python 3.11, python3-venv and ca-certificates, imported into podman under the FROM name.
#
#   sudo bash docker/base/make-base.sh [IMAGE]     # IMAGE defaults to docker.io/library/python:3.11-slim-bookworm
#   CONTAINER_ENGINE=docker ...                    # import into docker instead of podman
#
# The official image has its Python in /usr/local/bin; Debian's is in /usr/bin, so /usr/local/bin gets
# python3.11, python3 and python links: the Dockerfile's `python -m venv` and everything after it work the
# same on either base. Differences that remain: Python 3.11.2 (Debian's) instead of the latest 3.11.x, and
# no security suite in the debootstrap sources unless the mirror has one (it is added below).
# The root filesystem is built under ROOTFS (default /tmp/fruitserve-base-rootfs) and removed afterwards.
set -euo pipefail

IMAGE=${1:-docker.io/library/python:3.11-slim-bookworm}
ROOTFS=${ROOTFS:-/tmp/fruitserve-base-rootfs}
ENGINE=${CONTAINER_ENGINE:-podman}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

[ "$(id -u)" = 0 ] || { echo "debootstrap needs root" >&2; exit 2; }
for tool in debootstrap "$ENGINE"; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install $tool" >&2; exit 2; }
done

rm -rf "$ROOTFS"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-venv,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR"

cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
for name in python3.11 python3 python; do
    ln -sf /usr/bin/python3.11 "$ROOTFS/usr/local/bin/$name"
done
# what a slim image leaves out: package lists, downloaded .debs, docs and man pages
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*

tar --numeric-owner -C "$ROOTFS" -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE"
"$ENGINE" image inspect --format '{{.Id}} {{.Size}}' "$IMAGE"
