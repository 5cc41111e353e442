#!/usr/bin/env bash
# Set up edgekit and run the end-to-end demo of what exists today:
# build a small model -> keys -> trust -> sign -> verify -> inspect -> attacks refused.
set -euo pipefail
cd "$(dirname "$0")"
.ci/setup.sh convert
exec .venv/bin/python -m edgekit.demo --dir "${DEMO_DIR:-demo-out}" "$@"
