#!/usr/bin/env bash
# The whole test suite on a fresh machine: set-up (idempotent), Debian Chromium for the browser
# tests if absent, then pytest with the venv's python. Extra arguments go to pytest
# (e.g. scripts/test.sh tests/test_server_errors.py -x). Exit status: pytest's; "no tests" fails.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QUANTLORA_VENV:-$ROOT/.venv}"
TIMEOUT="${QUANTLORA_TEST_TIMEOUT:-600}"
cd "$ROOT"

if ! bash scripts/setup.sh; then
  echo "========== scripts/test.sh: FAILED (scripts/setup.sh failed) ==========" >&2
  exit 1
fi

if grep -rqs --include='*.py' -E 'mark\.browser' tests/ && ! command -v chromium >/dev/null 2>&1; then
  echo "test.sh: the browser tests need Chromium; installing Debian's chromium"
  if [ "$(id -u)" -ne 0 ] || ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }; then
    echo "========== scripts/test.sh: FAILED (could not install chromium: run as root or apt-get install chromium) ==========" >&2
    exit 1
  fi
fi

start=$(date +%s)
"$VENV/bin/python" -m pytest -q --timeout "$TIMEOUT" "$@"
rc=$?
took=$(( $(date +%s) - start ))
if [ "$rc" -eq 5 ]; then
  echo "========== scripts/test.sh: FAILED: pytest collected no tests (exit 5) in ${took}s ==========" >&2
  exit 1
elif [ "$rc" -eq 0 ]; then
  echo "========== scripts/test.sh: passed in ${took}s =========="
else
  echo "========== scripts/test.sh: FAILED (pytest exit $rc) in ${took}s ==========" >&2
fi
exit "$rc"
