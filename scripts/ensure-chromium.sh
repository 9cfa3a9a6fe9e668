#!/usr/bin/env bash
# The dashboard's browser tests (tests/server/test_dashboard.py) and benchmark drive
# Debian's Chromium through Playwright: Playwright never downloads a browser here
# (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1). The executable is /usr/bin/chromium, or the
# one named by EDGE_TEST_CHROMIUM.
set -euo pipefail
chromium=${EDGE_TEST_CHROMIUM:-/usr/bin/chromium}
if [ -x "$chromium" ]; then
    exit 0
fi
if [ -n "${EDGE_TEST_CHROMIUM:-}" ]; then
    echo "error: EDGE_TEST_CHROMIUM=$EDGE_TEST_CHROMIUM is not an executable file" >&2
    exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found: installing Debian's chromium package"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
    exit 0
fi
echo "error: the dashboard's browser tests need Chromium at /usr/bin/chromium; install it (Debian: sudo apt-get install chromium; Ubuntu's is a snap, so set EDGE_TEST_CHROMIUM to a Chromium or Chrome executable) and run make again" >&2
exit 1
