#!/usr/bin/env bash
# Install the Debian packages the test suite needs (real servers on loopback).
# Idempotent: packages already installed are left alone, and `apt-get update`
# runs only when something has to be installed. Needs root (or sudo) then.
#
# Add a package: append it to PACKAGES (one per line, with why).
set -euo pipefail

PACKAGES=(
    prometheus  # tests/integration/test_metrics.py scrapes the trainer's exporters with a real server
    slurm-wlm   # tests/integration/test_slurm.py submits a real job to a single-node Slurm (tests/integration/slurm_cluster.py)
    munge       # Slurm's authentication daemon (munged, mungekey)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    # dpkg-query says "install ok installed" only for a fully installed package.
    if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_system_deps: all present (${PACKAGES[*]})"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_system_deps: ERROR: missing ${missing[*]} and apt-get is not available;" \
         "install them with your system's package manager" >&2
    exit 1
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "install_system_deps: ERROR: missing ${missing[*]}; run this script as root (no sudo here)" >&2
        exit 1
    fi
fi

echo "install_system_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! "${SUDO[@]}" apt-get update -q; then
    echo "install_system_deps: ERROR: 'apt-get update' failed (network or apt sources?)" >&2
    exit 1
fi
if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    echo "install_system_deps: ERROR: 'apt-get install ${missing[*]}' failed" >&2
    exit 1
fi
echo "install_system_deps: installed ${missing[*]}"
