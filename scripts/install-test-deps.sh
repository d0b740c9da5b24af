#!/usr/bin/env bash
# Install the system packages the deployment tests need, only those that are missing:
# nginx, postgresql, redis-server, systemd (for systemd-analyze), openssl, curl, and chromium (the web
# front end's end-to-end tests drive Debian's Chromium: Playwright's own browser download is not used).
#
# Idempotent and quiet: a no-op when everything is present. Runs as root on Debian/Ubuntu.
# Package maintainer scripts are stopped from starting services (policy-rc.d exiting 101),
# so installing nginx or PostgreSQL on a test machine leaves nothing listening.
set -euo pipefail

PACKAGES=(nginx postgresql redis-server systemd openssl curl chromium)

is_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: missing packages: ${missing[*]}; run this script as root" >&2
    exit 1
fi

echo "install-test-deps: installing ${missing[*]}" >&2

policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary: do not start services while installing test dependencies\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    created_policy=1
fi
log=""
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        rm -f "$policy"
    fi
    if [ -n "$log" ]; then
        rm -f "$log"
    fi
}
trap cleanup EXIT

log="$(mktemp -t install-test-deps.XXXXXX.log)"
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)

update_lists() {
    if ! apt-get -q update >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "install-test-deps: apt-get update failed" >&2
        exit 1
    fi
}

# Refresh the package lists when they are missing, or when a first attempt cannot find a package.
if ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
    update_lists
fi
if ! apt-get "${apt_opts[@]}" install "${missing[@]}" >"$log" 2>&1; then
    update_lists
    if ! apt-get "${apt_opts[@]}" install "${missing[@]}" >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "install-test-deps: apt-get install ${missing[*]} failed" >&2
        exit 1
    fi
fi

for pkg in "${missing[@]}"; do
    if ! is_installed "$pkg"; then
        echo "install-test-deps: $pkg is still not installed" >&2
        exit 1
    fi
done
echo "install-test-deps: done" >&2
