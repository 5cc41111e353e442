#!/usr/bin/env bash
# Set up edgekit and run the end-to-end demo:
#   1. foundation: a small model -> keys -> trust -> sign -> verify -> inspect -> attacks refused;
#   2. fleet: mosquitto, the controller and three real agents; a model converted and rolled out
#      in waves (v1, v2), then a broken v3 that the devices' self-test refuses and the rollout
#      takes back by itself.
#
#   ./demo.sh                      both parts (a few minutes, most of it the first install)
#   ./demo.sh --part fleet         one part (foundation | fleet)
#   ./demo.sh --keep-running       leave the fleet up (dashboard, CLI) until Ctrl-C
#
# Files stay in demo-out/ (DEMO_DIR=... to change).
set -euo pipefail
cd "$(dirname "$0")"
.ci/setup.sh demo
exec .venv/bin/python -m edgekit.demo --dir "${DEMO_DIR:-demo-out}" "$@"
