#!/usr/bin/env bash
# The README's walkthrough, every step, against `relay dev` on embedded services
# (DATABASE_URL and REDIS_URL unset). It exits non-zero at the first step that does
# not do what the README says. Run from the repository: bash docs/walkthrough.sh
set -euo pipefail
cd "$(dirname "$0")/.."

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
step() { printf '\n== %s\n' "$*"; }
fail() { echo "walkthrough: $*" >&2; exit 1; }
wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.2
  done
}

PORT=$(free_port); RPORT=$(free_port)
work=$(mktemp -d)
export RELAY_DATA_DIR="$work/.relay"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
unset DATABASE_URL REDIS_URL BROKER_URL

step "relay dev, with a short retry schedule so that a dead letter comes in seconds"
RELAY_RETRY_SCHEDULE=0,1,1 relay dev --port "$PORT" >"$work/dev.log" 2>&1 &
pids+=($!)
wait_for 60 curl -sf "localhost:$PORT/readyz" || { cat "$work/dev.log"; fail "relay dev did not get ready"; }
RELAY_ADMIN_TOKEN=$(sed -n 's/^ *export RELAY_ADMIN_TOKEN=//p' "$work/dev.log")
[ -n "$RELAY_ADMIN_TOKEN" ] || fail "relay dev printed no admin token"
if grep -q "Warning" "$work/dev.log"; then cat "$work/dev.log"; fail "relay dev printed a warning"; fi
export RELAY_ADMIN_TOKEN

step "1. an operator creates a tenant; its API key is shown once"
KEY=$(curl -sf -X POST "localhost:$PORT/v1/tenants" -H "Authorization: Bearer $RELAY_ADMIN_TOKEN" \
      -H 'content-type: application/json' -d '{"name": "Acme Books"}' | field '["api_key"]')

step "2. the tenant creates a source for SoftLedger (token auth: the URL carries the secret)"
SOURCE=$(curl -sf -X POST "localhost:$PORT/v1/sources" -H "Authorization: Bearer $KEY" \
         -H 'content-type: application/json' -d '{"name": "SoftLedger", "auth": {"type": "token"}}')
INGEST_URL=$(echo "$SOURCE" | field '["ingest_url"]')
TOKEN=$(echo "$SOURCE" | field '["secret"]')

step "3. a target that wants paid bills; its signing secret is in the answer"
TARGET=$(curl -sf -X POST "localhost:$PORT/v1/targets" -H "Authorization: Bearer $KEY" \
         -H 'content-type: application/json' \
         -d "{\"url\": \"http://127.0.0.1:$RPORT/hooks\", \"filter\": {\"objectType\": [\"Bill\"], \"action\": [\"paid\"]}}")
SECRET=$(echo "$TARGET" | field '["secret"]')

step "4. a receiver that verifies the signature with the target's secret"
python3 docs/receiver.py "$RPORT" "$SECRET" >"$work/receiver.log" 2>&1 &
receiver=$!; pids+=($receiver)
wait_for 10 python3 -c "import socket; socket.create_connection(('127.0.0.1', $RPORT), 1)"

step "5. SoftLedger (or you) posts an event to the ingest URL with the token"
ANSWER=$(curl -sf -X POST "$INGEST_URL?token=$TOKEN" -H 'content-type: application/json' \
         -d '{"uuid": "6b1f0c2e-0001", "date": "2026-11-28T12:00:00Z", "objectType": "Bill",
              "action": "paid", "objectId": 4711, "tenantId": 42}')
EVENT=$(echo "$ANSWER" | field '["event_ids"][0]')
wait_for 20 grep -q "verified $EVENT" "$work/receiver.log" || { cat "$work/receiver.log"; fail "the event was not delivered and verified"; }
echo "delivered and verified: $EVENT"

step "6. the receiver fails: the next event is retried (0, 1, 1 s) and becomes a dead letter"
kill "$receiver"; wait "$receiver" 2>/dev/null || true
python3 docs/receiver.py "$RPORT" "$SECRET" --fail >>"$work/receiver.log" 2>&1 &
receiver=$!; pids+=($receiver)
wait_for 10 python3 -c "import socket; socket.create_connection(('127.0.0.1', $RPORT), 1)"
EVENT2=$(curl -sf -X POST "$INGEST_URL?token=$TOKEN" -H 'content-type: application/json' \
         -d '{"uuid": "6b1f0c2e-0002", "date": "2026-11-28T12:05:00Z", "objectType": "Bill",
              "action": "paid", "objectId": 4712, "tenantId": 42}' | field '["event_ids"][0]')
dead() { curl -sf "localhost:$PORT/v1/dead-letters" -H "Authorization: Bearer $KEY" | field '["data"][0]["id"]'; }
wait_for 30 dead || fail "no dead letter after the schedule"
DEAD=$(dead)
echo "dead letter: $DEAD"

step "7. relay dlq finds relay dev's database by itself (DATABASE_URL is unset)"
COLUMNS=80 relay dlq list | tee "$work/list.txt"
grep -q "$DEAD" "$work/list.txt" || fail "relay dlq list at 80 columns wrapped the id"
grep -q "1 dead letter$\| 1 dead letter " "$work/list.txt" || fail "relay dlq list: no '1 dead letter' title"
relay dlq show "$DEAD" --json | field '["status"]' | grep -qx dead || fail "relay dlq show"

step "8. the receiver is fixed; the dead letter is replayed by id and delivered"
kill "$receiver"; wait "$receiver" 2>/dev/null || true
python3 docs/receiver.py "$RPORT" "$SECRET" >>"$work/receiver.log" 2>&1 &
receiver=$!; pids+=($receiver)
wait_for 10 python3 -c "import socket; socket.create_connection(('127.0.0.1', $RPORT), 1)"
relay dlq replay "$DEAD" --yes
wait_for 20 grep -q "verified $EVENT2" "$work/receiver.log" || { cat "$work/receiver.log"; fail "the replayed dead letter was not delivered"; }
echo "replayed and verified: $EVENT2"

step "walkthrough: every step worked"
