#!/usr/bin/env bash
# Renders a run's report page and each of its plots to PNG with headless Chromium, to look at
# them as a person would (axes, labels, legends, nothing overlapping). Not part of CI: Debian's
# chromium is a large package. Needs a built ast-cli and `apt-get install chromium`.
#   scripts/render-report.sh RUN_DIR [OUT_DIR]    # OUT_DIR defaults to RUN_DIR/rendered
set -euo pipefail
run=${1:?usage: scripts/render-report.sh RUN_DIR [OUT_DIR]}
out=${2:-$run/rendered}
cli=${AST_CLI:-$(dirname "$0")/../target/release/ast-cli}
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "error: no chromium found: install Debian's package (apt-get install chromium)" >&2
  exit 1
fi
"$cli" report --run "$run" > /dev/null
mkdir -p "$out"
shoot() { # URL PNG WIDTH HEIGHT
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size="$3,$4" --screenshot="$2" "$1" > /dev/null 2>&1
  echo "$2"
}
page=$(cd "$run" && pwd)/report.html
shoot "file://$page" "$out/report.png" 1600 2600
for svg in "$run"/plots/*.svg; do
  name=$(basename "$svg" .svg)
  shoot "file://$(cd "$(dirname "$svg")" && pwd)/$name.svg" "$out/$name.png" 760 460
done
