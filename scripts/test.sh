#!/usr/bin/env bash
# Sets up the test environment if needed (virtualenv, packages, Debian's Chromium) and runs the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m e2e` or `bash scripts/test.sh tests/storage`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch is pinned so pip takes the CPU build instead of resolving a multi-GB CUDA one.
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[test]"
  echo "$stamp" > .venv/.installed
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests…"
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "chromium is missing: install it (e.g. 'sudo apt-get install chromium') to run the browser tests" >&2
  fi
fi
exec .venv/bin/python -m pytest -q "$@"
