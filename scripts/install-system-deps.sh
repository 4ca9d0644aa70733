#!/usr/bin/env bash
# Debian packages juicecache needs: FUSE for JuiceFS mounts, Redis for the shared metadata
# engine, PostgreSQL for the PostgreSQL profile (metadata + the Prefect server's database),
# iproute2 for the multi-host tests, Chromium (and a font for its screenshots) for
# the test that checks the Prefect UI in a browser, s3fs (s3fs-fuse) for the benchmark's
# "mounted S3 bucket" alternative. Installs only what is missing.
#
# `postgresql` creates the package's own cluster (15/main, port 5432) and, where systemd
# runs, starts it. juicecache leaves it alone and never uses it: `main.py stack up` runs
# its own cluster (initdb into .juicecache/stack/postgres, as the user postgres) on the
# port JFS_META_URL names (5440 in .env.example), so both can run side by side; if that
# port is taken, `stack up` says so and starts nothing. Stopping or disabling a system
# service is the machine owner's call, not a project script's.
set -euo pipefail
packages=(fuse3 redis-server postgresql iproute2 procps chromium fonts-dejavu-core s3fs)
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
