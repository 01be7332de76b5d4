#!/bin/bash
# The postgres:16 stand-in's entrypoint (scripts/compose-smoke): what the official image's
# does that compose.yaml relies on. An empty PGDATA is initialised (UTF8) with
# POSTGRES_USER as the superuser, POSTGRES_PASSWORD as its password and POSTGRES_DB
# created; the server listens on all addresses with password (scram) auth for the
# network and trust on the local socket (pg_isready and psql inside the container).
set -euo pipefail
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
if [ "${1:-}" = postgres ]; then
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 2775 /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
  fi
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    : "${POSTGRES_PASSWORD:?the postgres stand-in needs POSTGRES_PASSWORD}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [ "$db" != postgres ]; then
      pg_ctl -D "$PGDATA" -w -s -o "-c listen_addresses=''" start
      psql -v ON_ERROR_STOP=1 -q --username "$user" --dbname postgres \
        -c "CREATE DATABASE \"$db\""
      pg_ctl -D "$PGDATA" -w -s -m fast stop
    fi
    echo "postgres stand-in: initialised $PGDATA (user $user, database $db, UTF8)"
  fi
fi
exec "$@"
