#!/usr/bin/env bash
# Installs what the tests need (CPU torch first, so nothing pulls the CUDA build), then runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
# Headless Chromium and its WebDriver for the web app's browser test (Debian's packages), only when missing.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    sudo_if_needed=""
    [ "$(id -u)" -eq 0 ] || sudo_if_needed="sudo"
    $sudo_if_needed apt-get update -qq && $sudo_if_needed apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi
# --no-warn-conflicts: once open_clip_torch is installed --no-deps (below, or by the README's first
# command), pip would end this step with "ERROR: ... open-clip-torch requires timm, torchvision": its
# own dependencies, missing on purpose (see below), not a failure of this install.
# cluster: the launcher tests (joblib, submitit_local); docs: matplotlib, the notebook runner; ui: Gradio, for the web app's tests
python -m pip install -q --no-warn-conflicts -e ".[test,cluster,docs,ui]"
# open_clip_torch ships the real CLIP BPE vocabulary and OpenCLIP's reference tokenizer; --no-deps
# because its dependencies (torchvision) have no CPU build here and the tests never import it.
python -m pip install -q --no-deps open_clip_torch
# Two test processes of one torch thread each: most tests wait on subprocesses, FFmpeg or imports, so
# two workers keep both cores busy, and one thread each keeps them from fighting over the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
