#!/usr/bin/env bash
# Checks docker-compose.yml and the Dockerfile without a Docker engine:
#
# 1. `compose config -q` validates docker-compose.yml against the Compose
#    schema (the `docker compose` v2 plugin when present, otherwise Debian's
#    `docker-compose`, installed with apt-get if missing);
# 2. the Dockerfile builds the three service binaries, and each service in
#    the compose file builds a Dockerfile target that runs its own binary,
#    listens where its port is published, uses its own database, waits for
#    healthy Kafka and PostgreSQL, and has a /readyz health check.
#
#   scripts/check-compose.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly SERVICES=(ingest processor notifier)

as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "check-compose: need root (or sudo) to run: $*" >&2
    exit 2
  fi
}

# Installs Debian packages, refreshing the package lists only if needed.
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  echo "check-compose: installing $* with apt-get" >&2
  if ! as_root apt-get install -y -q --no-install-recommends "$@" >&2; then
    as_root apt-get update -q >&2
    as_root apt-get install -y -q --no-install-recommends "$@" >&2
  fi
}

# 1. The Compose schema.
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  if ! command -v docker-compose >/dev/null; then
    # --no-install-recommends: only the client, not the docker.io engine.
    apt_install docker-compose
  fi
  compose=(docker-compose)
fi
echo "check-compose: $("${compose[@]}" version 2>/dev/null | head -n 1)"
"${compose[@]}" -f docker-compose.yml config -q
echo "check-compose: docker-compose.yml is valid"

# 2. The Dockerfile and how the services use it.
[[ -f Dockerfile ]] || { echo "check-compose: Dockerfile is missing" >&2; exit 1; }
[[ -f .dockerignore ]] || { echo "check-compose: .dockerignore is missing" >&2; exit 1; }
if ! python3 -c 'import yaml' 2>/dev/null; then
  apt_install python3-yaml
fi

python3 - "${SERVICES[@]}" <<'PY'
import re
import sys

import yaml

services = sys.argv[1:]
errors = []
dockerfile = open("Dockerfile", encoding="utf-8").read()
# Join continuation lines so multi-line RUN/COPY instructions read as one.
instructions = [
    line.strip()
    for line in re.sub(r"\\\n", " ", dockerfile).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]

# Stages: name -> instructions in that stage.
stages, current = {}, None
for line in instructions:
    match = re.match(r"(?i)FROM\s+\S+(?:\s+AS\s+(\S+))?", line)
    if match:
        current = (match.group(1) or f"#{len(stages)}").lower()
        stages[current] = []
    elif current is not None:
        stages[current].append(line)

builds = [l for l in instructions if re.match(r"(?i)RUN\b", l) and "cargo build" in l]
if not builds:
    errors.append("Dockerfile: no RUN ... cargo build")
for svc in services:
    binary = f"onceflow-{svc}"
    if not any(re.search(rf"-p\s+{binary}\b", b) and "--release" in b and "--locked" in b for b in builds):
        errors.append(f"Dockerfile: `cargo build --release --locked` does not build -p {binary}")
    if not any(re.match(r"(?i)COPY\b", l) and binary in l and "/usr/local/bin" in l for l in instructions):
        errors.append(f"Dockerfile: {binary} is not copied to /usr/local/bin")

compose = yaml.safe_load(open("docker-compose.yml", encoding="utf-8"))
defined = compose.get("services", {})
for dependency in ("kafka", "postgres"):
    if "healthcheck" not in defined.get(dependency, {}):
        errors.append(f"docker-compose.yml: service {dependency} is missing or has no healthcheck")

for svc in services:
    where = f"docker-compose.yml: service {svc}"
    spec = defined.get(svc)
    if spec is None:
        errors.append(f"{where} is missing")
        continue
    binary = f"onceflow-{svc}"
    build = spec.get("build")
    if not isinstance(build, dict) or build.get("target") is None:
        errors.append(f"{where}: build has no Dockerfile target")
    else:
        if build.get("dockerfile", "Dockerfile") != "Dockerfile" or build.get("context", ".") not in (".", "./"):
            errors.append(f"{where}: must build ./Dockerfile with context .")
        target = str(build["target"]).lower()
        if target not in stages:
            errors.append(f"{where}: build target `{target}` is not a stage of the Dockerfile")
        elif not any(l.upper().startswith("ENTRYPOINT") and binary in l for l in stages[target]):
            errors.append(f"{where}: Dockerfile stage `{target}` does not run {binary}")
    command = spec.get("command")
    if command is not None and (command if isinstance(command, str) else " ".join(command)).split()[:1] not in (["serve"], ["migrate"]):
        errors.append(f"{where}: command must be serve or migrate, not {command!r}")

    env = spec.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    listen = str(env.get("ONCEFLOW_LISTEN", ""))
    port = listen.rsplit(":", 1)[-1]
    if not listen.startswith("0.0.0.0:"):
        errors.append(f"{where}: ONCEFLOW_LISTEN must be 0.0.0.0:<port>, got {listen!r}")
    published = [str(p) for p in spec.get("ports", [])]
    if not any(p.split(":")[-1].split("/")[0] == port for p in published):
        errors.append(f"{where}: listen port {port} is not published ({published})")
    url = str(env.get("ONCEFLOW_DATABASE__URL", ""))
    if not re.fullmatch(rf"postgres(ql)?://[^/]*@postgres:5432/onceflow_{svc}", url):
        errors.append(f"{where}: ONCEFLOW_DATABASE__URL should be postgres://...@postgres:5432/onceflow_{svc}, got {url!r}")
    if env.get("ONCEFLOW_KAFKA__BROKERS") != "kafka:9092":
        errors.append(f"{where}: ONCEFLOW_KAFKA__BROKERS should be kafka:9092")
    depends = spec.get("depends_on", {})
    for dependency in ("kafka", "postgres"):
        condition = depends.get(dependency, {}).get("condition") if isinstance(depends, dict) else None
        if condition != "service_healthy":
            errors.append(f"{where}: depends_on {dependency} must have condition service_healthy")
    test = spec.get("healthcheck", {}).get("test", [])
    test = test if isinstance(test, str) else " ".join(test)
    if f":{port}/readyz" not in test:
        errors.append(f"{where}: healthcheck does not probe :{port}/readyz")

for error in errors:
    print(f"check-compose: error: {error}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"check-compose: Dockerfile builds and compose runs {', '.join('onceflow-' + s for s in services)}")
PY
