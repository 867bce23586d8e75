#!/usr/bin/env bash
# Install a pinned cosmigrate release as a systemd service (Amazon Linux 2023, Debian, Ubuntu).
#
#   sudo ./install.sh --release URL_OR_FILE --sha256 HEX [--no-enable]
#
# URL_OR_FILE is a release artefact cosmigrate-<version>.tar.gz (`make release` builds one and prints
# its sha256): a local file, https://... or s3://bucket/key. Nothing is installed unless the file's
# sha256 is HEX. Inside it: the wheel, requirements.lock (every dependency pinned to a version and
# hashed: pip runs with --require-hashes and --no-deps, so nothing unpinned can come in), the units
# and the CloudWatch agent configuration.
#
# Creates the `cosmigrate` system user, a virtualenv under /opt/cosmigrate/venv, a config skeleton
# under /etc/cosmigrate (0640 root:cosmigrate, secrets 0600 root), the units (enabled, not started).
# It never overwrites an existing config or secret file, so it is safe to run again for an upgrade.
#
# For tests and image builds: COSMIGRATE_ROOT=/some/dir stages everything below that directory and
# skips the user and systemctl; --skip-venv skips the virtualenv (then --release is optional and the
# units come from this checkout).
set -euo pipefail

ROOT="${COSMIGRATE_ROOT:-}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ENABLE=1
VENV=1
RELEASE=""
SHA256=""
PYTHON="${PYTHON:-python3}"

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --release) [ $# -ge 2 ] || die "--release needs a file or URL"; RELEASE="$2"; shift 2 ;;
    --sha256) [ $# -ge 2 ] || die "--sha256 needs the artefact's sha256"; SHA256="$2"; shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    --skip-venv) VENV=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  die "run as root (sudo)"
fi
if [ "$VENV" = 1 ] && [ -z "$RELEASE" ]; then
  die "--release URL_OR_FILE and --sha256 HEX are required (an unpinned install is not offered)"
fi
# Before anything is fetched or a venv created: Amazon Linux 2023's python3 is 3.9, and pip would fail deep inside.
if [ "$VENV" = 1 ]; then
  PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
  if ! [[ "$PYVER" =~ ^([0-9]+)\.([0-9]+)$ ]] || [ "${BASH_REMATCH[1]}" -lt 3 ] \
      || { [ "${BASH_REMATCH[1]}" -eq 3 ] && [ "${BASH_REMATCH[2]}" -lt 11 ]; }; then
    die "$PYTHON is Python ${PYVER:-(not found)}; cosmigrate needs 3.11 or later: install python3.11 (Amazon Linux 2023: sudo dnf install -y python3.11) and run again with PYTHON=python3.11"
  fi
fi

UNITS="$HERE"                      # units, from this checkout unless a release brings its own
CLOUDWATCH="$HERE/../cloudwatch"   # agent configuration and logrotate rule, likewise
if [ -n "$RELEASE" ]; then
  [[ "$SHA256" =~ ^[0-9a-f]{64}$ ]] || die "--sha256 must be 64 lower-case hex digits"
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  ARTEFACT="$WORK/release.tar.gz"
  case "$RELEASE" in
    s3://*) aws s3 cp --only-show-errors "$RELEASE" "$ARTEFACT" ;;
    https://*) curl -fsSL --proto '=https' --retry 3 -o "$ARTEFACT" "$RELEASE" ;;
    *://*) die "--release must be a file, https:// or s3:// (got ${RELEASE%%://*}://)" ;;
    *) [ -f "$RELEASE" ] || die "--release $RELEASE: no such file"; cp "$RELEASE" "$ARTEFACT" ;;
  esac
  ACTUAL="$(sha256sum "$ARTEFACT" | cut -d' ' -f1)"
  [ "$ACTUAL" = "$SHA256" ] || die "sha256 mismatch for $RELEASE: expected $SHA256, got $ACTUAL; nothing installed"
  tar -xzf "$ARTEFACT" -C "$WORK"
  DIR="$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'cosmigrate-*' | head -n 1)"
  [ -n "$DIR" ] && [ -f "$DIR/VERSION" ] && [ -f "$DIR/requirements.lock" ] || die "$RELEASE is not a cosmigrate release artefact"
  VERSION="$(cat "$DIR/VERSION")"
  WHEEL="$DIR/cosmigrate-$VERSION-py3-none-any.whl"
  [ -f "$WHEEL" ] || die "$RELEASE lacks cosmigrate-$VERSION-py3-none-any.whl"
  UNITS="$DIR"
  CLOUDWATCH="$DIR"
  say "release $VERSION verified (sha256 $SHA256)"
fi

if [ -z "$ROOT" ]; then
  if ! id cosmigrate >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/cosmigrate --no-create-home \
      --shell /usr/sbin/nologin cosmigrate
    say "created system user cosmigrate"
  fi
  OWNER="root:cosmigrate"
else
  OWNER=""
fi

install -d -m 0755 "$ROOT/opt/cosmigrate"
if [ "$VENV" = 1 ]; then
  "$PYTHON" -m venv --clear "$ROOT/opt/cosmigrate/venv"
  PIP=("$ROOT/opt/cosmigrate/venv/bin/python" -m pip --disable-pip-version-check --quiet)
  "${PIP[@]}" install --require-hashes --no-deps --only-binary=:all: -r "$DIR/requirements.lock"
  "${PIP[@]}" install --no-deps --no-index "$WHEEL"
  # --no-deps never asks whether the lock satisfies the wheel's requirements: pip check does.
  if ! CHECK="$("$ROOT/opt/cosmigrate/venv/bin/python" -m pip --disable-pip-version-check check 2>&1)"; then
    die "the release's requirements.lock does not satisfy cosmigrate $VERSION (pip check: $(echo "$CHECK" | head -n 3 | tr '\n' ' '))"
  fi
  say "installed cosmigrate $VERSION into /opt/cosmigrate/venv"
fi
# On PATH for every user: operators run `cosmigrate ctl ...` without knowing where the venv is.
install -d -m 0755 "$ROOT/usr/local/bin"
ln -sfn /opt/cosmigrate/venv/bin/cosmigrate "$ROOT/usr/local/bin/cosmigrate"

install -d -m 0750 "$ROOT/etc/cosmigrate"
install -d -m 0700 "$ROOT/etc/cosmigrate/credentials"
[ -n "$OWNER" ] && chown "$OWNER" "$ROOT/etc/cosmigrate"

CONFIG="$ROOT/etc/cosmigrate/cosmigrate.toml"
if [ ! -e "$CONFIG" ]; then
  cat > "$CONFIG" <<'TOML'
# cosmigrate configuration. Every key and its default: see the README. check-config refuses every CHANGE-ME
# left: set cluster_name, store.url, ledger.url, aws.region here, the connection strings in cosmigrate.env
# (or Secrets Manager ARNs as source.uri / target.uri), and download target.tls_ca_file.
cluster_name = "CHANGE-ME"            # e.g. the Cosmos DB account name

[source]
uri = "env:COSMIGRATE_SOURCE_URI"      # set in /etc/cosmigrate/cosmigrate.env (0600), or a Secrets Manager ARN

[target]
uri = "env:COSMIGRATE_TARGET_URI"
tls_ca_file = "/etc/cosmigrate/global-bundle.pem"

[store]
url = "s3://CHANGE-ME-bucket/cosmigrate"   # the ChangeBatchBucket output of core-resources.yaml

[ledger]
url = "dynamodb://CHANGE-ME-table"         # the LedgerTable output of core-resources.yaml

[aws]
region = "CHANGE-ME"                      # the stack's region, e.g. eu-west-1

[capture]
start_at = "beginning"                 # the full load through the change feed; "now" if you copy by other means

[metrics]
cloudwatch = true                         # EMF lines for the CloudWatch agent (deploy/cloudwatch)
TOML
  chmod 0640 "$CONFIG"
  [ -n "$OWNER" ] && chown "$OWNER" "$CONFIG"
  say "wrote a config skeleton to /etc/cosmigrate/cosmigrate.toml: edit it"
fi

ENVFILE="$ROOT/etc/cosmigrate/cosmigrate.env"
if [ ! -e "$ENVFILE" ]; then
  ( umask 077; cat > "$ENVFILE" <<'ENV'
# Read by systemd (as root) for cosmigrate.service. Keep this file 0600 root.
# `sudo cosmigrate preflight --env-file /etc/cosmigrate/cosmigrate.env` reads it the same way.
# Uncomment and fill in both lines. Left commented, `cosmigrate check-config` fails and the service does not
# start with placeholder connection strings.
#COSMIGRATE_SOURCE_URI=mongodb://USER:PASSWORD@ACCOUNT.mongo.cosmos.azure.com:10255/?ssl=true&replicaSet=globaldb&retrywrites=false&maxIdleTimeMS=120000
#COSMIGRATE_TARGET_URI=mongodb://USER:PASSWORD@CLUSTER.docdb.amazonaws.com:27017/?tls=true&replicaSet=rs0&readPreference=secondaryPreferred&retryWrites=false
ENV
  )
  chmod 0600 "$ENVFILE"
  say "wrote /etc/cosmigrate/cosmigrate.env (0600): put the real connection strings there"
fi

install -d -m 0755 "$ROOT/etc/systemd/system"
for unit in cosmigrate.service cosmigrate-emf.service; do
  install -m 0644 "$UNITS/$unit" "$ROOT/etc/systemd/system/$unit"
done
install -d -m 0755 "$ROOT/etc/logrotate.d"
install -m 0644 "$CLOUDWATCH/cosmigrate.logrotate" "$ROOT/etc/logrotate.d/cosmigrate"
install -m 0644 "$CLOUDWATCH/amazon-cloudwatch-agent.json" "$ROOT/opt/cosmigrate/amazon-cloudwatch-agent.json"
say "installed the units (cosmigrate, cosmigrate-emf), logrotate and CloudWatch agent configuration"

if [ -z "$ROOT" ]; then
  systemctl daemon-reload
  if [ "$ENABLE" = 1 ]; then
    systemctl enable cosmigrate cosmigrate-emf >/dev/null
    say "enabled cosmigrate.service (not started: edit the config, run preflight, then systemctl start cosmigrate)"
  fi
fi
say "next: cosmigrate ledger init, then sudo cosmigrate preflight --env-file /etc/cosmigrate/cosmigrate.env"
