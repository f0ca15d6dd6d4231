#!/usr/bin/env bash
# bench/run.sh: Tally's benchmark suite.
#
# Builds the release binaries, starts tallyd itself in each configuration (1 node strict,
# 1 node fast, 3 nodes strict, 3 nodes fast: `strict`/`fast` is every limit's `ack:` in
# bench/limits/tally-<mode>.yaml), runs the matrix against it with tally-bench, and writes
#   bench/results/<date>-<host>.jsonl   one JSON line per cell (appended)
#   bench/results/<date>-<host>.md      a markdown section per suite run (appended)
# Every process it starts is stopped on exit (by pid), and its data dirs are removed.
#
# Matrix, per configuration:
#   plain ShouldRateLimit, closed loop: concurrency $CONCURRENCY x keys $KEYS (uniform)
#   token flow (check with hits_addend 0, then report $TOKENS_PER_OP tokens): rls and kuadrant
#   open loop at $OPEN_RATE op/s (latency from the scheduled send time)
#   accuracy: one new key with L = 1000, $ACCURACY_CONCURRENCY in flight, per API in $ACCURACY_APIS
#
# Knobs (environment):
#   DURATION=10             measured seconds per cell (tally-bench --duration; 500ms, 1m also work)
#   WARMUP=2                warm-up seconds per cell
#   CONFIGS="1-strict 1-fast 3-strict 3-fast"   which tallyd configurations ("" for none)
#   CONCURRENCY="1 16 64"   closed-loop concurrencies of the plain cells
#   KEYS="10000 1000000"    key counts of the plain cells
#   CONNECTIONS=2           HTTP/2 connections per cell (at most the concurrency)
#   TOKENS=1                0 skips the token-flow cells
#   TOKENS_PER_OP=100       tokens reported per token-flow operation
#   OPEN_RATE=2000          op/s of the open-loop cell; 0 skips it
#   ACCURACY=1              0 skips the accuracy cells
#   ACCURACY_APIS="rls kuadrant"  ACCURACY_CONCURRENCY=64  ACCURACY_DURATION=$DURATION
#   PIN=auto                auto: tallyd on CPU 0 and tally-bench on CPU 1 with taskset when
#                           there are 2+ CPUs; off: no pinning
#   BUILD=1                 0 uses the binaries already in target/release
#   RESULTS=bench/results/<date>-<host>.jsonl   where the JSON lines go (the .md beside it)
#   TALLYD_ARGS=""          extra tallyd flags for every node (e.g. "--batch-linger-us 50")
#   NOTE=""                 free text put in the markdown section
#   EXTERNAL_TARGET=127.0.0.1:PORT  also run the matrix against an already running server
#                           (another RLS implementation, configured like bench/limits/limitador.yaml)
#   EXTERNAL_NAME=external  its label;  EXTERNAL_PID=  its pid (CPU and RSS);
#   EXTERNAL_KUADRANT=1     0 when it does not speak kuadrant.service.ratelimit.v1
#
# Example: a quick look at one configuration:
#   DURATION=2 WARMUP=1 CONFIGS=1-fast CONCURRENCY=16 KEYS=10000 bench/run.sh

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONFIGS=${CONFIGS-1-strict 1-fast 3-strict 3-fast}
CONCURRENCY=${CONCURRENCY:-1 16 64}
KEYS=${KEYS:-10000 1000000}
CONNECTIONS=${CONNECTIONS:-2}
TOKENS=${TOKENS:-1}
TOKENS_PER_OP=${TOKENS_PER_OP:-100}
OPEN_RATE=${OPEN_RATE:-2000}
ACCURACY=${ACCURACY:-1}
ACCURACY_APIS=${ACCURACY_APIS:-rls kuadrant}
ACCURACY_CONCURRENCY=${ACCURACY_CONCURRENCY:-64}
ACCURACY_DURATION=${ACCURACY_DURATION:-$DURATION}
ACCURACY_LIMIT=1000 # the `accuracy` limit of bench/limits/*.yaml
PIN=${PIN:-auto}
BUILD=${BUILD:-1}
HOST=$(uname -n)
DAY=$(date +%F)
RESULTS=${RESULTS:-bench/results/$DAY-$HOST.jsonl}
SUMMARY=${RESULTS%.jsonl}.md
TALLYD_ARGS=${TALLYD_ARGS:-}
NOTE=${NOTE:-}
EXTERNAL_TARGET=${EXTERNAL_TARGET:-}
EXTERNAL_NAME=${EXTERNAL_NAME:-external}
EXTERNAL_PID=${EXTERNAL_PID:-}
EXTERNAL_KUADRANT=${EXTERNAL_KUADRANT:-1}

TALLYD=target/release/tallyd
TALLY=target/release/tally
BENCH=target/release/tally-bench

log() { printf '\n== %s\n' "$*" >&2; }
die() {
    printf 'run.sh: %s\n' "$*" >&2
    exit 1
}

# --- processes and cleanup ---------------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tally-bench.XXXXXX")
PIDS=()        # every process this script started and has not yet seen stop
NODE_PIDS=()   # the running configuration's nodes
declare -A NODE_GRPC NODE_HTTP NODE_RAFT NODE_LOG

stop_pid() { # stop_pid PID: TERM, up to 10 s, then KILL
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

forget_pid() { # forget_pid PID: drop a stopped process from PIDS (its pid may be reused)
    local kept=() p
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
        [[ $p == "$1" ]] || kept+=("$p")
    done
    PIDS=(${kept[@]+"${kept[@]}"})
}

cleanup() {
    local pid
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do
        stop_pid "$pid"
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- ports ---------------------------------------------------------------------------------

declare -A USED_PORTS
# free_port: sets PORT to a port nothing listens on, below Linux's ephemeral range (32768+)
# so no outgoing connection holds it either.
free_port() {
    local p _
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 12000))
        [[ -n ${USED_PORTS[$p]:-} ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS[$p]=1
            PORT=$p
            return 0
        fi
    done
    die "no free port found"
}

# --- pinning -------------------------------------------------------------------------------

SERVER_PIN=()
LOAD_PIN=()
PINNING="none"
if [[ $PIN != off ]] && command -v taskset >/dev/null && (($(nproc) >= 2)); then
    SERVER_PIN=(taskset -c 0)
    LOAD_PIN=(taskset -c 1)
    PINNING="tallyd on CPU 0, tally-bench on CPU 1 (taskset)"
fi

# --- tallyd --------------------------------------------------------------------------------

http_ok() { # http_ok PORT PATH
    if command -v curl >/dev/null; then
        curl -sf -o /dev/null --max-time 1 "http://127.0.0.1:$1$2"
    else
        local reply
        reply=$(
            exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
            printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
            timeout 1 head -n1 <&3
        ) 2>/dev/null || return 1
        [[ $reply == *" 200 "* ]]
    fi
}

wait_http() { # wait_http ID PATH SECONDS
    local id=$1 path=$2 secs=$3
    for _ in $(seq $((secs * 10))); do
        http_ok "${NODE_HTTP[$id]}" "$path" && return 0
        if ! kill -0 "${NODE_PIDS[$((id - 1))]}" 2>/dev/null; then
            tail -n 20 "${NODE_LOG[$id]}" >&2 || true
            die "tallyd node $id exited (log above)"
        fi
        sleep 0.1
    done
    tail -n 20 "${NODE_LOG[$id]}" >&2 || true
    die "tallyd node $id: $path not OK after ${secs}s (log above)"
}

start_node() { # start_node ID MODE [--no-bootstrap]
    local id=$1 mode=$2 dir=$WORK/$CONFIG/node-$1
    shift 2
    mkdir -p "$dir"
    free_port
    NODE_GRPC[$id]=$PORT
    free_port
    NODE_HTTP[$id]=$PORT
    free_port
    NODE_RAFT[$id]=$PORT
    NODE_LOG[$id]=$WORK/$CONFIG-node-$id.log
    # shellcheck disable=SC2086 # TALLYD_ARGS is a list of flags
    ${SERVER_PIN[@]+"${SERVER_PIN[@]}"} "$TALLYD" \
        --node-id "$id" \
        --grpc-listen "127.0.0.1:${NODE_GRPC[$id]}" \
        --http-listen "127.0.0.1:${NODE_HTTP[$id]}" \
        --raft-listen "127.0.0.1:${NODE_RAFT[$id]}" \
        --data-dir "$dir/data" \
        --limits "bench/limits/tally-$mode.yaml" --limits-format native \
        --log warn $TALLYD_ARGS "$@" >"${NODE_LOG[$id]}" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    NODE_PIDS+=("$pid")
}

cluster() { # cluster ARGS...: `tally cluster` at node 1's Raft address, retried while electing

    for _ in $(seq 20); do
        if "$TALLY" --addr "127.0.0.1:${NODE_RAFT[1]}" --timeout 30s cluster "$@" >>"$WORK/cluster.log" 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    tail -n 20 "$WORK/cluster.log" >&2
    die "tally cluster $* failed (log above)"
}

start_config() { # start_config NODES MODE
    local nodes=$1 mode=$2 id
    NODE_PIDS=()
    start_node 1 "$mode"
    wait_http 1 /readyz 60
    for ((id = 2; id <= nodes; id++)); do
        start_node "$id" "$mode" --no-bootstrap
        wait_http "$id" /healthz 60
        cluster add-learner --id "$id" --node-addr "127.0.0.1:${NODE_RAFT[$id]}"
        cluster promote --id "$id"
    done
    for ((id = 1; id <= nodes; id++)); do
        wait_http "$id" /readyz 60
    done
}

stop_config() {
    local pid
    for pid in ${NODE_PIDS[@]+"${NODE_PIDS[@]}"}; do
        stop_pid "$pid"
        wait "$pid" 2>/dev/null || true
        forget_pid "$pid"
    done
    NODE_PIDS=()
    rm -rf "${WORK:?}/$CONFIG"
}

# --- cells ---------------------------------------------------------------------------------

FAILED=0
CELLS=0

# cell LABEL TARGET PIDS ARGS...: one tally-bench run; a failed cell is reported and counted,
# and the suite goes on.
cell() {
    local label=$1 target=$2 pids=$3 pid
    shift 3
    local pid_args=()
    for pid in $pids; do
        pid_args+=(--server-pid "$pid")
    done
    CELLS=$((CELLS + 1))
    echo >&2
    # In the background and waited for, so a signal to this script is handled at once.
    ${LOAD_PIN[@]+"${LOAD_PIN[@]}"} "$BENCH" --target "$target" --label "$label" \
        --duration "$DURATION" --warmup "$WARMUP" --results "$RESULTS" \
        ${pid_args[@]+"${pid_args[@]}"} "$@" >&2 &
    pid=$!
    PIDS+=("$pid")
    local status=0
    wait "$pid" || status=$?
    forget_pid "$pid"
    if ((status != 0)); then
        FAILED=$((FAILED + 1))
        echo "run.sh: cell failed (exit $status): $label $*" >&2
    fi
}

# matrix LABEL TARGET PIDS KUADRANT(0|1): every cell against one server.
matrix() {
    local label=$1 target=$2 pids=$3 kuadrant=$4 keys c api apis
    for keys in $KEYS; do
        for c in $CONCURRENCY; do
            cell "$label" "$target" "$pids" --concurrency "$c" \
                --connections "$((c < CONNECTIONS ? c : CONNECTIONS))" --keys "$keys"
        done
    done
    if [[ $TOKENS == 1 ]]; then
        apis=rls
        [[ $kuadrant == 1 ]] && apis="rls kuadrant"
        for api in $apis; do
            cell "$label" "$target" "$pids" --api "$api" --workload tokens \
                --tokens "$TOKENS_PER_OP" --descriptor-template 'kind=tokens,api_key={key}' \
                --concurrency 16 --connections "$CONNECTIONS" --keys 10000
        done
    fi
    if [[ $OPEN_RATE != 0 ]]; then
        cell "$label" "$target" "$pids" --rate "$OPEN_RATE" --concurrency 256 \
            --connections "$CONNECTIONS" --keys 10000
    fi
    if [[ $ACCURACY == 1 ]]; then
        for api in $ACCURACY_APIS; do
            [[ $api == kuadrant && $kuadrant != 1 ]] && continue
            DURATION=$ACCURACY_DURATION cell "$label" "$target" "$pids" --api "$api" \
                --workload accuracy --domain bench-accuracy --limit "$ACCURACY_LIMIT" \
                --concurrency "$ACCURACY_CONCURRENCY" --connections "$CONNECTIONS"
        done
    fi
}

# --- main ----------------------------------------------------------------------------------

for cfg in $CONFIGS; do
    case $cfg in
    1-strict | 1-fast | 3-strict | 3-fast) ;;
    *) die "unknown configuration '$cfg' (want 1-strict, 1-fast, 3-strict, 3-fast)" ;;
    esac
done
[[ -n $CONFIGS || -n $EXTERNAL_TARGET ]] || die "nothing to run: CONFIGS is empty and no EXTERNAL_TARGET"

if [[ $BUILD == 1 ]]; then
    log "building release binaries"
    cargo build --release --bin tallyd --bin tally --bin tally-bench
fi
for bin in "$TALLYD" "$TALLY" "$BENCH"; do
    [[ -x $bin ]] || die "$bin is missing (run with BUILD=1)"
done

mkdir -p "$(dirname "$RESULTS")"
touch "$RESULTS"
LINES_BEFORE=$(wc -l <"$RESULTS")
STARTED=$(date -u +%FT%TZ)
log "results: $RESULTS (summary: $SUMMARY); pinning: $PINNING; DURATION=$DURATION WARMUP=$WARMUP"

for CONFIG in $CONFIGS; do
    nodes=${CONFIG%%-*}
    mode=${CONFIG#*-}
    label="tally $nodes-node $mode"
    log "$label: starting"
    start_config "$nodes" "$mode"
    matrix "$label" "127.0.0.1:${NODE_GRPC[1]}" "${NODE_PIDS[*]}" 1
    for pid in "${NODE_PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || die "$label: a tallyd node died during the run"
    done
    stop_config
done

if [[ -n $EXTERNAL_TARGET ]]; then
    log "$EXTERNAL_NAME at $EXTERNAL_TARGET (already running)"
    matrix "$EXTERNAL_NAME" "$EXTERNAL_TARGET" "$EXTERNAL_PID" "$EXTERNAL_KUADRANT"
fi

# --- summary -------------------------------------------------------------------------------

tail -n "+$((LINES_BEFORE + 1))" "$RESULTS" >"$WORK/this-run.jsonl"
if [[ ! -s $SUMMARY ]]; then
    printf '# tally-bench results: %s\n\nOne section per bench/run.sh run; the JSON lines are in %s.\n' \
        "$(basename "${SUMMARY%.md}")" "$(basename "$RESULTS")" >"$SUMMARY"
fi
{
    echo
    echo "## $STARTED on $HOST"
    echo
    echo "- machine: $(nproc) CPU(s), $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //' || echo unknown), Linux $(uname -r)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "- pinning: $PINNING"
    echo "- per cell: ${DURATION} measured after ${WARMUP} warm-up (accuracy: ${ACCURACY_DURATION}, no warm-up); connections $CONNECTIONS"
    echo "- configurations: ${CONFIGS:-none}${EXTERNAL_TARGET:+; external: $EXTERNAL_NAME at $EXTERNAL_TARGET}${TALLYD_ARGS:+; tallyd $TALLYD_ARGS}"
    echo "- reproduce: \`DURATION=$DURATION WARMUP=$WARMUP CONFIGS=\"$CONFIGS\" CONCURRENCY=\"$CONCURRENCY\" KEYS=\"$KEYS\" bench/run.sh\`"
    [[ -n $NOTE ]] && echo "- note: $NOTE"
    echo "- cells: $CELLS, failed: $FAILED"
    echo
    "$BENCH" summarize "$WORK/this-run.jsonl"
} >>"$SUMMARY"
log "done: $CELLS cells ($FAILED failed); $RESULTS, $SUMMARY"
sed -n "/^## $STARTED/,\$p" "$SUMMARY"
((FAILED == 0))
