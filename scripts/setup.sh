#!/usr/bin/env bash
# Install diffuse into ./.venv, with Fashion-MNIST from Debian where apt is there.
# Usage: bash scripts/setup.sh [test]   ("test" adds the test extras: pytest, diffusers, scipy, accelerate,
#                                        and Debian's chromium, which the report tests open pages in)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "apt could not install dataset-fashion-mnist; diffuse will download the files instead"
fi
if [ "${1:-}" = test ] && ! command -v chromium >/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null \
            || echo "apt could not install chromium; the report tests that open the page in a browser will be skipped"
    else
        echo "no apt-get: install Chromium as 'chromium' on PATH to run the report's browser tests (else they are skipped)"
    fi
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras=$([ "${1:-}" = test ] && echo "[test]" || echo "")
.venv/bin/python -m pip install -q -e ".${extras}"
