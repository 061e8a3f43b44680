#!/usr/bin/env bash
# Run the test suite against a real Neo4j.
#
# With NEO4J_URI set, that server is used as it is. Otherwise a throw-away local Neo4j (from
# Maven Central jars, tools/neo4j/neo4j.sh) is started on 127.0.0.1:17687 with its own home
# under tools/neo4j/.run-test, and stopped again when the tests end, pass or fail.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${NEO4J_URI:-}" ]]; then
  export NEO4J_HOME_DIR="$PWD/tools/neo4j/.run-test"
  export NEO4J_BOLT_PORT="${GMTROUTER_TEST_BOLT_PORT:-17687}"
  export NEO4J_HTTP_PORT="${GMTROUTER_TEST_HTTP_PORT:-17474}"
  unset NEO4J_PASSWORD
  rm -rf "$NEO4J_HOME_DIR"
  tools/neo4j/neo4j.sh start
  trap 'tools/neo4j/neo4j.sh stop || true' EXIT
  export NEO4J_URI="bolt://127.0.0.1:${NEO4J_BOLT_PORT}"
  # The durability test may stop and restart this server through the launcher.
  export GMTROUTER_NEO4J_LAUNCHER=1
fi

.venv/bin/python -m pytest "$@"
