#!/usr/bin/env bash
# System packages the tests use: a real Prometheus server for the metrics test (Debian package `prometheus`).
set -euo pipefail
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo ">> installing prometheus (Debian package) for the metrics integration test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "!! prometheus not found and cannot apt-get install it: the metrics test will be skipped" >&2
  fi
fi
