#!/bin/sh
# The redis:7 stand-in's entrypoint (scripts/compose-smoke): what the official image's does
# that compose.yaml relies on. Without a config file Redis runs in protected mode and
# refuses every client but loopback (DENIED), so the official image passes
# --protected-mode no; it runs as the redis user in /data.
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
  shift
  set -- redis-server --protected-mode no "$@"
  if [ "$(id -u)" = 0 ]; then
    chown -R redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
