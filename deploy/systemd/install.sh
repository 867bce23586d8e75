#!/usr/bin/env bash
# Install cosmigrate as a systemd service on this machine (Amazon Linux 2023, Debian, Ubuntu).
#
#   sudo deploy/systemd/install.sh [--source PATH_OR_PIP_SPEC] [--no-enable]
#
# Creates the `cosmigrate` system user, a virtualenv under /opt/cosmigrate/venv with
# cosmigrate installed, a config skeleton under /etc/cosmigrate (0640 root:cosmigrate,
# secrets 0600 root), and installs + enables the unit. It never overwrites an existing
# config or secret file, so it is safe to run again for an upgrade.
#
# For tests and image builds: COSMIGRATE_ROOT=/some/dir stages everything below that
# directory and skips the user, systemctl and (with --skip-venv) the virtualenv.
set -euo pipefail

ROOT="${COSMIGRATE_ROOT:-}"
HERE="$(cd "$(dirname "$0")" && pwd)"
SOURCE="$(cd "$HERE/../.." && pwd)"
ENABLE=1
VENV=1
PYTHON="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE="$2"; shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    --skip-venv) VENV=0; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo)" >&2
  exit 2
fi

say() { echo "install.sh: $*"; }

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
  "$PYTHON" -m venv "$ROOT/opt/cosmigrate/venv"
  "$ROOT/opt/cosmigrate/venv/bin/python" -m pip install --quiet --upgrade pip
  "$ROOT/opt/cosmigrate/venv/bin/python" -m pip install --quiet --upgrade "$SOURCE"
  say "installed cosmigrate into /opt/cosmigrate/venv"
fi

install -d -m 0750 "$ROOT/etc/cosmigrate"
install -d -m 0700 "$ROOT/etc/cosmigrate/credentials"
[ -n "$OWNER" ] && chown "$OWNER" "$ROOT/etc/cosmigrate"

CONFIG="$ROOT/etc/cosmigrate/cosmigrate.toml"
if [ ! -e "$CONFIG" ]; then
  cat > "$CONFIG" <<'TOML'
# cosmigrate configuration. Every key and its default: see the README.
cluster_name = "CHANGE-ME"            # e.g. the Cosmos DB account name

[source]
uri = "env:COSMIGRATE_SOURCE_URI"      # set in /etc/cosmigrate/cosmigrate.env (0600)

[target]
uri = "env:COSMIGRATE_TARGET_URI"
tls_ca_file = "/etc/cosmigrate/global-bundle.pem"

[store]
url = "s3://CHANGE-ME-bucket/cosmigrate"   # the ChangeBatchBucket output of core-resources.yaml

[ledger]
url = "dynamodb://CHANGE-ME-table"         # the LedgerTable output of core-resources.yaml

[capture]
start_at = "now"
TOML
  chmod 0640 "$CONFIG"
  [ -n "$OWNER" ] && chown "$OWNER" "$CONFIG"
  say "wrote a config skeleton to /etc/cosmigrate/cosmigrate.toml: edit it"
fi

ENVFILE="$ROOT/etc/cosmigrate/cosmigrate.env"
if [ ! -e "$ENVFILE" ]; then
  ( umask 077; cat > "$ENVFILE" <<'ENV'
# Read by systemd (as root) for cosmigrate.service. Keep this file 0600 root.
COSMIGRATE_SOURCE_URI=mongodb://USER:PASSWORD@ACCOUNT.mongo.cosmos.azure.com:10255/?ssl=true&replicaSet=globaldb&retrywrites=false&maxIdleTimeMS=120000
COSMIGRATE_TARGET_URI=mongodb://USER:PASSWORD@CLUSTER.docdb.amazonaws.com:27017/?tls=true&replicaSet=rs0&readPreference=secondaryPreferred&retryWrites=false
ENV
  )
  chmod 0600 "$ENVFILE"
  say "wrote /etc/cosmigrate/cosmigrate.env (0600): put the real connection strings there"
fi

install -d -m 0755 "$ROOT/etc/systemd/system"
install -m 0644 "$HERE/cosmigrate.service" "$ROOT/etc/systemd/system/cosmigrate.service"
say "installed /etc/systemd/system/cosmigrate.service"

if [ -z "$ROOT" ]; then
  systemctl daemon-reload
  if [ "$ENABLE" = 1 ]; then
    systemctl enable cosmigrate >/dev/null
    say "enabled cosmigrate.service (not started: edit the config, run preflight, then systemctl start cosmigrate)"
  fi
fi
say "next: /opt/cosmigrate/venv/bin/cosmigrate preflight --config /etc/cosmigrate/cosmigrate.toml"
