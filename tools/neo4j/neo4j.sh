#!/usr/bin/env bash
# A real Neo4j Community server from Maven Central jars, without Docker.
#
#   tools/neo4j/neo4j.sh install   # jars -> tools/neo4j/.lib (skipped when already there)
#   tools/neo4j/neo4j.sh start     # write neo4j.conf, start in the background, wait for Bolt
#   tools/neo4j/neo4j.sh stop      # SIGTERM to the recorded PID, wait for exit
#   tools/neo4j/neo4j.sh status    # exit 0 when running, 3 when stopped; prints the ports
#                                  # of the home's conf/neo4j.conf (what start wrote there)
#
# Environment (all optional):
#   NEO4J_HOME_DIR       home: conf/, data/, logs/, run/neo4j.pid   (default tools/neo4j/.run)
#   NEO4J_BOLT_PORT      Bolt port on 127.0.0.1                       (default 7687)
#   NEO4J_HTTP_PORT      HTTP port on 127.0.0.1 (Browser at /browser/) (default 7474)
#   NEO4J_PASSWORD       set: auth on, user neo4j with this password (>= 8 chars; applied
#                        when the home's system database is first created); unset: auth off
#   NEO4J_HEAP           JVM max heap (default 1g)
#   NEO4J_PAGECACHE      page cache size (default 256m)
#   NEO4J_READY_TIMEOUT  seconds to wait for readiness (default 180)
#   NEO4J_STOP_TIMEOUT   seconds to wait for exit after SIGTERM (default 60)
#   NEO4J_JAVA           java binary (default $JAVA_HOME/bin/java, else java on PATH)
#   NEO4J_JAVA_OPTS      extra JVM options
#   PYTHON               python for the readiness check (default <repo>/.venv/bin/python
#                        when present, else python3); uses the `neo4j` driver when importable,
#                        else a TCP + HTTP discovery check
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
POM="$HERE/pom.xml"
LIB_DIR="$HERE/.lib"
STAMP="$LIB_DIR/.installed"

HOME_DIR="${NEO4J_HOME_DIR:-$HERE/.run}"
BOLT_PORT="${NEO4J_BOLT_PORT:-7687}"
HTTP_PORT="${NEO4J_HTTP_PORT:-7474}"
HEAP="${NEO4J_HEAP:-1g}"
PAGECACHE="${NEO4J_PAGECACHE:-256m}"
READY_TIMEOUT="${NEO4J_READY_TIMEOUT:-180}"
STOP_TIMEOUT="${NEO4J_STOP_TIMEOUT:-60}"
if [[ -n "${NEO4J_JAVA:-}" ]]; then
  JAVA="$NEO4J_JAVA"
elif [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
  JAVA="$JAVA_HOME/bin/java"
else
  JAVA="java"
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi

MAIN_CLASS="org.neo4j.server.CommunityEntryPoint"
ADMIN_CLASS="org.neo4j.cli.AdminTool"

log() { echo "neo4j.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

abs_home() {
  mkdir -p "$HOME_DIR"
  HOME_DIR="$(cd "$HOME_DIR" && pwd)"
  CONF_DIR="$HOME_DIR/conf"
  CONF_FILE="$CONF_DIR/neo4j.conf"
  PID_FILE="$HOME_DIR/run/neo4j.pid"
  CONSOLE_LOG="$HOME_DIR/logs/console.log"
}

pom_hash() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$POM" | cut -d' ' -f1
  else shasum -a 256 "$POM" | cut -d' ' -f1; fi
}

jar_count() { find "$LIB_DIR" -maxdepth 1 -name '*.jar' | wc -l | tr -d ' '; }

is_installed() {
  [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(pom_hash)" ]] && compgen -G "$LIB_DIR/*.jar" >/dev/null
}

# --- process helpers -------------------------------------------------------------------

# True when $1 is a live (non-zombie) Neo4j process started for this home dir.
pid_is_ours() {
  local pid="$1" args stat
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  stat="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
  [[ "$stat" == Z* ]] && return 1
  args="$(ps -ww -o args= -p "$pid" 2>/dev/null || true)"
  [[ "$args" == *"$MAIN_CLASS"* && "$args" == *"--home-dir=$HOME_DIR "* ]]
}

running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  pid_is_ours "$pid" || return 1
  echo "$pid"
}

conf_port() { # conf_port bolt|http -> port of the written conf (empty when none)
  [[ -f "$CONF_FILE" ]] || return 0
  sed -n "s/^server\.$1\.listen_address=.*:\([0-9][0-9]*\)$/\1/p" "$CONF_FILE" | tail -n1
}

# "bolt=127.0.0.1:P http=127.0.0.1:Q": the ports this home's server was started with (its
# conf/neo4j.conf, written by start), not NEO4J_BOLT_PORT/NEO4J_HTTP_PORT of this call.
conf_ports() {
  echo "bolt=127.0.0.1:$(conf_port bolt) http=127.0.0.1:$(conf_port http)"
}

port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Sends SIGTERM to $1 and waits up to STOP_TIMEOUT seconds for it to go away.
terminate() {
  local pid="$1" waited=0
  kill -TERM "$pid" 2>/dev/null || return 0
  while pid_is_ours "$pid"; do
    if (( waited >= STOP_TIMEOUT * 5 )); then return 1; fi
    sleep 0.2
    waited=$((waited + 1))
  done
}

print_log_tail() {
  log "last lines of $CONSOLE_LOG:"
  tail -n "${1:-60}" "$CONSOLE_LOG" >&2 2>/dev/null || true
}

# --- commands --------------------------------------------------------------------------

cmd_install() {
  if is_installed; then
    log "jars already installed in $LIB_DIR ($(jar_count) jars)"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Maven 3.6+ is needed to fetch the jars)"
  local tmp="$LIB_DIR.tmp.$$"
  rm -rf "$tmp"
  log "fetching Neo4j jars from Maven Central into $LIB_DIR (uses ~/.m2 as cache)"
  local out
  if ! out="$(mvn -q -B -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" -DincludeScope=runtime 2>&1)"; then
    echo "$out" >&2
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed"
  fi
  pom_hash >"$tmp/.installed"
  rm -rf "$LIB_DIR"
  mv "$tmp" "$LIB_DIR"
  log "installed $(jar_count) jars"
}

check_java() {
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found ($JAVA); Neo4j 5.26 needs Java 17 or 21"
  local line major
  line="$("$JAVA" -version 2>&1 | head -n1)"
  major="$(sed -n 's/.*version "\([0-9]*\).*/\1/p' <<<"$line")"
  if [[ -z "$major" || "$major" -lt 17 ]]; then
    die "Neo4j 5.26 needs Java 17 or 21; $JAVA is: $line"
  fi
  if [[ "$major" != 17 && "$major" != 21 ]]; then
    log "warning: Neo4j 5.26 supports Java 17 and 21; using $line"
  fi
}

write_conf() {
  mkdir -p "$CONF_DIR" "$HOME_DIR/data" "$HOME_DIR/logs" "$HOME_DIR/run"
  local auth=false
  [[ -n "${NEO4J_PASSWORD:-}" ]] && auth=true
  cat >"$CONF_FILE" <<EOF
# Written by tools/neo4j/neo4j.sh on every start; edits here are overwritten.
server.directories.data=$HOME_DIR/data
server.directories.logs=$HOME_DIR/logs
server.directories.run=$HOME_DIR/run
server.directories.plugins=$HOME_DIR/plugins
server.directories.import=$HOME_DIR/import

server.default_listen_address=127.0.0.1
server.default_advertised_address=127.0.0.1
server.bolt.enabled=true
server.bolt.listen_address=127.0.0.1:$BOLT_PORT
server.bolt.advertised_address=127.0.0.1:$BOLT_PORT
server.http.enabled=true
server.http.listen_address=127.0.0.1:$HTTP_PORT
server.http.advertised_address=127.0.0.1:$HTTP_PORT
server.https.enabled=false
server.http_enabled_modules=TRANSACTIONAL_ENDPOINTS,UNMANAGED_EXTENSIONS,BROWSER,QUERY_API_ENDPOINTS

# The heap is set by -Xmx on the java command line (this launcher starts java itself).
server.memory.heap.max_size=$HEAP
server.memory.pagecache.size=$PAGECACHE

dbms.security.auth_enabled=$auth
dbms.usage_report.enabled=false
EOF
}

set_initial_password() {
  # The password only takes effect when the system database is created, i.e. first start.
  if [[ -d "$HOME_DIR/data/databases/system" ]]; then
    log "existing home: it keeps the password it was first started with (NEO4J_PASSWORD must match)"
    return 0
  fi
  log "setting the initial password for user neo4j"
  local out
  if ! out="$(cd "$HOME_DIR" && NEO4J_HOME="$HOME_DIR" NEO4J_CONF="$CONF_DIR" \
      "$JAVA" -cp "$LIB_DIR/*" "$ADMIN_CLASS" dbms set-initial-password "$NEO4J_PASSWORD" 2>&1)"; then
    echo "$out" >&2
    die "neo4j-admin dbms set-initial-password failed (passwords need at least 8 characters)"
  fi
}

# Exit codes: 0 ready, 1 timed out, 2 process exited, 3 authentication refused.
wait_ready() {
  local pid="$1"
  if ! command -v "$PYTHON" >/dev/null 2>&1; then
    log "no python ($PYTHON); falling back to a plain TCP + HTTP check"
    local deadline=$((SECONDS + READY_TIMEOUT))
    while (( SECONDS < deadline )); do
      pid_is_ours "$pid" || return 2
      if port_in_use "$BOLT_PORT" && curl -sf "http://127.0.0.1:$HTTP_PORT/" | grep -q neo4j_version; then
        return 0
      fi
      sleep 1
    done
    return 1
  fi
  N4J_PID="$pid" N4J_BOLT_PORT="$BOLT_PORT" N4J_HTTP_PORT="$HTTP_PORT" \
  N4J_TIMEOUT="$READY_TIMEOUT" "$PYTHON" - <<'PYEOF'
import json, os, socket, sys, time, urllib.request

pid = int(os.environ["N4J_PID"])
bolt = int(os.environ["N4J_BOLT_PORT"])
http = int(os.environ["N4J_HTTP_PORT"])
deadline = time.monotonic() + float(os.environ["N4J_TIMEOUT"])
password = os.environ.get("NEO4J_PASSWORD") or None

def alive():
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True

try:
    from neo4j import GraphDatabase
    from neo4j.exceptions import AuthError
except ImportError:
    GraphDatabase = None

last = None
while time.monotonic() < deadline:
    if not alive():
        print("neo4j.sh: the Neo4j process exited during start-up", file=sys.stderr)
        sys.exit(2)
    try:
        if GraphDatabase is not None:
            auth = ("neo4j", password) if password else None
            with GraphDatabase.driver(f"bolt://127.0.0.1:{bolt}", auth=auth,
                                      connection_timeout=5) as driver:
                driver.verify_connectivity()
                records, _, _ = driver.execute_query("RETURN 1 AS ok", database_="neo4j")
                if records and records[0]["ok"] == 1:
                    sys.exit(0)
        else:
            socket.create_connection(("127.0.0.1", bolt), timeout=2).close()
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=5) as resp:
                if "neo4j_version" in json.load(resp):
                    sys.exit(0)
    except SystemExit:
        raise
    except Exception as exc:  # not ready yet
        if GraphDatabase is not None and isinstance(exc, AuthError):
            print(f"neo4j.sh: Bolt refused the credentials for user neo4j: {exc}", file=sys.stderr)
            sys.exit(3)
        last = exc
    time.sleep(1)
print(f"neo4j.sh: not ready in time; last error: {last!r}", file=sys.stderr)
sys.exit(1)
PYEOF
}

cmd_start() {
  abs_home
  local pid
  if pid="$(running_pid)"; then
    log "already running (pid $pid) bolt://127.0.0.1:$(conf_port bolt) http://127.0.0.1:$(conf_port http)/"
    if [[ "$(conf_port bolt)" != "$BOLT_PORT" || "$(conf_port http)" != "$HTTP_PORT" ]]; then
      log "warning: it was started with other ports than NEO4J_BOLT_PORT/NEO4J_HTTP_PORT now ask for"
    fi
    return 0
  fi
  rm -f "$PID_FILE"
  cmd_install
  check_java
  port_in_use "$BOLT_PORT" && die "port $BOLT_PORT (Bolt) is already in use on 127.0.0.1"
  port_in_use "$HTTP_PORT" && die "port $HTTP_PORT (HTTP) is already in use on 127.0.0.1"

  write_conf
  if [[ -n "${NEO4J_PASSWORD:-}" ]]; then set_initial_password; fi

  local -a jvm=(
    "-Xmx$HEAP"
    -XX:+UseG1GC
    -XX:-OmitStackTraceInFastThrow
    -XX:+UnlockExperimentalVMOptions
    -XX:+TrustFinalNonStaticFields
    -XX:+DisableExplicitGC
    -XX:+ExitOnOutOfMemoryError
    -Djdk.nio.maxCachedBufferSize=1024
    -Dio.netty.tryReflectionSetAccessible=true
    -Djdk.tls.ephemeralDHKeySize=2048
    -Djdk.tls.rejectClientInitiatedRenegotiation=true
    -Dlog4j2.disable.jmx=true
    --add-opens=java.base/java.nio=ALL-UNNAMED
    --add-opens=java.base/java.io=ALL-UNNAMED
    --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  )
  # shellcheck disable=SC2206  # NEO4J_JAVA_OPTS is a word list on purpose
  [[ -n "${NEO4J_JAVA_OPTS:-}" ]] && jvm+=(${NEO4J_JAVA_OPTS})

  local setsid=()
  command -v setsid >/dev/null 2>&1 && setsid=(setsid)
  log "starting Neo4j (home $HOME_DIR, bolt 127.0.0.1:$BOLT_PORT, http 127.0.0.1:$HTTP_PORT, auth $([[ -n "${NEO4J_PASSWORD:-}" ]] && echo on || echo off))"
  echo "=== start $(date -u +%Y-%m-%dT%H:%M:%SZ) ===" >>"$CONSOLE_LOG"
  (
    cd "$HOME_DIR"
    exec "${setsid[@]}" "$JAVA" "${jvm[@]}" -cp "$LIB_DIR/*" "$MAIN_CLASS" \
      "--home-dir=$HOME_DIR" "--config-dir=$CONF_DIR" --console-mode \
      </dev/null >>"$CONSOLE_LOG" 2>&1
  ) &
  pid=$!
  echo "$pid" >"$PID_FILE"

  local started=$SECONDS rc=0
  wait_ready "$pid" || rc=$?
  if (( rc == 0 )); then
    log "ready in $((SECONDS - started))s (pid $pid): bolt://127.0.0.1:$BOLT_PORT  http://127.0.0.1:$HTTP_PORT/browser/"
    return 0
  fi
  case $rc in
    1) log "ERROR: Neo4j was not ready within ${READY_TIMEOUT}s" ;;
    2) log "ERROR: Neo4j exited during start-up" ;;
    3) log "ERROR: authentication failed; a home dir keeps the password it was first created with (use a fresh NEO4J_HOME_DIR)" ;;
    *) log "ERROR: readiness check failed (rc $rc)" ;;
  esac
  print_log_tail 60
  if pid_is_ours "$pid"; then
    log "stopping the half-started server (pid $pid)"
    terminate "$pid" || log "warning: pid $pid did not exit within ${STOP_TIMEOUT}s"
  fi
  pid_is_ours "$pid" || rm -f "$PID_FILE"
  exit 1
}

cmd_stop() {
  abs_home
  local pid
  if ! pid="$(running_pid)"; then
    [[ -f "$PID_FILE" ]] && { log "removing stale pid file $PID_FILE"; rm -f "$PID_FILE"; }
    log "not running (home $HOME_DIR)"
    return 0
  fi
  log "stopping Neo4j (pid $pid, $(conf_ports), home $HOME_DIR)"
  if ! terminate "$pid"; then
    print_log_tail 30
    die "pid $pid did not exit within ${STOP_TIMEOUT}s after SIGTERM; pid file kept"
  fi
  rm -f "$PID_FILE"
  log "stopped"
}

cmd_status() {
  abs_home
  local pid
  if pid="$(running_pid)"; then
    echo "running pid=$pid $(conf_ports) home=$HOME_DIR"
    return 0
  fi
  if [[ -n "$(conf_port bolt)" ]]; then
    echo "stopped home=$HOME_DIR (last started with $(conf_ports); the next start uses" \
      "NEO4J_BOLT_PORT/NEO4J_HTTP_PORT, default 7687/7474)"
  else
    echo "stopped home=$HOME_DIR (never started: no conf/neo4j.conf)"
  fi
  return 3
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help | help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
