#!/usr/bin/env bash
# Vendors the dashboard's scripts into fleet/server/web/static/vendor/ (committed), so
# the server needs no CDN and no node at runtime. Each package is fetched with
# `npm pack` from the npm registry at an exact version; every kept file's sha256 is
# checked against SHA256SUMS beside them, and the packages' licenses are kept.
#   scripts/vendor-web-assets.sh           fetch, check, copy
#   scripts/vendor-web-assets.sh --check   only check the committed files' sums
#   scripts/vendor-web-assets.sh --record  fetch and write new sums (after a version bump;
#                                          review and commit SHA256SUMS with the files)
set -euo pipefail

HTMX=2.0.11
HTMX_SSE=2.2.4
UPLOT=1.6.32

root="$(cd "$(dirname "$0")/.." && pwd)"
vendor="$root/fleet/server/web/static/vendor"

if [ "${1:-}" = "--check" ]; then
    cd "$vendor" && exec sha256sum --check --quiet SHA256SUMS
fi

command -v npm >/dev/null || { echo "error: npm is needed to fetch the packages" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

fetch() {  # fetch <package@version> -> unpacked in $work/<name>/package
    local spec="$1" dir="$work/${1%@*}"
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "$spec" >/dev/null && tar -xzf ./*.tgz)
    echo "$dir/package"
}

htmx="$(fetch "htmx.org@$HTMX")"
sse="$(fetch "htmx-ext-sse@$HTMX_SSE")"
uplot="$(fetch "uplot@$UPLOT")"

staged="$work/vendor"
mkdir -p "$staged"
cp "$htmx/dist/htmx.min.js" "$staged/htmx.min.js"
cp "$htmx/LICENSE" "$staged/htmx.LICENSE"
cp "$sse/dist/sse.min.js" "$staged/htmx-ext-sse.min.js"
cp "$sse/LICENSE" "$staged/htmx-ext-sse.LICENSE"
cp "$uplot/dist/uPlot.iife.min.js" "$staged/uPlot.iife.min.js"
cp "$uplot/dist/uPlot.min.css" "$staged/uPlot.min.css"
cp "$uplot/LICENSE" "$staged/uPlot.LICENSE"

if [ "${1:-}" = "--record" ]; then
    (cd "$staged" && sha256sum -- * > SHA256SUMS)
else
    cp "$vendor/SHA256SUMS" "$staged/SHA256SUMS"
    (cd "$staged" && sha256sum --check --quiet SHA256SUMS)
fi
cp "$staged"/* "$vendor/"
echo "vendored htmx $HTMX, htmx-ext-sse $HTMX_SSE, uPlot $UPLOT into $vendor"
