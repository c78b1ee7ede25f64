#!/bin/sh
# Entrypoint of the Dockerfile's `all` image, which runs any of the three
# binaries: unless ONCEFLOW_LISTEN is set, the service listens on all
# interfaces on its own port (the binaries' defaults are 127.0.0.1, which is
# unreachable from outside a container). The per-service images set the same
# addresses with ENV; scripts/check-compose.sh checks that the two agree.
set -eu
if [ -z "${ONCEFLOW_LISTEN:-}" ]; then
  case "${1##*/}" in
    onceflow-ingest) export ONCEFLOW_LISTEN=0.0.0.0:8080 ;;
    onceflow-processor) export ONCEFLOW_LISTEN=0.0.0.0:8081 ;;
    onceflow-notifier) export ONCEFLOW_LISTEN=0.0.0.0:8082 ;;
  esac
fi
exec "$@"
