#!/bin/sh
# fetch_openai.sh: install the official `openai` npm package (the client the
# server tests drive g3n serve with) under build/npm-openai. Idempotent: does
# nothing when it is already there. Needs npm and the npm registry.
set -eu
VERSION=6.30.1
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/build/npm-openai"
if grep -q "\"version\": \"$VERSION\"" "$dest/node_modules/openai/package.json" 2>/dev/null; then
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "fetch_openai.sh: npm not found (install nodejs and npm)" >&2; exit 1; }
mkdir -p "$dest"
(cd "$dest" && npm install --silent --no-save --no-audit --no-fund --ignore-scripts --no-package-lock \
    "openai@$VERSION" >/dev/null)
echo "fetch_openai.sh: openai@$VERSION in $dest/node_modules"
