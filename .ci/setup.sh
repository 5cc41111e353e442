#!/usr/bin/env bash
# Install what edgekit needs on a fresh Debian machine (as root) or a developer box, then create
# .venv with the requested extras. Idempotent: a second run only checks.
#
#   .ci/setup.sh [EXTRAS]      EXTRAS defaults to "all,dev", e.g. ".ci/setup.sh convert"
#
# "demo" is what ./demo.sh needs: the agent, convert and fleet extras, scikit-learn (the demo
# trains on its bundled digits) and the mosquitto broker.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all,dev}"
pip_extras="$extras"
pip_more=()
if [[ ",$extras," == *",demo,"* ]]; then
    pip_extras="$(printf '%s' ",$extras," | sed 's/,demo,/,agent,convert,fleet,/; s/^,//; s/,$//')"
    pip_more+=("scikit-learn>=1.3")
fi

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

apt_install() {
    # Only root on a Debian-like system installs packages; elsewhere we say what is missing.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        log "apt-get install $*"
        if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    else
        echo "missing system packages: $* (install them, then re-run)" >&2
        exit 1
    fi
}

# Python >= 3.10 (3.11 on Debian 12).
python="${PYTHON:-}"
if [ -z "$python" ]; then
    for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
        if command -v "$candidate" >/dev/null; then python="$candidate"; break; fi
    done
fi
if [ -z "$python" ]; then
    apt_install python3 python3-venv
    python=python3
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "edgekit needs Python >= 3.10; $python is $("$python" --version 2>&1)" >&2
    exit 1
fi
# Debian splits venv/ensurepip out of the interpreter package.
if [ ! -x .venv/bin/python ] && ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
    version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    apt_install "python${version}-venv" || apt_install python3-venv
fi
command -v sha256sum >/dev/null || apt_install coreutils
# The MQTT broker: tests and the demo start mosquitto on loopback ports.
if [[ ",$extras," == *",demo,"* ]]; then
    [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || apt_install mosquitto
fi
# Its command-line clients, PostgreSQL and Chromium: the test suite.
if [[ ",$extras," == *",dev,"* ]]; then
    missing=()
    [ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
    command -v openssl >/dev/null || missing+=(openssl)
    # PostgreSQL server binaries (tests start their own server) and Chromium (dashboard test).
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    command -v chromium >/dev/null || missing+=(chromium)
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi
log "pip install -e .[$pip_extras] ${pip_more[*]-}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$pip_extras]" \
    ${pip_more[@]+"${pip_more[@]}"}
log "ready: . .venv/bin/activate"
