#!/usr/bin/env bash
# Install, make sure PostgreSQL is up, run the whole test suite.
# Redis needs nothing here: the tests start their own private redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh

if [ "${TRAINYARD_TEST_SKIP_PG:-0}" != "1" ]; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
      echo "test: starting PostgreSQL"
      pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
      for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
    fi
  fi
  if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "test: PostgreSQL is not reachable at 127.0.0.1:5432 (set TRAINYARD_TEST_PG_URL, or TRAINYARD_TEST_SKIP_PG=1 for SQLite only)" >&2
    exit 1
  fi
fi

# The browser tests drive Debian's Chromium (no browser download: there is no internet
# at test time beyond the package mirrors). Install it when it is missing and we can.
if [ "${TRAINYARD_TEST_SKIP_BROWSER:-0}" != "1" ] && [ ! -x "${TRAINYARD_TEST_CHROMIUM:-/usr/bin/chromium}" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing Chromium for the browser tests (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test: no Chromium at ${TRAINYARD_TEST_CHROMIUM:-/usr/bin/chromium}; install the 'chromium' package or set TRAINYARD_TEST_SKIP_BROWSER=1" >&2
    exit 1
  fi
fi

# One test runs deploy/nginx.conf (the compose file's reverse proxy) in front of gunicorn.
if [ "${TRAINYARD_TEST_SKIP_NGINX:-0}" != "1" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing nginx for the reverse-proxy test (apt-get)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    echo "test: no nginx; install the 'nginx-light' package or set TRAINYARD_TEST_SKIP_NGINX=1" >&2
    exit 1
  fi
fi

# tests/test_monitoring_files.py checks deploy/monitoring with promtool and runs the
# prometheus binary itself (on a free port, for one test), both from Debian's
# `prometheus` package. Installing that package would also start a Prometheus service:
# a policy-rc.d answering 101 ("not allowed") keeps it from starting any service, and
# --no-install-recommends keeps out the node exporter.
if [ "${TRAINYARD_TEST_SKIP_PROMTOOL:-0}" != "1" ] && ! command -v promtool >/dev/null 2>&1 && [ ! -x /usr/bin/promtool ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing promtool for the alert-rule tests (apt-get, package prometheus, not started)"
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    installed=0
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null && installed=1
    if [ "$made_policy" = "1" ]; then rm -f /usr/sbin/policy-rc.d; fi
    if [ "$installed" != "1" ]; then
      echo "test: installing the 'prometheus' package failed; set TRAINYARD_TEST_SKIP_PROMTOOL=1 to skip its tests" >&2
      exit 1
    fi
  else
    echo "test: no promtool; install the 'prometheus' package (its service need not run) or set TRAINYARD_TEST_SKIP_PROMTOOL=1" >&2
    exit 1
  fi
fi

# The suite starts hundreds of Python processes (workers, CLI, reconcilers): let them
# cache the project's compiled modules, whatever the machine's default.
unset PYTHONDONTWRITEBYTECODE

# Tests run in TRAINYARD_TEST_PROCESSES parallel pytest-xdist processes (0 runs them all in
# this process). The default is one more than the machine's cores: the slow scenarios
# spend much of their time waiting on real processes (a worker starting, a lease running
# out, a heartbeat), and a third process on 2 cores kept the CPUs busy through those waits
# (the whole suite: 905 s with 2 processes, 717 s with 3). worksteal: the slow scenarios
# are few and long, so idle processes take work from busy ones instead of waiting on a
# fixed split.
processes=${TRAINYARD_TEST_PROCESSES:-$(( $(nproc 2>/dev/null || echo 1) + 1 ))}
if [ "$processes" = "0" ]; then
  exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
fi
# The slowest tests are listed at the end, and every test's time is in
# test-artifacts/junit.xml: the suite must stay under 15 minutes on 2 cores.
exec .venv/bin/python -m pytest -p no:cacheprovider -n "$processes" --dist worksteal --durations=15 \
  --junitxml=test-artifacts/junit.xml "$@"
