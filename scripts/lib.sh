# Shared by scripts/stack.sh, scripts/test.sh and .ci/run: where things are,
# and how to make sure the broker and PostgreSQL are there.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="$ROOT/.stack"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
NISSHI_VERSION="0.7.0-pre.2"
BROKER_ADDR="${ONCEFLOW_BROKER_ADDR:-127.0.0.1:9092}"
PG_HOST="${ONCEFLOW_PG_HOST:-127.0.0.1}"
PG_PORT="${ONCEFLOW_PG_PORT:-5432}"
export PATH="$HOME/.cargo/bin:$PATH"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "need root (or sudo) to run: $*" >&2
    exit 2
  fi
}

# Installs Debian packages, refreshing the package lists only if needed.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  say "installing $* with apt-get"
  if ! as_root apt-get install -y -q --no-install-recommends "$@" >&2; then
    as_root apt-get update -q >&2
    as_root apt-get install -y -q --no-install-recommends "$@" >&2
  fi
}

# What building the services needs beyond the Rust toolchain: OpenSSL's
# headers and pkg-config (librdkafka's TLS and SASL/SCRAM to Kafka).
ensure_build_dependencies() {
  if ! { command -v pkg-config >/dev/null && pkg-config --exists openssl; }; then
    apt_install libssl-dev pkg-config
  fi
}

# True when something accepts TCP connections on host:port.
port_open() {
  local host="${1%:*}" port="${1##*:}"
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

wait_for_port() {
  local addr="$1" seconds="${2:-30}"
  for _ in $(seq "$((seconds * 10))"); do
    port_open "$addr" && return 0
    sleep 0.1
  done
  echo "nothing is listening on $addr after ${seconds}s" >&2
  return 1
}

# nisshi's features: `dynostore` for in-memory storage, `libsql` for a SQLite
# file (the local stack's broker keeps its data across restarts).
NISSHI_FEATURES="dynostore,libsql"

# Install the pinned nisshi broker unless that version, with those features,
# is already installed.
ensure_nisshi() {
  if command -v nisshi >/dev/null 2>&1 && nisshi --version 2>/dev/null | grep -q "$NISSHI_VERSION" \
    && grep -q "\"nisshi $NISSHI_VERSION[^\"]*\":{[^}]*\"features\":\[\"dynostore\",\"libsql\"\]" \
      "$HOME/.cargo/.crates2.json" 2>/dev/null; then
    return 0
  fi
  say "installing the nisshi broker $NISSHI_VERSION (first run only: about 25 minutes on 2 cores)"
  # Newer nisshi releases need a newer rustc than 1.95; --locked keeps its tested dependency set.
  cargo install nisshi --version "$NISSHI_VERSION" --locked --features "$NISSHI_FEATURES"
}

# Start the broker on $BROKER_ADDR unless one is listening, keeping its data
# as $1 says: `memory` (lost when it stops; the local stack's default and the
# test run's shared broker) or `persistent` (a SQLite file in .stack/, kept
# across `down` and `up` and across a crash, indexed by
# scripts/index-broker-storage.py so that a backlog drains). Sets
# BROKER_STARTED=1 when this call started it, and records the storage in
# .stack/broker.storage.
ensure_broker() {
  local storage="$1"
  BROKER_STARTED=0
  if port_open "$BROKER_ADDR"; then
    return 0
  fi
  ensure_nisshi
  mkdir -p "$STACK_DIR"
  local engine="memory://nisshi/"
  # A path relative to the broker's working directory: .stack/broker.db.
  if [ "$storage" = persistent ]; then engine="sqlite://broker.db"; fi
  say "starting the broker on $BROKER_ADDR ($storage storage; log: .stack/broker.log)"
  # Advertise the numeric address: clients must not resolve localhost to ::1.
  (cd "$STACK_DIR" && exec nohup nisshi broker \
    --listener-url "tcp://$BROKER_ADDR" \
    --advertised-listener-url "tcp://$BROKER_ADDR" \
    --storage-engine "$engine" >"$STACK_DIR/broker.log" 2>&1) &
  echo $! >"$STACK_DIR/broker.pid"
  echo "$storage" >"$STACK_DIR/broker.storage"
  BROKER_STARTED=1
  wait_for_port "$BROKER_ADDR" 30
  if [ "$storage" = persistent ]; then
    python3 "$ROOT/scripts/index-broker-storage.py" "$STACK_DIR/broker.db"
  fi
}

stop_pid_file() {
  local file="$1"
  [ -f "$file" ] || return 0
  local pid
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# The Python environment of examples/python (its pinned requirements.txt),
# made once and remade when the requirements change; prints its directory.
# ONCEFLOW_PY_VENV overrides the directory (default:
# ${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/py-venv).
ensure_python_examples() {
  local venv="${ONCEFLOW_PY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/py-venv}"
  local requirements="$ROOT/examples/python/requirements.txt"
  # A copy of the requirements the environment was made from: a change to them remakes it.
  local installed="$venv/onceflow-requirements.txt"
  if ! [ -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$installed"; then
    say "installing examples/python/requirements.txt into $venv"
    command -v python3 >/dev/null || { echo "python3 is required for the Python examples" >&2; exit 2; }
    # Debian's python3 makes environments only with its python3-venv package.
    python3 -m venv --clear "$venv" >&2 || { apt_install python3-venv && python3 -m venv --clear "$venv" >&2; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
    cp "$requirements" "$installed"
  fi
  echo "$venv"
}

# Make sure the machine's PostgreSQL answers; start the local cluster if it is down.
ensure_postgres() {
  if port_open "$PG_HOST:$PG_PORT"; then
    return 0
  fi
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    say "starting the local PostgreSQL cluster"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
  wait_for_port "$PG_HOST:$PG_PORT" 30 || {
    echo "PostgreSQL is not reachable on $PG_HOST:$PG_PORT" >&2
    return 1
  }
}

# Run the ignored end-to-end tests whose names match $1 (examples that need a
# toolchain of their own) against the real stack: PostgreSQL, and the broker,
# started if none runs and stopped again on exit. $2 says what they are.
run_ignored_e2e() {
  local filter="$1" what="$2"
  ensure_build_dependencies
  ensure_postgres
  ensure_broker memory
  trap 'if [ "$BROKER_STARTED" = 1 ]; then stop_pid_file "$STACK_DIR/broker.pid"; fi' EXIT
  export ONCEFLOW_TEST_KAFKA_BROKERS="$BROKER_ADDR"
  export ONCEFLOW_TEST_DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT"
  say "cargo test: $what"
  cargo test -p onceflow-tests --test e2e --locked "$filter" -- --ignored
}

# Prints the path of Prometheus' `promtool` or `prometheus` ($1): the one on
# PATH, or the one of Debian's `prometheus` package, unpacked into the cache
# once (not installed: no daemon, no service).
prometheus_tool() {
  local name="$1"
  if command -v "$name" >/dev/null; then
    command -v "$name"
    return 0
  fi
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/prometheus-deb"
  if [[ ! -x "$cache/$name" ]]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    local work
    work="$(mktemp -d)"
    echo "fetching $name (Debian package prometheus, ~19 MB, once)" >&2
    if ! (cd "$work" && apt-get download -q prometheus >&2); then
      as_root apt-get update -q >&2
      (cd "$work" && apt-get download -q prometheus >&2) || { rm -rf "$work"; return 1; }
    fi
    # (Called where `set -e` does not apply: each step is checked.)
    if ! { dpkg-deb -x "$work"/prometheus_*.deb "$work/unpacked" && mkdir -p "$cache" \
      && cp "$work/unpacked/usr/bin/promtool" "$work/unpacked/usr/bin/prometheus" "$cache/"; }; then
      rm -rf "$work"
      return 1
    fi
    rm -rf "$work"
  fi
  echo "$cache/$name"
}
