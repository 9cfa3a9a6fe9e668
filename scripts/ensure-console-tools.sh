#!/usr/bin/env bash
# tests/test_example_consoles.py runs docs/examples/console.sh, a console in shell:
# it needs the Mosquitto command-line clients and jq (Debian's mosquitto-clients, jq).
set -euo pipefail
missing=()
command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 ||
    missing+=(mosquitto-clients)
command -v jq >/dev/null 2>&1 || missing+=(jq)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "${missing[*]} not found: installing Debian's ${missing[*]} package(s)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    exit 0
fi
echo "error: the example shell console's test needs ${missing[*]}; install them (Debian/Ubuntu: sudo apt-get install ${missing[*]}; macOS: brew install mosquitto jq) and run make again" >&2
exit 1
