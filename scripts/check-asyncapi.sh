#!/usr/bin/env bash
# Validates asyncapi.yaml with the official AsyncAPI parser (3.x) and its Avro
# schema parser, so the Avro payloads $ref'd from schemas/*.avsc are resolved
# and validated too; also checks that every schemas/*.avsc is referenced and
# that every released version in schemas/history/ is a valid Avro schema.
#
# The npm packages are installed once, at pinned versions, into a cache
# directory outside the repository; later runs work offline.
#
#   scripts/check-asyncapi.sh [path/to/asyncapi.yaml]
#
# Environment: ONCEFLOW_ASYNCAPI_CACHE overrides the install directory
# (default: ${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/asyncapi-parser).
set -euo pipefail

# A document given on the command line is taken relative to the caller's cwd.
document=""
if [[ $# -gt 0 ]]; then
  document="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
document="${document:-$PWD/asyncapi.yaml}"

readonly PARSER_VERSION=3.6.3
readonly AVRO_PARSER_VERSION=3.0.24
cache_dir="${ONCEFLOW_ASYNCAPI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/onceflow/asyncapi-parser}"

command -v node >/dev/null || { echo "check-asyncapi: node is required" >&2; exit 2; }
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if (( node_major < 18 )); then
  echo "check-asyncapi: node >= 18 is required, found $(node --version)" >&2
  exit 2
fi

# Prints the version of an installed package, or nothing.
installed_version() {
  node -e 'try { process.stdout.write(require(process.argv[1]).version) } catch {}' \
    "$cache_dir/node_modules/$1/package.json"
}

if [[ "$(installed_version @asyncapi/parser)" != "$PARSER_VERSION" ||
      "$(installed_version @asyncapi/avro-schema-parser)" != "$AVRO_PARSER_VERSION" ]]; then
  command -v npm >/dev/null || { echo "check-asyncapi: npm is required for the first run" >&2; exit 2; }
  echo "check-asyncapi: installing @asyncapi/parser@$PARSER_VERSION and @asyncapi/avro-schema-parser@$AVRO_PARSER_VERSION into $cache_dir" >&2
  mkdir -p "$cache_dir"
  cat >"$cache_dir/package.json" <<EOF
{
  "name": "onceflow-asyncapi-check",
  "private": true,
  "description": "Installed by onceflow's scripts/check-asyncapi.sh",
  "dependencies": {
    "@asyncapi/parser": "$PARSER_VERSION",
    "@asyncapi/avro-schema-parser": "$AVRO_PARSER_VERSION"
  }
}
EOF
  # No install scripts: the parsers need none (one transitive dependency's
  # postinstall only reports analytics).
  (cd "$cache_dir" && SCARF_ANALYTICS=false npm install --no-audit --no-fund --ignore-scripts --loglevel=error >&2)
  for pkg in "@asyncapi/parser:$PARSER_VERSION" "@asyncapi/avro-schema-parser:$AVRO_PARSER_VERSION"; do
    if [[ "$(installed_version "${pkg%:*}")" != "${pkg##*:}" ]]; then
      echo "check-asyncapi: ${pkg%:*} ${pkg##*:} did not install into $cache_dir" >&2
      exit 2
    fi
  done
fi

ONCEFLOW_ASYNCAPI_MODULES="$cache_dir" node scripts/check-asyncapi.mjs "$document"
