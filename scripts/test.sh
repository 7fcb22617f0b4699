#!/usr/bin/env bash
# Run every check and test of workflow-orchestrator.
#
# Works on a fresh Debian/Ubuntu machine where only the Rust toolchain is
# installed: missing system tools (redis-server, redis-tools, docker-compose,
# postgresql, python3-venv, chromium, chromium-driver) are installed from the distribution's packages
# with apt-get, and schemathesis from PyPI into a virtualenv at target/venv.
#
# The tests start their own private redis-server processes on loopback ports;
# this script never starts a shared Redis. After `cargo test`,
# scripts/schemathesis.sh fuzzes the HTTP API of a served binary against its
# OpenAPI document.
#
# Usage: scripts/test.sh [extra args passed to `cargo test --all-targets`]
#   e.g. scripts/test.sh -- --nocapture
#        scripts/test.sh store::
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() {
    printf '\n==================== %s ====================\n' "$*"
}

# Use sudo only when not root (and only when sudo exists).
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "error: not root and sudo is not installed; cannot install system packages" >&2
    fi
fi

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get not found; please install: $*" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        "${SUDO[@]}" apt-get update
        APT_UPDATED=1
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
}

# Fail with a clear message when a tool is still missing after installation.
require() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "error: $1 is still not on PATH after installing it" >&2
        exit 1
    fi
}

# The Debian package would start a system-wide redis-server on port 6379 as it
# installs; the tests run their own private servers, so forbid service starts
# during this one install with a temporary policy-rc.d (honoured by both
# invoke-rc.d and deb-systemd-invoke). An existing policy-rc.d is left alone.
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_CREATED=0
remove_policy_rc() {
    if [ "$POLICY_RC_CREATED" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$POLICY_RC"
        POLICY_RC_CREATED=0
    fi
}
forbid_service_starts() {
    if [ ! -e "$POLICY_RC" ]; then
        printf '#!/bin/sh\n# temporary, from workflow-orchestrator scripts/test.sh\nexit 101\n' \
            | "${SUDO[@]}" tee "$POLICY_RC" >/dev/null
        "${SUDO[@]}" chmod 0755 "$POLICY_RC"
        POLICY_RC_CREATED=1
    fi
}
trap remove_policy_rc EXIT

section "system dependencies"
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    echo "redis-server/redis-cli not found: installing redis-server and redis-tools"
    forbid_service_starts
    apt_install redis-server redis-tools
    remove_policy_rc
    require redis-server
    require redis-cli
fi
echo "redis-server: $(command -v redis-server) ($(redis-server --version))"

if ! command -v docker-compose >/dev/null 2>&1; then
    echo "docker-compose not found: installing docker-compose"
    apt_install docker-compose
    require docker-compose
fi
echo "docker-compose: $(command -v docker-compose) ($(docker-compose version --short 2>/dev/null || docker-compose version | head -n1))"

# PostgreSQL for the database-backup tests: they run a private server of their own from
# /usr/lib/postgresql/<version>/bin (initdb, postgres; as the `postgres` user the package creates,
# since postgres refuses root), and the backup runs pg_dump/pg_restore from PATH. The package
# would start a system-wide cluster on port 5432 as it installs: service starts are forbidden
# during the install, as for redis.
postgres_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1
}
if [ -z "$(postgres_bin)" ] || [ ! -x "$(postgres_bin)/initdb" ] || [ ! -x "$(postgres_bin)/postgres" ] \
    || ! command -v pg_dump >/dev/null 2>&1 || ! command -v pg_restore >/dev/null 2>&1 \
    || ! id -u postgres >/dev/null 2>&1; then
    echo "PostgreSQL not found: installing postgresql"
    forbid_service_starts
    apt_install postgresql
    remove_policy_rc
    require pg_dump
    require pg_restore
fi
echo "postgresql: $(postgres_bin) ($("$(postgres_bin)/postgres" --version)); pg_dump: $(command -v pg_dump)"

# Chromium and its WebDriver for the dashboard's browser tests (tests/ui.rs drives
# /usr/bin/chromium, headless, through /usr/bin/chromedriver on a loopback port; without them
# those tests fail, saying so).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "chromium/chromedriver not found: installing chromium and chromium-driver"
    apt_install chromium chromium-driver
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        echo "error: /usr/bin/chromium or /usr/bin/chromedriver is still missing after installing them" >&2
        exit 1
    fi
fi
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | tail -n1); $(/usr/bin/chromedriver --version)"

# rustfmt and clippy are rustup components that a minimal toolchain lacks.
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        if command -v rustup >/dev/null 2>&1; then
            echo "cargo ${component/rustfmt/fmt} not found: rustup component add $component"
            rustup component add "$component"
        else
            echo "error: cargo ${component/rustfmt/fmt} is missing and rustup is not available" >&2
            exit 1
        fi
    fi
done
echo "rust: $(rustc --version); $(cargo fmt --version); $(cargo clippy --version)"

# schemathesis (from PyPI, pinned) fuzzes the HTTP API against its OpenAPI document; it lives in
# a virtualenv under target/ so that nothing is installed into the system's Python.
SCHEMATHESIS_VERSION=4.32.5
VENV="$PWD/target/venv"
if [ "$("$VENV/bin/schemathesis" --version 2>/dev/null || true)" != "schemathesis, version $SCHEMATHESIS_VERSION" ]; then
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        echo "python3 with venv not found: installing python3 and python3-venv"
        apt_install python3 python3-venv
        require python3
    fi
    if [ ! -x "$VENV/bin/pip" ]; then
        echo "creating the virtualenv $VENV"
        python3 -m venv --clear "$VENV"
    fi
    echo "installing schemathesis==$SCHEMATHESIS_VERSION into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
echo "schemathesis: $("$VENV/bin/schemathesis" --version) ($VENV)"

section "docker-compose config check"
docker-compose -f docker/docker-compose.yml config -q
echo "docker/docker-compose.yml: OK"
docker-compose -f docker/docker-compose.cluster.yml config -q
echo "docker/docker-compose.cluster.yml: OK"

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy"
cargo clippy --all-targets -- -D warnings

section "cargo test"
TEST_LOG="$(mktemp)"
set +e
cargo test --all-targets "$@" 2>&1 | tee "$TEST_LOG"
TEST_STATUS=${PIPESTATUS[0]}
set -e
if [ "$TEST_STATUS" -ne 0 ]; then
    rm -f "$TEST_LOG"
    exit "$TEST_STATUS"
fi

section "schemathesis against a live server"
SCHEMATHESIS="$VENV/bin/schemathesis" scripts/schemathesis.sh

section "all checks passed"
# One closing line for whoever reads the end of this output: every cargo test binary's counts.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$TEST_LOG"
rm -f "$TEST_LOG"
