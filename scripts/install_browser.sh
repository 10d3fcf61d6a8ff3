#!/usr/bin/env bash
# Headless Chromium and its driver for the browser tests (tests/browser/) and
# scripts/screenshots.py: Debian's packages, so nothing is downloaded outside apt.
# Idempotent: does nothing when both are installed already.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
