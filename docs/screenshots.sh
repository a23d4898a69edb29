#!/usr/bin/env bash
# Headless screenshots of the built documentation (run `make docs` first):
# the landing page, one guide page, one gallery page and the API page of NMF,
# written as PNG files into docs/screenshots/ (not committed).
#
# Needs Debian's chromium (or chromium-headless-shell):
#   apt-get install chromium-headless-shell
set -euo pipefail
cd "$(dirname "$0")"
html="${HTML:-$PWD/_build/html}"
out="$PWD/screenshots"
width="${WIDTH:-1400}"
height="${HEIGHT:-1100}"

browser=""
for candidate in chromium-headless-shell chromium chromium-browser; do
    if command -v "$candidate" >/dev/null; then browser="$candidate"; break; fi
done
if [ -z "$browser" ]; then
    echo "no chromium found: apt-get install chromium-headless-shell" >&2
    exit 1
fi
if [ ! -f "$html/index.html" ]; then
    echo "no built site in $html: run make docs first" >&2
    exit 1
fi

mkdir -p "$out"
shoot() {  # name page [height]
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --window-size="$width,${3:-$height}" --virtual-time-budget=5000 \
        --screenshot="$out/$1.png" "file://$html/$2" >/dev/null 2>&1
    echo "$out/$1.png"
}
shoot landing index.html
shoot guide guide/10-models.html
shoot gallery gallery/plot_nmfd_drums.html 2200
shoot gallery-index gallery/index.html
shoot api-nmf api/generated/torchnmf.nmf.NMF.html 2200
