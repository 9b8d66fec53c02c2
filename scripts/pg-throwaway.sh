#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1 for the distributed-study tests.
#   scripts/pg-throwaway.sh start   -> prints the URL to use as TUNER_TEST_PG_URL
#   scripts/pg-throwaway.sh stop
# Installs PostgreSQL from Debian packages when it is missing (needs root and apt).
set -euo pipefail
DIR=${TUNER_PG_DIR:-/tmp/tuner-pg}
PORT=${TUNER_PG_PORT:-54329}

bin_dir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && { echo "$d"; return; }; done
  command -v initdb >/dev/null 2>&1 && dirname "$(readlink -f "$(command -v initdb)")"
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-}" in
  start)
    BIN=$(bin_dir || true)
    if [ -z "$BIN" ]; then
      echo "installing PostgreSQL from Debian packages ..." >&2
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
      BIN=$(bin_dir)
    fi
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then useradd --system --home "$DIR" postgres; fi
    if [ -f "$DIR/data/postmaster.pid" ]; then as_pg "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$DIR"; mkdir -p "$DIR"
    [ "$(id -u)" = 0 ] && chown postgres "$DIR"
    as_pg "$BIN/initdb" -D "$DIR/data" -U tuner --auth=trust >/dev/null
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -o "-h 127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >/dev/null
    as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U tuner tuner
    echo "postgresql+psycopg://tuner@127.0.0.1:$PORT/tuner"
    ;;
  stop)
    BIN=$(bin_dir || true)
    if [ -n "$BIN" ] && [ -f "$DIR/data/postmaster.pid" ]; then
      as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null || true
    fi
    rm -rf "$DIR"
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
