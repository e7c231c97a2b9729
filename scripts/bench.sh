#!/usr/bin/env bash
# Benchmark a real `mfa-service serve` on PostgreSQL with a seeded population, each
# scenario against a bare grpc.aio server measured in the same run (--baseline).
#
#   scripts/bench.sh USERS [SCENARIO...]        (default scenarios: check-session login)
#
# Environment: WORKERS (server processes, default 1), LOADTEST_ARGS (more loadtest options,
# e.g. "--users 1000": draw from the first 1,000 seeded users only), PROFILE=1 (record the server with
# py-spy during the first scenario: profile-<scenario>.raw), PGBOUNCER=1 (the server talks to
# PostgreSQL through a PgBouncer in transaction mode started here, with
# MFA_DATABASE_POOLER=pgbouncer: Debian's pgbouncer), OUT (results folder, default
# a new temporary one; printed at the end), PGPORT (default 5432: another cluster, e.g. one
# with pg_stat_statements loaded), SETTLE (seconds to wait after seeding, before the
# server starts: SETTLE=61 makes every seeded session due for its idle slide, as a
# million users' seeding does by itself, so both sizes measure returning users). Needs
# PostgreSQL on 127.0.0.1:$PGPORT (trust, user
# postgres), as the test suite does. Leaves nothing behind but the results folder.
# After each scenario it prints what the database did for the sessions table (idle
# deadlines slid, blocks read from outside shared buffers): what makes two populations'
# figures comparable or not (docs/BENCHMARKS.md).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv/bin"
USERS="${1:?USERS}"; shift
SCENARIOS=("$@"); [ ${#SCENARIOS[@]} -gt 0 ] || SCENARIOS=(check-session login)
OUT="${OUT:-$(mktemp -d)}"; mkdir -p "$OUT"; cd "$OUT"
export MFA_KEYRING="$("$VENV/mfa-service" keys generate)" MFA_LOG_LEVEL=WARNING
export MFA_WORKERS="${WORKERS:-1}" PGPORT="${PGPORT:-5432}"
PORT=$("$VENV/python" -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
export MFA_LISTEN_ADDR=127.0.0.1:$PORT
DB="mfa_bench_${USERS}_$$"
createdb -h 127.0.0.1 -U postgres "$DB"
trap 'dropdb -h 127.0.0.1 -U postgres --force --if-exists "$DB" >/dev/null 2>&1 || true' EXIT
export MFA_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:$PGPORT/$DB"
"$VENV/mfa-service" migrate >/dev/null
"$VENV/mfa-service" loadtest seed --users "$USERS" --sessions "$USERS" --out users.jsonl | tail -1
# As a database in service would be: vacuumed and analysed, not racing autovacuum on the
# rows just written.
psql -h 127.0.0.1 -U postgres -d "$DB" -qc "VACUUM ANALYZE" >/dev/null
[ -n "${SETTLE:-}" ] && sleep "$SETTLE"
if [ -n "${PGBOUNCER:-}" ]; then
  BOUNCER_PORT=$("$VENV/python" -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
  chmod 755 "$OUT"
  printf '"postgres" ""\n' > users.txt
  cat > pgbouncer.ini <<INI
[databases]
mfa = host=127.0.0.1 port=$PGPORT dbname=$DB user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $OUT/users.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 200
INI
  chmod 644 users.txt pgbouncer.ini
  AS_USER=(); [ "$(id -u)" = 0 ] && AS_USER=(-u postgres)
  "$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" "${AS_USER[@]}" pgbouncer.ini > pgbouncer.log 2>&1 & BOUNCER=$!
  trap 'kill $BOUNCER 2>/dev/null || true; dropdb -h 127.0.0.1 -U postgres --force --if-exists "$DB" >/dev/null 2>&1 || true' EXIT
  until (exec 3<>/dev/tcp/127.0.0.1/$BOUNCER_PORT) 2>/dev/null; do sleep 0.1; done
  export MFA_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:$BOUNCER_PORT/mfa" MFA_DATABASE_POOLER=pgbouncer
fi
"$VENV/mfa-service" serve > serve.log 2>&1 & SERVER=$!
until "$VENV/mfa-service" health >/dev/null 2>&1; do sleep 0.2; done
CONNECTIONS=8; [ "$MFA_WORKERS" -gt 1 ] && CONNECTIONS=16
# What the database did during each scenario, for the sessions table: rows updated (the
# idle deadline's slide: a check whose session was last seen over a minute ago writes),
# and blocks read from outside shared buffers against blocks found in them.
db_stats() {
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d "$DB" -Atc "SELECT t.n_tup_upd, t.n_tup_ins,
      io.heap_blks_read, io.heap_blks_hit, io.idx_blks_read, io.idx_blks_hit, t.n_tup_hot_upd
      FROM pg_stat_user_tables t JOIN pg_statio_user_tables io USING (relid)
      WHERE t.relname = 'sessions'"
}
for S in "${SCENARIOS[@]}"; do
  BEFORE=$(db_stats)
  USERS_FILE=(--users-file users.jsonl)
  case "$S" in enroll|passkey) USERS_FILE=();; esac  # these make their own users
  "$VENV/mfa-service" loadtest --target "127.0.0.1:$PORT" --plaintext "${USERS_FILE[@]}" \
      --scenario "$S" --concurrency 64 --connections "$CONNECTIONS" --baseline ${LOADTEST_ARGS:-} \
      --report "$S.json" > "$S.out" 2>&1 &
  LOAD=$!
  if [ -n "${PROFILE:-}" ]; then
    sleep 16  # the baseline's 12 s and the service's warm-up
    "$VENV/py-spy" record -p "$SERVER" -d 8 -f raw -o "profile-$S.raw" --nonblocking \
        >/dev/null 2>&1 || true
    PROFILE=
  fi
  wait $LOAD || echo "loadtest $S failed (see $OUT/$S.out)"
  sed -n '/^rpc /,$p' "$S.out"
  sleep 2  # idle backends report their statistics within a second
  "$VENV/python" - "$BEFORE" "$(db_stats)" <<'PY'
import sys
before, after = ([int(v) for v in arg.split("|")] for arg in sys.argv[1:3])
d = [a - b for a, b in zip(after, before)]
share = lambda read, hit: f"{100 * read / (read + hit):.1f} %" if read + hit else "-"
print(f"sessions table: {d[0]} rows updated ({d[6]} heap-only), {d[1]} inserted; "
      f"blocks from outside shared "
      f"buffers: heap {share(d[2], d[3])} of {d[2] + d[3]}, index {share(d[4], d[5])} "
      f"of {d[4] + d[5]}")
PY
done
kill -TERM $SERVER; wait $SERVER || true
echo "results in $OUT"
