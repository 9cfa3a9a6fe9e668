#!/usr/bin/env bash
# tests/test_asyncapi.py validates docs/asyncapi.yaml with the AsyncAPI parser, a Node
# package: installed with `npm ci` from tools/asyncapi/package-lock.json, so every clone
# checks with the same versions; again only when the lockfile changes.
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/tools/asyncapi"
stamp="$dir/node_modules/.installed"
if [ -f "$stamp" ] && [ "$stamp" -nt "$dir/package-lock.json" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "npm not found: installing Debian's nodejs and npm packages"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm
    else
        echo "error: the AsyncAPI check needs Node.js 18.18 or newer with npm; install them (Debian/Ubuntu: sudo apt-get install nodejs npm) and run make again" >&2
        exit 1
    fi
fi
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 18 || (a === 18 && b >= 18) ? 0 : 1)'; then
    echo "error: the AsyncAPI parser needs Node.js 18.18 or newer; this is $(node --version)" >&2
    exit 1
fi
# No install scripts: the parser needs none, and one dependency's would phone home.
(cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
touch "$stamp"
