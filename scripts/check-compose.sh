#!/usr/bin/env bash
# Checks docker-compose.yml, the Dockerfile and deploy/ without a Docker engine:
#
# 1. `compose config -q` validates docker-compose.yml against the Compose
#    schema (the `docker compose` v2 plugin when present, otherwise Debian's
#    `docker-compose`, installed with apt-get if missing);
# 2. the Dockerfile builds the three service binaries, and each service in
#    the compose file builds a Dockerfile target that runs its own binary,
#    listens on all interfaces where the image says, publishes or exposes
#    that port (a range or none for the services that scale), uses its own
#    database, waits for healthy Kafka and PostgreSQL, has a /readyz health
#    check, the admin token and traces to a collector that publishes OTLP;
#    callbacks may reach the webhook receiver; every other image is pinned;
# 3. the Prometheus configuration parses and scrapes the three services (and
#    the synthetic probe, which compose runs) on
#    their ports (and `promtool check config` accepts it); its alert rules
#    (deploy/prometheus/alerts.yml) name only catalogued metrics, each has a
#    runbook, and `promtool check rules` and `promtool test rules`
#    (alerts.test.yml) pass;
# 4. the Grafana provisioning parses, the dashboard JSON parses, its panels
#    use the provisioned datasources, every metric its PromQL names is in
#    CATALOGUE of crates/runtime/src/instruments/catalogue.rs, and `promtool check
#    rules` accepts every expression;
# 5. the webhook receiver service runs the example receiver of
#    examples/python with its pinned requirements (the receiver itself is
#    tested against the real stack by scripts/check-python-examples.sh).
#
# promtool comes from PATH, or else from Debian's `prometheus` package,
# downloaded (not installed: no daemon) into ~/.cache/onceflow/prometheus-deb
# once (lib.sh: prometheus_tool).
#
#   scripts/check-compose.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

readonly SERVICES=(ingest processor notifier)

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

# 2.-5. need PyYAML, and promtool if it can be had.
[[ -f Dockerfile ]] || { echo "check-compose: Dockerfile is missing" >&2; exit 1; }
[[ -f .dockerignore ]] || { echo "check-compose: .dockerignore is missing" >&2; exit 1; }
if ! python3 -c 'import yaml' 2>/dev/null; then
  apt_install python3-yaml
fi

if ! promtool="$(prometheus_tool promtool)"; then
  echo "check-compose: warning: no promtool (none on PATH, none from apt-get); Prometheus and PromQL are checked without it" >&2
  promtool=""
fi

python3 - "$promtool" "${SERVICES[@]}" <<'PY'
import json
import os
import re
import subprocess
import sys
import tempfile

import yaml

promtool, services = sys.argv[1], sys.argv[2:]
errors = []
# Services that may run several instances, so must not have a fixed host port.
SCALABLE = {"processor", "notifier"}
RECEIVER = "webhook-receiver"


def environment(spec):
    env = spec.get("environment", {}) or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def published(spec):
    """(host part or None, container port) of each `ports` entry."""
    out = []
    for entry in spec.get("ports", []) or []:
        if isinstance(entry, dict):
            host, target = entry.get("published"), entry.get("target")
        else:
            parts = str(entry).split("/")[0].split(":")
            host, target = (parts[-2] if len(parts) > 1 else None), parts[-1]
        out.append((None if host in (None, "") else str(host), str(target)))
    return out


# 2. The Dockerfile and how the services use it.
dockerfile = open("Dockerfile", encoding="utf-8").read()
# Join continuation lines so multi-line RUN/COPY instructions read as one.
instructions = [
    line.strip()
    for line in re.sub(r"\\\n", " ", dockerfile).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]

# Stages: name -> instructions in that stage, and the stage each builds on.
stages, parents, current = {}, {}, None
for line in instructions:
    match = re.match(r"(?i)FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line)
    if match:
        current = (match.group(2) or f"#{len(stages)}").lower()
        stages[current], parents[current] = [], match.group(1).lower()
    elif current is not None:
        stages[current].append(line)


def stage_env(stage, key):
    """The value of ENV `key` in `stage` or the stages it builds on."""
    while stage in stages:
        for line in reversed(stages[stage]):
            match = re.match(rf"(?i)ENV\s+{key}[= ](\S+)", line)
            if match:
                return match.group(1)
        stage = parents[stage]
    return None


builds = [l for l in instructions if re.match(r"(?i)RUN\b", l) and "cargo build" in l]
if not builds:
    errors.append("Dockerfile: no RUN ... cargo build")
for svc in services:
    binary = f"onceflow-{svc}"
    if not any(re.search(rf"-p\s+{binary}\b", b) and "--release" in b and "--locked" in b for b in builds):
        errors.append(f"Dockerfile: `cargo build --release --locked` does not build -p {binary}")
    if not any(re.match(r"(?i)COPY\b", l) and binary in l and "/usr/local/bin" in l for l in instructions):
        errors.append(f"Dockerfile: {binary} is not copied to /usr/local/bin")

# The `all` image's entrypoint must give each binary the address its own image has.
entrypoint_script = "deploy/docker/entrypoint.sh"
if not any(re.match(r"(?i)COPY\b", l) and entrypoint_script in l for l in stages.get("all", [])):
    errors.append(f"Dockerfile: stage `all` does not install {entrypoint_script}")
script_listen = dict(
    re.findall(r"(onceflow-[a-z]+)\)\s*export ONCEFLOW_LISTEN=(\S+?)\s*;;", open(entrypoint_script, encoding="utf-8").read())
)

compose = yaml.safe_load(open("docker-compose.yml", encoding="utf-8"))
defined = compose.get("services", {})
for dependency in ("kafka", "postgres"):
    if "healthcheck" not in defined.get(dependency, {}):
        errors.append(f"docker-compose.yml: service {dependency} is missing or has no healthcheck")

# Images not built here are pinned to a version, never `latest` or a bare name.
for name, spec in defined.items():
    image = str(spec.get("image", ""))
    if "build" in spec:
        continue
    tag = image.rsplit("/", 1)[-1].partition(":")[2].split("@")[0]
    if not re.search(r"\d", tag) or tag.startswith("latest"):
        errors.append(f"docker-compose.yml: service {name}: image {image!r} is not pinned to a version")

# The collector the services send traces to publishes OTLP for host applications.
jaeger = defined.get("jaeger", {})
jaeger_ports = {target: host for host, target in published(jaeger)}
for otlp in ("4317", "4318"):
    if jaeger_ports.get(otlp) != otlp:
        errors.append(f"docker-compose.yml: service jaeger does not publish OTLP port {otlp} on {otlp}")
if re.match(r"jaegertracing/all-in-one", str(jaeger.get("image", ""))):
    errors.append("docker-compose.yml: service jaeger runs the retired Jaeger v1 all-in-one image")

receiver = defined.get(RECEIVER)
receiver_port = environment(receiver).get("RECEIVER_PORT", "9999") if receiver else None
if receiver is None:
    errors.append(f"docker-compose.yml: service {RECEIVER} is missing")

listen_ports = {}
for svc in services:
    where = f"docker-compose.yml: service {svc}"
    spec = defined.get(svc)
    if spec is None:
        errors.append(f"{where} is missing")
        continue
    binary = f"onceflow-{svc}"
    build = spec.get("build")
    target = None
    if not isinstance(build, dict) or build.get("target") is None:
        errors.append(f"{where}: build has no Dockerfile target")
    else:
        if build.get("dockerfile", "Dockerfile") != "Dockerfile" or build.get("context", ".") not in (".", "./"):
            errors.append(f"{where}: must build ./Dockerfile with context .")
        target = str(build["target"]).lower()
        if target not in stages:
            errors.append(f"{where}: build target `{target}` is not a stage of the Dockerfile")
            target = None
        elif not any(l.upper().startswith("ENTRYPOINT") and binary in l for l in stages[target]):
            errors.append(f"{where}: Dockerfile stage `{target}` does not run {binary}")
    command = spec.get("command")
    if command is not None and (command if isinstance(command, str) else " ".join(command)).split()[:1] not in (["serve"], ["migrate"]):
        errors.append(f"{where}: command must be serve or migrate, not {command!r}")

    # Listening: on all interfaces, the same address in the image, the
    # compose file and the `all` image's entrypoint.
    env = environment(spec)
    image_listen = stage_env(target, "ONCEFLOW_LISTEN") if target else None
    listen = env.get("ONCEFLOW_LISTEN", image_listen or "")
    port = listen.rsplit(":", 1)[-1]
    listen_ports[svc] = port
    if not listen.startswith("0.0.0.0:"):
        errors.append(f"{where}: must listen on 0.0.0.0:<port>, got {listen!r}")
    if target and image_listen != listen:
        errors.append(f"{where}: ONCEFLOW_LISTEN {listen!r} differs from the image's ENV ({image_listen!r})")
    if script_listen.get(binary) != listen:
        errors.append(f"{where}: {entrypoint_script} gives {binary} {script_listen.get(binary)!r}, not {listen!r}")

    # Ports: reachable where a client needs them, never fixed where instances multiply.
    ports = published(spec)
    exposed = [str(p) for p in spec.get("expose", []) or []]
    if not any(target_port == port for _, target_port in ports) and port not in exposed:
        errors.append(f"{where}: listen port {port} is neither published nor exposed")
    if svc in SCALABLE:
        for host, target_port in ports:
            if host is not None and "-" not in host:
                errors.append(f"{where}: may be scaled, so must not publish the fixed host port {host} (use a range or none)")

    url = env.get("ONCEFLOW_DATABASE__URL", "")
    if not re.fullmatch(rf"postgres(ql)?://[^/]*@postgres:5432/onceflow_{svc}", url):
        errors.append(f"{where}: ONCEFLOW_DATABASE__URL should be postgres://...@postgres:5432/onceflow_{svc}, got {url!r}")
    if env.get("ONCEFLOW_KAFKA__BROKERS") != "kafka:9092":
        errors.append(f"{where}: ONCEFLOW_KAFKA__BROKERS should be kafka:9092")
    if not env.get("ONCEFLOW_ADMIN__TOKEN"):
        errors.append(f"{where}: ONCEFLOW_ADMIN__TOKEN is not set (the admin endpoints would be off)")
    traces = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("ONCEFLOW_TELEMETRY__OTLP_ENDPOINT", "")
    if not traces.startswith("http://jaeger:4318"):
        errors.append(f"{where}: traces should go to http://jaeger:4318 (OTEL_EXPORTER_OTLP_ENDPOINT), got {traces!r}")
    if svc in ("ingest", "notifier") and receiver_port is not None:
        allowlist = yaml.safe_load(env.get("ONCEFLOW_WEBHOOKS__ALLOWLIST", "[]")) or []
        if f"{RECEIVER}:{receiver_port}" not in allowlist:
            errors.append(f"{where}: ONCEFLOW_WEBHOOKS__ALLOWLIST does not permit {RECEIVER}:{receiver_port}, got {allowlist!r}")
    depends = spec.get("depends_on", {})
    for dependency in ("kafka", "postgres"):
        condition = depends.get(dependency, {}).get("condition") if isinstance(depends, dict) else None
        if condition != "service_healthy":
            errors.append(f"{where}: depends_on {dependency} must have condition service_healthy")
    test = spec.get("healthcheck", {}).get("test", [])
    test = test if isinstance(test, str) else " ".join(test)
    if f":{port}/readyz" not in test:
        errors.append(f"{where}: healthcheck does not probe :{port}/readyz")


def mounted(service, container_path):
    """The repository path `service` mounts at `container_path`, if any."""
    for volume in defined.get(service, {}).get("volumes", []) or []:
        parts = str(volume).split(":")
        if len(parts) >= 2 and parts[1] == container_path:
            return os.path.normpath(parts[0])
    return None


# Ingest and the notifier have no built-in tenant: each reads the development
# one from its file of config/development/, mounted and named by ONCEFLOW_CONFIG.
for svc in ("ingest", "notifier"):
    config_file = environment(defined.get(svc, {})).get("ONCEFLOW_CONFIG", "")
    config_dir = mounted(svc, os.path.dirname(config_file)) if config_file else None
    if config_dir is None:
        errors.append(f"docker-compose.yml: service {svc} names no mounted config file with ONCEFLOW_CONFIG (no tenant is built in)")
    elif not os.path.isfile(os.path.join(config_dir, os.path.basename(config_file))):
        errors.append(f"docker-compose.yml: service {svc}'s ONCEFLOW_CONFIG {config_file} is not a file of {config_dir}")


def run_promtool(*args):
    result = subprocess.run([promtool, *args], capture_output=True, text=True)
    if result.returncode != 0:
        errors.append(f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}")


# 3. Prometheus scrapes every service on its port, and the synthetic probe.
prometheus_file = mounted("prometheus", "/etc/prometheus/prometheus.yml")
if prometheus_file is None:
    errors.append("docker-compose.yml: service prometheus does not mount a config at /etc/prometheus/prometheus.yml")
else:
    prometheus = yaml.safe_load(open(prometheus_file, encoding="utf-8"))
    scraped = set()
    for job in prometheus.get("scrape_configs", []):
        if job.get("metrics_path", "/metrics") != "/metrics":
            continue
        for static in job.get("static_configs", []):
            scraped.update(str(t) for t in static.get("targets", []))
        for dns in job.get("dns_sd_configs", []):
            scraped.update(f"{name}:{dns.get('port')}" for name in dns.get("names", []))
    for svc in services:
        if f"{svc}:{listen_ports.get(svc)}" not in scraped:
            errors.append(f"{prometheus_file}: no job scrapes {svc}:{listen_ports.get(svc)}/metrics (scraped: {sorted(scraped)})")
    # The synthetic probe runs in compose, and its metrics (the probe alerts') are scraped.
    probe = defined.get("probe", {})
    probe_target = (probe.get("build") or {}).get("target")
    if probe_target not in stages or not any(
        l.upper().startswith("ENTRYPOINT") and "/onceflow\"" in l for l in stages.get(probe_target, [])
    ):
        errors.append("docker-compose.yml: service probe does not run the onceflow CLI's image stage `probe`")
    elif not any("--metrics-listen" in l and ":9464" in l for l in stages[probe_target]):
        errors.append("Dockerfile: stage probe does not serve its metrics on :9464")
    if "probe:9464" not in scraped:
        errors.append(f"{prometheus_file}: no job scrapes the synthetic probe at probe:9464")
    if promtool:
        run_promtool("check", "config", prometheus_file)

# 4. Grafana: provisioning, the dashboard, its PromQL against the catalogue.
datasource_dir = mounted("grafana", "/etc/grafana/provisioning/datasources")
provider_dir = mounted("grafana", "/etc/grafana/provisioning/dashboards")
dashboard_dir = mounted("grafana", "/etc/grafana/dashboards")
if None in (datasource_dir, provider_dir, dashboard_dir):
    errors.append("docker-compose.yml: grafana must mount provisioning/datasources, provisioning/dashboards and the dashboards")
    datasource_dir = provider_dir = dashboard_dir = None


def yaml_files(directory):
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith((".yml", ".yaml"))]


datasource_uids = set()
if datasource_dir:
    for path in yaml_files(datasource_dir):
        for source in yaml.safe_load(open(path, encoding="utf-8")).get("datasources", []):
            datasource_uids.add(source.get("uid"))
            if source.get("type") == "prometheus" and source.get("url") != "http://prometheus:9090":
                errors.append(f"{path}: Prometheus datasource url should be http://prometheus:9090")
    if "prometheus" not in datasource_uids:
        errors.append(f"{datasource_dir}: no datasource with uid prometheus")
if provider_dir:
    paths = [
        provider.get("options", {}).get("path")
        for path in yaml_files(provider_dir)
        for provider in yaml.safe_load(open(path, encoding="utf-8")).get("providers", [])
    ]
    if "/etc/grafana/dashboards" not in paths:
        errors.append(f"{provider_dir}: no dashboard provider reads /etc/grafana/dashboards")

# The catalogue: name -> kind, from the Rust source.
# The names' constants live in instruments.rs, the CATALOGUE in its catalogue module.
instruments = "".join(
    open(path, encoding="utf-8").read()
    for path in ["crates/runtime/src/instruments.rs", "crates/runtime/src/instruments/catalogue.rs"]
)
constants = dict(re.findall(r'pub const ([A-Z_]+): &str = "([^"]+)";', instruments))
block = instruments[instruments.index("const CATALOGUE"):]
block = block[: block.index("\n];")]
catalogue = {}
for literal, constant, kind in re.findall(r'\(\s*(?:"([a-z0-9_:]+)"|([A-Z_]+))\s*,\s*Kind::(\w+)', block):
    catalogue[literal or constants[constant]] = kind
if len(catalogue) < 10:
    errors.append(f"crates/runtime/src/instruments/catalogue.rs: read only {len(catalogue)} metrics from CATALOGUE")
# Series Prometheus itself adds to every target.
BUILTIN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# What may stand where a metric name could: keywords and grouping clauses.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "10s", "$__range": "30m"}


def metric_names(expr):
    """The metric names `expr` selects (label matchers, ranges, strings and grouping clauses removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    return {
        name
        for name in re.findall(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", text)
        if name.lower() not in KEYWORDS
    }


def known(name):
    if name in catalogue or name in BUILTIN:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in ("bucket", "sum", "count") and catalogue.get(base) == "Histogram"


used, expressions = set(), []
for path in sorted(os.listdir(dashboard_dir)) if dashboard_dir else []:
    if not path.endswith(".json"):
        continue
    path = os.path.join(dashboard_dir, path)
    try:
        dashboard = json.load(open(path, encoding="utf-8"))
    except ValueError as error:
        errors.append(f"{path}: not JSON: {error}")
        continue
    panels = [p for p in dashboard.get("panels", []) if p.get("type") != "row"]
    if not dashboard.get("uid") or not panels:
        errors.append(f"{path}: a dashboard needs a uid and panels")
    for panel in panels:
        where = f"{path}: panel {panel.get('title')!r}"
        targets = panel.get("targets", [])
        if not targets:
            errors.append(f"{where}: has no queries")
        for target in [panel, *targets]:
            uid = (target.get("datasource") or {}).get("uid")
            if uid not in datasource_uids:
                errors.append(f"{where}: datasource uid {uid!r} is not provisioned ({sorted(datasource_uids)})")
        for target in targets:
            expr = target.get("expr", "")
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            if "$" in re.sub(r'"(?:[^"\\]|\\.)*"', "", expr):
                errors.append(f"{where}: unknown Grafana variable in {target.get('expr')!r}")
            names = metric_names(expr)
            if not names:
                errors.append(f"{where}: no metric in {target.get('expr')!r}")
            for name in sorted(names - {n for n in names if known(n)}):
                errors.append(f"{where}: metric {name} is not in CATALOGUE of crates/runtime/src/instruments/catalogue.rs")
            used |= names
            expressions.append(expr)
if promtool and expressions:
    # promtool parses PromQL only inside rule files: one recording rule per query.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(expressions)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as file:
        yaml.safe_dump(rules, file)
    run_promtool("check", "rules", file.name)
    os.unlink(file.name)

# 3b. The alert rules (after 4's helpers, which they use).
if prometheus_file is not None:
    # The alert rules: mounted beside the configuration, loaded by it, every
    # metric they name in the catalogue, and their unit tests pass.
    alerts_file = mounted("prometheus", "/etc/prometheus/alerts.yml")
    if alerts_file is None:
        errors.append("docker-compose.yml: service prometheus does not mount the alert rules at /etc/prometheus/alerts.yml")
    elif "alerts.yml" not in prometheus.get("rule_files", []):
        errors.append(f"{prometheus_file}: rule_files does not load alerts.yml")
    else:
        alerts = yaml.safe_load(open(alerts_file, encoding="utf-8"))
        rules = [rule for group in alerts.get("groups", []) for rule in group.get("rules", [])]
        for rule in rules:
            if not rule.get("annotations", {}).get("runbook"):
                errors.append(f"{alerts_file}: alert {rule.get('alert')} has no runbook annotation")
            for name in sorted(n for n in metric_names(rule.get("expr", "")) if n != "up" and not known(n)):
                errors.append(f"{alerts_file}: alert {rule.get('alert')} names {name}, not in CATALOGUE of crates/runtime/src/instruments/catalogue.rs")
        if promtool:
            run_promtool("check", "rules", alerts_file)
            run_promtool("test", "rules", os.path.join(os.path.dirname(alerts_file), "alerts.test.yml"))
            print(f"check-compose: {len(rules)} alert rules (promtool: valid, their unit tests pass)")

# 5. The webhook receiver runs the example, with the example's requirements.
if receiver is not None:
    command = receiver.get("command")
    command = " ".join(command) if isinstance(command, list) else str(command)
    if mounted(RECEIVER, "/receiver") != "examples/python":
        errors.append(f"docker-compose.yml: service {RECEIVER} does not mount ./examples/python on /receiver")
    for needed in ("-r /receiver/requirements.txt", "/receiver/webhook_receiver.py"):
        if needed not in command:
            errors.append(f"docker-compose.yml: service {RECEIVER}'s command lacks {needed!r}: {command}")
    for example in ("examples/python/requirements.txt", "examples/python/webhook_receiver.py"):
        if not os.path.isfile(example):
            errors.append(f"{example} is missing")
    if "standardwebhooks==" not in open("examples/python/requirements.txt").read():
        errors.append("examples/python/requirements.txt does not pin standardwebhooks")

for error in dict.fromkeys(errors):  # each once, in order
    print(f"check-compose: error: {error}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"check-compose: Dockerfile builds and compose runs {', '.join('onceflow-' + s for s in services)}, listening on 0.0.0.0")
print(f"check-compose: Prometheus scrapes {', '.join(f'{s}:{listen_ports[s]}' for s in services)} and the synthetic probe at probe:9464" + (" (promtool: valid)" if promtool else ""))
print(
    f"check-compose: the dashboard's {len(expressions)} queries use {len(used & set(catalogue))} of the catalogue's "
    f"{len(catalogue)} metrics, none unknown" + (" (promtool: PromQL valid)" if promtool else "")
)
print("check-compose: the webhook receiver runs examples/python/webhook_receiver.py with its pinned requirements")
PY
