#!/usr/bin/env bash
# Builds a Debian base image without any image registry: a debootstrap rootfs, imported into Docker.
# Pass the result as BASE_IMAGE (see deploy/README.md).
#
#   deploy/docker/debootstrap-base.sh [TAG]        (default ditserve-base:bookworm; needs root)
#
# CA_BUNDLE=FILE adds FILE as the image's CA bundle for pip and Python (for a TLS-intercepting proxy
# in front of PyPI); MIRROR picks the Debian mirror.
set -euo pipefail
tag="${1:-ditserve-base:bookworm}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
changes=(--change 'CMD ["bash"]')
if [ -n "${CA_BUNDLE:-}" ]; then
    install -D -m 644 "$CA_BUNDLE" "$rootfs/etc/ssl/ca-bundle.crt"
    changes+=(--change "ENV PIP_CERT=/etc/ssl/ca-bundle.crt" --change "ENV SSL_CERT_FILE=/etc/ssl/ca-bundle.crt")
fi
tar -C "$rootfs" -c . | docker import "${changes[@]}" - "$tag"
echo "built $tag"
