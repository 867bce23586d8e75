#!/usr/bin/env bash
# Build the release artefact: `make release` (or deploy/release/build.sh [OUT_DIR]).
#
# The wheel is built with the pinned, hashed build backend (build-requirements.lock) in a scratch
# virtualenv, then packed with requirements.lock, install.sh, the units and the CloudWatch agent
# configuration into OUT_DIR/cosmigrate-<version>.tar.gz. The last line printed is
# "<artefact> <sha256>": give both to install.sh (--release, --sha256) or to core-resources.yaml
# (ReleaseUrl / ReleaseSha256, ReleaseVersion).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
PYTHON="${PYTHON:-python3}"
VERSION="$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$ROOT/pyproject.toml")"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
DIR="$WORK/cosmigrate-$VERSION"
mkdir -p "$DIR"

"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
  --only-binary=:all: -r "$HERE/build-requirements.lock"
# Reproducible: file times from the last commit (hatchling honours SOURCE_DATE_EPOCH).
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 315532800)}"
"$WORK/venv/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  --wheel-dir "$DIR" "$ROOT"

cp "$HERE/requirements.lock" "$ROOT/deploy/systemd/install.sh" "$ROOT/deploy/systemd/cosmigrate.service" \
  "$ROOT/deploy/systemd/cosmigrate-emf.service" "$ROOT/deploy/cloudwatch/amazon-cloudwatch-agent.json" \
  "$ROOT/deploy/cloudwatch/cosmigrate.logrotate" "$DIR/"
echo "$VERSION" > "$DIR/VERSION"
ARTEFACT="$OUT/cosmigrate-$VERSION.tar.gz"
tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner -C "$WORK" -cf - "cosmigrate-$VERSION" \
  | gzip -n > "$ARTEFACT"
echo "$ARTEFACT $(sha256sum "$ARTEFACT" | cut -d' ' -f1)"
