#!/usr/bin/env bash
# A minimal edge-deploy console in shell (bash 4+): mosquitto_pub, mosquitto_sub, jq.
# Written from docs/protocol.md alone. It sends one command to one device, prints
# the progress replies on stderr and the final reply (one JSON line) on stdout, and
# exits 0 when that reply is `done`, 1 when it is `failed` (code and message on
# stderr), 2 when no final reply came in time, 64 on a usage error.
#
#   console.sh [-h HOST] [-p PORT] [--prefix P] -d DEVICE [--timeout S] ping
#   console.sh ... -d DEVICE deploy BUNDLE --url URL
#   console.sh ... -d DEVICE deploy BUNDLE --chunks [--chunk-size BYTES]
#   console.sh ... -d DEVICE rollback MODEL [--to VERSION]
#
# BUNDLE is a directory with manifest.json, manifest.sig and the model file.
set -euo pipefail

HOST=localhost PORT=1883 PREFIX=edge DEVICE="" TIMEOUT=300
usage() { sed -n '2,13s/^# \{0,1\}//p' "$0" >&2; exit 64; }
need() { command -v "$1" >/dev/null || { echo "console.sh needs $1" >&2; exit 64; }; }
need mosquitto_pub; need mosquitto_sub; need jq

while [ $# -gt 0 ]; do
    case $1 in
        -h|--host) HOST=$2; shift 2 ;;
        -p|--port) PORT=$2; shift 2 ;;
        --prefix) PREFIX=$2; shift 2 ;;
        -d|--device) DEVICE=$2; shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -*) usage ;;
        *) break ;;
    esac
done
if [ -z "$DEVICE" ] || [ $# -lt 1 ]; then usage; fi
OP=$1; shift

RAND=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
CID="$OP-$RAND"                 # the command id: replies carry it back
CLIENT="console-sh-$RAND"       # our MQTT client id (never a device id)
CONN=(-h "$HOST" -p "$PORT")
TOPICS=(-t "$PREFIX/$DEVICE/reply")
SEND_CHUNKS=""

case $OP in
    ping|status)
        COMMAND=$(jq -cn --arg id "$CID" --arg op "$OP" '{id: $id, op: $op}') ;;
    rollback)
        [ $# -ge 1 ] || usage
        MODEL=$1 TO=""; shift
        if [ "${1:-}" = --to ]; then TO=$2; fi
        COMMAND=$(jq -cn --arg id "$CID" --arg m "$MODEL" --arg to "$TO" \
            '{id: $id, op: "rollback", model: $m} + (if $to == "" then {} else {to_version: $to} end)') ;;
    deploy)
        [ $# -ge 2 ] || usage
        BUNDLE=$1; shift
        URL="" CHUNK_SIZE=65536
        while [ $# -gt 0 ]; do
            case $1 in
                --url) URL=$2; shift 2 ;;
                --chunks) SEND_CHUNKS=yes; shift ;;
                --chunk-size) CHUNK_SIZE=$2; shift 2 ;;
                *) usage ;;
            esac
        done
        MODEL_FILE="$BUNDLE/$(jq -r .model.file "$BUNDLE/manifest.json")"
        if [ -n "$SEND_CHUNKS" ]; then
            SIZE=$(stat -c %s "$MODEL_FILE")
            TOTAL=$(( SIZE > 0 ? (SIZE + CHUNK_SIZE - 1) / CHUNK_SIZE : 1 ))
            TRANSFER="t-$RAND"
            TOPICS+=(-t "$PREFIX/transfer/$TRANSFER/missing")
            ARTIFACT=$(jq -cn --arg t "$TRANSFER" --argjson size "$CHUNK_SIZE" --argjson n "$TOTAL" \
                '{kind: "mqtt", transfer_id: $t, chunk_size: $size, chunks: $n}')
        elif [ -n "$URL" ]; then
            ARTIFACT=$(jq -cn --arg url "$URL" '{kind: "url", url: $url}')
        else
            usage
        fi
        SIGNATURE=""   # manifest.sig is base64 text; no file, no signature key
        if [ -f "$BUNDLE/manifest.sig" ]; then
            SIGNATURE="\"signature\":$(tr -d ' \r\n' < "$BUNDLE/manifest.sig" | jq -Rs .),"
        fi
        NOW=$(date +%s)
        # The manifest goes in byte for byte: the signature covers its canonical form
        # with every key (nulls too), and jq may rewrite numbers (1.0 becomes 1).
        COMMAND=$(printf '{"id":"%s","op":"deploy","issued_at":%s,"expires_at":%s,%s"artifact":%s,"manifest":%s}' \
            "$CID" "$NOW" "$((NOW + ${TIMEOUT%.*}))" "$SIGNATURE" "$ARTIFACT" "$(cat "$BUNDLE/manifest.json")") ;;
    *) usage ;;
esac

# Chunk i of the model file, as a Chunk message on one line.
chunk_message() {
    local data sum
    data=$(dd if="$MODEL_FILE" bs="$CHUNK_SIZE" skip="$1" count=1 status=none | base64 -w0)
    sum=$(dd if="$MODEL_FILE" bs="$CHUNK_SIZE" skip="$1" count=1 status=none | sha256sum)
    printf '{"transfer_id":"%s","index":%d,"total":%d,"data":"%s","sha256":"%s"}\n' \
        "$TRANSFER" "$1" "$TOTAL" "$data" "${sum%% *}"
}

# Answer a ChunkRequest: publish every chunk it lists, one mosquitto_pub for them all.
send_chunks() {
    local index
    jq -r --arg t "$TRANSFER" 'select(.transfer_id == $t) | .missing[]' <<<"$1" |
        while read -r index; do
            if [ "$index" -lt "$TOTAL" ]; then chunk_message "$index"; fi
        done |
        mosquitto_pub "${CONN[@]}" -q 1 -t "$PREFIX/transfer/$TRANSFER" -l ||
        echo "could not answer a chunk request: $1" >&2
}

# A persistent session holds our subscriptions from before the command is sent, so
# a reply (or chunk request) that comes before we listen again is kept for us.
if ! mosquitto_sub "${CONN[@]}" -i "$CLIENT" -c -q 1 "${TOPICS[@]}" -E; then
    echo "cannot subscribe at the broker $HOST:$PORT" >&2
    exit 2
fi
cleanup() {
    [ -n "${SUB_PID:-}" ] && kill "$SUB_PID" 2>/dev/null
    # Connecting with a clean session drops the persistent one.
    mosquitto_sub "${CONN[@]}" -i "$CLIENT" "${TOPICS[@]}" -E 2>/dev/null || true
}
trap cleanup EXIT

printf '%s' "$COMMAND" | mosquitto_pub "${CONN[@]}" -q 1 -t "$PREFIX/$DEVICE/cmd" -s

coproc SUB { exec mosquitto_sub "${CONN[@]}" -i "$CLIENT" -c -q 1 "${TOPICS[@]}" -v; }
exec {IN}<&"${SUB[0]}"
DEADLINE=$(( SECONDS + ${TIMEOUT%.*} ))
while :; do
    LEFT=$(( DEADLINE - SECONDS ))
    if [ "$LEFT" -le 0 ] || ! IFS= read -r -t "$LEFT" LINE <&"$IN"; then
        echo "no final reply from $DEVICE within ${TIMEOUT}s" >&2
        exit 2
    fi
    TOPIC=${LINE%% *} PAYLOAD=${LINE#* }
    if [ "$TOPIC" != "$PREFIX/$DEVICE/reply" ]; then
        [ -n "$SEND_CHUNKS" ] && send_chunks "$PAYLOAD"
        continue
    fi
    # Tabs between the fields; "-" for an empty one, or read would skip it.
    IFS=$'\t' read -r ID STATUS CODE STAGE PERCENT MESSAGE < <(jq -r \
        '[.id, .status, .code, .stage // .code, (.percent // "-" | tostring), .message] | @tsv' \
        <<<"$PAYLOAD" 2>/dev/null) || continue
    [ "$ID" = "$CID" ] || continue   # another console's command
    case $STATUS in
        done) printf '%s\n' "$PAYLOAD"; exit 0 ;;
        failed)
            printf '%s\n' "$PAYLOAD"
            echo "failed: $CODE: $MESSAGE" >&2
            exit 1 ;;
        *) if [ "$PERCENT" = - ]; then PERCENT=""; else PERCENT=" ${PERCENT%.*}%"; fi
           echo "$CID: $STATUS $STAGE$PERCENT" >&2 ;;
    esac
done
