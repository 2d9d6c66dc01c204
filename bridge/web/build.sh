#!/usr/bin/env bash
# Rebuilds bridge/web/site/vendor/ from npm, exactly as package-lock.json pins it.
#
# The field view needs one third-party file in the browser: the MQTT client's
# ready-made browser build (mqtt/dist/mqtt.min.js). It is committed and shipped
# in the wheel, so installing dispatch-bridge needs no Node. Run this after
# changing the pin in package.json (`npm install mqtt@X --save-exact` first),
# then commit site/vendor/ and package-lock.json together; tests/test_web_assets.py
# checks that the committed file is the one the lock names.
#
# Usage: bridge/web/build.sh [OUTPUT_DIR]   (default: bridge/web/site/vendor)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "${1:-$here/site/vendor}" && cd "${1:-$here/site/vendor}" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$here/package-lock.json" "$work/"
# npm ci installs exactly the lock and checks every tarball against its integrity hash.
(cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
cp "$work/node_modules/mqtt/dist/mqtt.min.js" "$out/mqtt.min.js"
cp "$work/node_modules/mqtt/LICENSE.md" "$out/mqtt.LICENSE.md"
python3 - "$work" "$out" <<'PY'
import hashlib, json, pathlib, sys
work, out = map(pathlib.Path, sys.argv[1:])
lock = json.loads((work / "package-lock.json").read_text())["packages"]["node_modules/mqtt"]
installed = json.loads((work / "node_modules/mqtt/package.json").read_text())
assert installed["version"] == lock["version"], "node_modules does not match the lock"
manifest = {
    "mqtt.min.js": {
        "package": "mqtt",
        "version": lock["version"],
        "integrity": lock["integrity"],
        "file": "dist/mqtt.min.js",
        "sha256": hashlib.sha256((out / "mqtt.min.js").read_bytes()).hexdigest(),
        "license": installed.get("license"),
    }
}
(out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
PY
echo "vendor files written to $out"
