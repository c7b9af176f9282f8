#!/usr/bin/env bash
# Install (if needed) and start a local PostgreSQL server with a `deltamem` role and database, for the
# multi-worker tests and the load script. Prints the connection URL. Safe to run again.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
if [ -z "$version" ]; then
  pg_createcluster "$(ls /usr/lib/postgresql | sort -V | tail -n 1)" main >/dev/null
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
fi
pg_ctlcluster "$version" main start 2>/dev/null || pg_ctlcluster "$version" main status >/dev/null
as_postgres() { su postgres -s /bin/sh -c "$1"; }
as_postgres "psql -qtAc \"select 1 from pg_roles where rolname='deltamem'\" | grep -q 1 || psql -qc \"create role deltamem login createdb password 'deltamem'\""
as_postgres "psql -qtAc \"select 1 from pg_database where datname='deltamem'\" | grep -q 1 || createdb -O deltamem deltamem"
echo "postgresql://deltamem:deltamem@localhost:5432/deltamem"
