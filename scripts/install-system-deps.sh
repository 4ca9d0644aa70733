#!/usr/bin/env bash
# Debian packages juicecache needs: FUSE for JuiceFS mounts, Redis for the shared metadata
# engine, iproute2 for the multi-host tests, Chromium (and a font for its screenshots) for
# the test that checks the Prefect UI in a browser, s3fs (s3fs-fuse) for the benchmark's
# "mounted S3 bucket" alternative. Installs only what is missing.
set -euo pipefail
packages=(fuse3 redis-server iproute2 procps chromium fonts-dejavu-core s3fs)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${missing[*]} (apt-get)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
