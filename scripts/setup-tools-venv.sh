#!/usr/bin/env bash
# The linters' own virtualenv, .venv-tools: checkov pins many packages of its own (boto3,
# pydantic, ...), which would fight the app's in .venv. Idempotent: a no-op when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-tools
SPEC="checkov>=3.2,<4"
if [ -x "$VENV/bin/checkov" ]; then
    exit 0
fi
echo "setup-tools-venv: installing $SPEC into $VENV" >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check "$SPEC"
"$VENV/bin/checkov" --version >/dev/null
