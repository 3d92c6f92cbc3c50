#!/usr/bin/env bash
# The test command (README's second command, and what CI runs): install, provide the test
# infrastructure (control plane, S3, Prometheus, helm, kubectl; cached after the first run),
# lint (style, and the import contracts in pyproject.toml), then the whole suite. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash hack/install.sh
if [ -f hack/setup-test-infra.sh ]; then
  bash hack/setup-test-infra.sh >/dev/null
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-logo
exec .venv/bin/pytest "$@"
