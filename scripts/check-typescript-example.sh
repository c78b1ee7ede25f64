#!/usr/bin/env bash
# The TypeScript example pull worker (examples/typescript: Node's built-in
# fetch, no SDK) against the real stack: builds it with the pinned TypeScript
# of its package-lock.json (npm ci), then runs the end-to-end test in which it
# serves demo.report, is killed in the middle of a job, and a second worker
# finishes that job once. Installs Node.js from Debian if it is missing.
# Starts the broker if none is running (and stops it again), like
# scripts/test.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
say "building examples/typescript (npm ci, tsc)"
(cd examples/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
run_ignored_e2e typescript_ "the TypeScript worker against the real stack"
