#!/usr/bin/env bash
# Run a real single-node Apache Kafka 4.x broker (KRaft, broker+controller in
# one JVM) on loopback for Forest's integration tests. No Docker and no Kafka
# distribution: the jars come from Maven Central via scripts/kafka/pom.xml.
#
# Usage: scripts/kafka.sh {fetch|start|stop|restart|status|env|log}
#
#   fetch    resolve the broker jars into $FOREST_KAFKA_HOME/libs (skipped when
#            they are already there for the same pom)
#   start    fetch if needed, format a fresh temporary data dir, start the
#            broker in the background and wait until it is ready; prints
#            `export FOREST_TEST_BROKERS=...` on stdout, so
#            `eval "$(scripts/kafka.sh start)"` works. A no-op (besides
#            printing the export line) if a healthy broker is already running.
#   stop     stop the broker, wait for it to exit, remove its data dir
#            (FOREST_KAFKA_KEEP_DATA=1 keeps the data dir and says where)
#   restart  stop then start (a fresh, empty cluster)
#   status   exit 0 if running and answering, 3 if not
#   env      print `export FOREST_TEST_BROKERS=127.0.0.1:<port>`
#   log      print the tail of the running (or last) broker's server log
#
# Environment:
#   FOREST_KAFKA_HOME             state + jars (default ~/.cache/forest/kafka)
#   FOREST_KAFKA_PORT             PLAINTEXT port   (default 19092)
#   FOREST_KAFKA_CONTROLLER_PORT  CONTROLLER port  (default 19093)
#   FOREST_KAFKA_START_TIMEOUT    seconds to wait for readiness (default 90)
#   FOREST_KAFKA_HEAP_OPTS        default "-Xms512m -Xmx1g"
#   FOREST_KAFKA_GC_OPTS          the collector, default "-XX:+UseZGC"; this script's
#                                 G1 before session 26: "-XX:+UseG1GC -XX:MaxGCPauseMillis=20"
#                                 (Kafka's own scripts add -XX:InitiatingHeapOccupancyPercent=35
#                                 -XX:+ExplicitGCInvokesConcurrent). Choose it here, not in
#                                 FOREST_KAFKA_JVM_OPTS: two collectors stop the JVM at start.
#   FOREST_KAFKA_JVM_OPTS         extra JVM options
#   FOREST_KAFKA_KEEP_DATA        1: `stop` keeps the data dir
#   JAVA_HOME                     java to use (else `java` on PATH)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/kafka/pom.xml"

KAFKA_HOME_DIR="${FOREST_KAFKA_HOME:-$HOME/.cache/forest/kafka}"
LIBS="$KAFKA_HOME_DIR/libs"
RUN="$KAFKA_HOME_DIR/run"
PID_FILE="$RUN/kafka.pid"
DATA_FILE="$RUN/datadir"      # path of the running broker's data dir
PORT_FILE="$RUN/port"         # PLAINTEXT port of the running broker
LAST_LOG_FILE="$RUN/last-log" # server log of the last broker (for `log`)
STAMP_NAME=".forest-pom.sha256"

PORT="${FOREST_KAFKA_PORT:-19092}"
CONTROLLER_PORT="${FOREST_KAFKA_CONTROLLER_PORT:-19093}"
START_TIMEOUT="${FOREST_KAFKA_START_TIMEOUT:-90}"
# With ZGC (below) the free heap fell as low as 2 MiB in one benchmark at 1 GiB, with no
# allocation stall in any run; 2 GiB was no better in an adjacent pair (BENCHMARKS.md,
# session 26). Raise it here if the broker's GC log shows "Allocation Stall".
HEAP_OPTS="${FOREST_KAFKA_HEAP_OPTS:--Xms512m -Xmx1g}"
# ZGC, not G1 (Kafka's own default): under the latency benchmark's load G1's young pauses
# stopped the broker for about 20 ms about every 4 s, and a second with a pause was far more
# often a slow one (p99 at 100 K events/s: 32.0-38.1 ms with G1, 26.9 with ZGC, 2 runs each;
# at 90 K both 26.9). ZGC's pauses were almost all under 0.5 ms (the longest 4.5 ms);
# full-speed throughput and the broker's CPU were the same within the runs' spread
# (BENCHMARKS.md, session 26).
GC_OPTS="${FOREST_KAFKA_GC_OPTS:--XX:+UseZGC}"
JVM_OPTS="${FOREST_KAFKA_JVM_OPTS:-}"
HOST=127.0.0.1
STARTED_MARK="Kafka Server started"

say() { printf 'kafka: %s\n' "$*" >&2; }
die() { printf 'kafka: error: %s\n' "$*" >&2; exit 1; }

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- checks

JAVA=""
need_java() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    JAVA="$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    JAVA="$(command -v java)"
  else
    die "java not found (need Java 17+ on PATH or JAVA_HOME); e.g. apt-get install -y openjdk-17-jre-headless"
  fi
  local line ver major
  line="$("$JAVA" -version 2>&1 | head -n1)"
  ver="$(sed -n 's/.*version "\([^"]*\)".*/\1/p' <<<"$line")"
  [[ -n "$ver" ]] || die "cannot tell the Java version from: $line"
  major="${ver%%.*}"
  [[ "$major" == 1 ]] && major="$(cut -d. -f2 <<<"$ver")"
  [[ "$major" =~ ^[0-9]+$ && "$major" -ge 17 ]] \
    || die "Kafka 4 needs Java 17+, but $JAVA is $ver"
}

need_mvn() {
  command -v mvn >/dev/null 2>&1 \
    || die "mvn not found (needed once to fetch the Kafka jars); e.g. apt-get install -y maven"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Serialise fetch/start/stop across concurrent invocations. The fd is closed
# for the broker JVM (9>&- below), so the lock is never inherited by it.
lock() {
  mkdir -p "$RUN"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$RUN/lock"
    flock -w 300 9 || die "timed out waiting for the lock $RUN/lock"
  fi
}

# ---------------------------------------------------------------- fetch

pom_hash() { sha256sum "$POM" | cut -d' ' -f1; }

libs_ok() {
  [[ -f "$LIBS/$STAMP_NAME" ]] \
    && [[ "$(cat "$LIBS/$STAMP_NAME")" == "$(pom_hash)" ]] \
    && compgen -G "$LIBS/kafka_2.13-*.jar" >/dev/null
}

do_fetch() {
  [[ -f "$POM" ]] || die "missing $POM"
  if libs_ok; then
    say "jars already in $LIBS ($(kafka_version))"
    return 0
  fi
  need_mvn
  mkdir -p "$KAFKA_HOME_DIR"
  local t0 tmp mlog
  t0="$(now)"
  tmp="$(mktemp -d "$KAFKA_HOME_DIR/libs.tmp.XXXXXX")"
  mlog="$tmp.mvn.log"
  say "resolving Kafka jars from Maven Central into $LIBS ..."
  if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
        -DoutputDirectory="$tmp" -DincludeScope=runtime >"$mlog" 2>&1; then
    tail -n 40 "$mlog" >&2 || true
    rm -rf "$tmp"
    die "mvn dependency:copy-dependencies failed (full log: $mlog)"
  fi
  compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null \
    || { rm -rf "$tmp"; die "mvn succeeded but no kafka_2.13 jar was copied"; }
  pom_hash >"$tmp/$STAMP_NAME"
  rm -rf "$LIBS" "$mlog"
  mv "$tmp" "$LIBS"
  say "fetched $(ls "$LIBS"/*.jar | wc -l) jars ($(du -sh "$LIBS" | cut -f1)), $(kafka_version), in $(since "$t0")s"
}

kafka_version() {
  local j
  j="$(compgen -G "$LIBS/kafka_2.13-*.jar" | head -n1)"
  j="${j##*/kafka_2.13-}"
  echo "Kafka ${j%.jar}"
}

# ---------------------------------------------------------------- state

running_pid() {
  # Prints the pid and succeeds if our broker process is alive.
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against pid reuse: it must be our kafka.Kafka JVM.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'kafka\.Kafka' || return 1
  echo "$pid"
}

running_port() { cat "$PORT_FILE" 2>/dev/null || echo "$PORT"; }

healthy() {
  local pid
  pid="$(running_pid)" || return 1
  port_open "$(running_port)"
}

# Remove a data dir we created (it carries our marker file), nothing else.
remove_data_dir() {
  local d="$1"
  [[ -n "$d" && -d "$d" && -f "$d/.forest-kafka" ]] || return 0
  rm -rf -- "$d"
}

clear_state() {
  rm -f "$PID_FILE" "$DATA_FILE" "$PORT_FILE"
}

# ---------------------------------------------------------------- config

# A Kafka Uuid (what `StorageTool random-uuid` prints: 16 random bytes,
# URL-safe base64 without padding), made here to save a JVM start. Like
# Kafka's Uuid.randomUuid it avoids ids starting with '-'.
random_uuid() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ ${#id} -eq 22 && "$id" != -* ]] && break
  done
  echo "$id"
}

write_config() {
  local data="$1"
  cat >"$data/server.properties" <<EOF
# Written by scripts/kafka.sh: single-node KRaft broker+controller for tests.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT

log.dirs=$data/kafka-logs

# Topics: auto-created with 4 partitions, replication 1.
auto.create.topics.enable=true
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
delete.topic.enable=true

# Internal topics on a single node (few partitions: faster first use).
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

# Consumer groups: a short initial rebalance delay (Kafka's default is 3 s). At 0, the
# workers of one `forest processor --workers N` race their join requests: one often formed
# the group alone, took every partition, and the others' join revoked them all ~3 s later,
# mid-stream (session 10 measured it in 4-5 of 12 starts; it moved `forest bench` by up to
# 1.7 times). 300 ms lets members that start together join together, for a small cost per
# new group in the tests.
group.initial.rebalance.delay.ms=300

# No time-based retention: tests and benchmarks produce records with simulated event times
# (days to months old). With the default 7 days, segments rolled by those timestamps were
# deleted by the 5-minute retention check while a test was running, so records vanished
# before they were read (an intermittent end-to-end failure, and a benchmark that counted
# fewer records than it produced).
log.retention.ms=-1

# Log compaction on (default, stated for clarity); check often so compacted
# topics are cleaned soon in tests; modest dedupe buffer for a small heap.
log.cleaner.enable=true
log.cleaner.threads=1
log.cleaner.backoff.ms=1000
log.cleaner.dedupe.buffer.size=33554432

# Sized for a 2-core machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF

  cat >"$data/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/kafka.sh: everything to a file, nothing to the console. -->
<Configuration status="warn">
  <Appenders>
    <File name="server" fileName="$data/server.log" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="state.change.logger" level="warn"/>
    <Logger name="kafka.authorizer.logger" level="warn"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="warn"/>
    <!-- The multi-hundred-line "... values:" config dumps; see server.properties. -->
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="warn"/>
    <Root level="info">
      <AppenderRef ref="server"/>
    </Root>
  </Loggers>
</Configuration>
EOF

  # For the StorageTool runs: to stderr (captured in format.log).
  cat >"$data/log4j2-tools.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="warn"/>
    <Root level="info"><AppenderRef ref="stderr"/></Root>
  </Loggers>
</Configuration>
EOF
}

# ---------------------------------------------------------------- commands

print_env() { echo "export FOREST_TEST_BROKERS=$HOST:$(running_port)"; }

do_start() {
  local pid
  need_java
  lock
  if pid="$(running_pid)"; then
    if port_open "$(running_port)"; then
      say "already running (pid $pid) on $HOST:$(running_port)"
      print_env
      return 0
    fi
    say "broker pid $pid is alive but not answering on $HOST:$(running_port); restarting it"
    stop_locked
  elif [[ -f "$PID_FILE" || -f "$DATA_FILE" ]]; then
    say "clearing stale state of a broker that is gone"
    remove_data_dir "$(cat "$DATA_FILE" 2>/dev/null || true)"
    clear_state
  fi

  local p pid
  for p in "$PORT" "$CONTROLLER_PORT"; do
    if port_open "$p"; then die "port $HOST:$p is already in use by another process (set FOREST_KAFKA_PORT / FOREST_KAFKA_CONTROLLER_PORT)"; fi
  done

  do_fetch
  local cp="$LIBS/*" t0 data cluster_id
  t0="$(now)"
  data="$(mktemp -d "${TMPDIR:-/tmp}/forest-kafka.XXXXXX")"
  : >"$data/.forest-kafka"
  write_config "$data"
  echo "$data" >"$DATA_FILE"
  echo "$PORT" >"$PORT_FILE"
  echo "$data/server.log" >"$LAST_LOG_FILE"

  local log4j="-Dlog4j2.configurationFile=file:$data/log4j2.xml"
  local tlog4j="-Dlog4j2.configurationFile=file:$data/log4j2-tools.xml"
  cluster_id="$(random_uuid)"
  if ! "$JAVA" "$tlog4j" -cp "$cp" kafka.tools.StorageTool format --standalone \
        -t "$cluster_id" -c "$data/server.properties" >>"$data/format.log" 2>&1; then
    cat "$data/format.log" >&2
    die "StorageTool format failed (data dir kept: $data)"
  fi

  # setsid: own session, so the broker outlives the calling shell/terminal.
  # shellcheck disable=SC2086
  setsid "$JAVA" $HEAP_OPTS -server $GC_OPTS \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    "$log4j" -Dkafka.logs.dir="$data" $JVM_OPTS \
    -cp "$cp" kafka.Kafka "$data/server.properties" \
    </dev/null >"$data/stdout.log" 2>&1 9>&- &
  pid=$!
  echo "$pid" >"$PID_FILE"
  say "starting $(kafka_version) (pid $pid, data dir $data)"

  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_tail "$data"
      clear_state
      die "broker exited during startup (data dir kept: $data)"
    fi
    if port_open "$PORT" && grep -q "$STARTED_MARK" "$data/server.log" 2>/dev/null; then
      break
    fi
    if ((SECONDS >= deadline)); then
      show_tail "$data"
      kill -9 "$pid" 2>/dev/null || true
      clear_state
      die "broker not ready after ${START_TIMEOUT}s (killed; data dir kept: $data)"
    fi
    sleep 0.2
  done
  say "ready on $HOST:$PORT (controller $HOST:$CONTROLLER_PORT) in $(since "$t0")s"
  print_env
}

show_tail() {
  local data="$1" f
  for f in "$data/stdout.log" "$data/server.log"; do
    [[ -s "$f" ]] || continue
    printf -- '----- tail of %s -----\n' "$f" >&2
    tail -n 40 "$f" >&2
  done
}

stop_locked() {
  local pid data
  data="$(cat "$DATA_FILE" 2>/dev/null || true)"
  if pid="$(running_pid)"; then
    say "stopping broker (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 300; i++)); do # controlled shutdown: up to 30 s
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "still alive after 30s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
    fi
    kill -0 "$pid" 2>/dev/null && die "broker pid $pid would not die"
    say "stopped"
  else
    say "not running"
  fi
  if [[ -n "$data" && -d "$data" ]]; then
    if [[ "${FOREST_KAFKA_KEEP_DATA:-0}" == 1 ]]; then
      say "data dir kept: $data"
    else
      remove_data_dir "$data"
      rm -f "$LAST_LOG_FILE"
    fi
  fi
  clear_state
}

do_stop() {
  lock
  stop_locked
}

do_status() {
  local pid
  if pid="$(running_pid)"; then
    if port_open "$(running_port)"; then
      echo "running: pid $pid, broker $HOST:$(running_port), data dir $(cat "$DATA_FILE" 2>/dev/null)"
      return 0
    fi
    echo "starting or unhealthy: pid $pid alive, $HOST:$(running_port) not answering"
    return 3
  fi
  echo "not running"
  return 3
}

do_log() {
  local f
  f="$(cat "$LAST_LOG_FILE" 2>/dev/null || true)"
  [[ -n "$f" && -f "$f" ]] || die "no broker log (not started, or removed by stop)"
  tail -n "${1:-100}" "$f"
}

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  fetch) lock; do_fetch ;;
  start) do_start ;;
  stop) do_stop ;;
  restart) do_stop; exec "${BASH_SOURCE[0]}" start ;;
  status) do_status ;;
  env) print_env ;;
  log) do_log "$@" ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
