#!/usr/bin/env bash
# The tests start their own Mosquitto processes, so they need the binary (not a service).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "mosquitto not found: installing Debian's mosquitto package"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mosquitto
    exit 0
fi
echo "error: the tests need the 'mosquitto' broker binary; install it (Debian/Ubuntu: sudo apt-get install mosquitto) and run make again" >&2
exit 1
