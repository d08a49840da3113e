#!/usr/bin/env bash
# Makes a plain Debian bookworm image locally, for machines that reach no image registry
# (CI, air-gapped builders): debootstrap from the Debian mirror, then `docker import`.
#   docker/local-debian-base.sh [TAG]        (default debian-local:bookworm)
set -euo pipefail
tag="${1:-debian-local:bookworm}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag already present"
  exit 0
fi
# The first configured mirror (comment lines may name unreachable snapshot mirrors: skip them).
mirror="$(grep -hvE '^[[:space:]]*#' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null \
  | grep -oE 'https?://[^ ]+/debian/?' | head -n1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "$tag imported from $mirror"
