#!/usr/bin/env bash
# Builds what the GPU machine needs (it has Python 3.12, torch and CUDA, but
# no cargo and no package registry) into .gpu/ (git-ignored):
#   .gpu/kvtier-*.whl  the connector: an abi3 wheel (CPython >= 3.11), built
#                      on glibc 2.36 for x86_64, stripped
#   .gpu/kvbm          the daemon, release, stripped
#   .gpu/py/*.whl      pytest and its dependencies, for the contract tests
# On the GPU machine:
#   pip install --no-deps --target .gpu/site .gpu/kvtier-*.whl
#   PYTHONPATH=.gpu/site python connectors/bench/gpu_throughput.py --kvbm .gpu/kvbm
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu
if [ -z "${MATURIN:-}" ] && [ -x .venv/bin/maturin ]; then MATURIN=$PWD/.venv/bin/maturin; fi
MATURIN=${MATURIN:-maturin}
if ! command -v "$MATURIN" >/dev/null; then
    python3 -m venv .gpu/build-venv
    .gpu/build-venv/bin/pip install -q 'maturin>=1.7,<2'
    MATURIN=$PWD/.gpu/build-venv/bin/maturin
fi
PY=${KVTIER_PYTHON:-python3}
rm -f .gpu/kvtier-*.whl
# maturin reads connectors/pyproject.toml (which names the pyext crate).
(cd connectors && "$MATURIN" build --release --strip -i "$PY" -o ../.gpu)
cargo build --release -p kvbm
strip -o .gpu/kvbm target/release/kvbm
PIP=${PIP:-$(command -v .venv/bin/pip || echo pip3)}
rm -rf .gpu/py && "$PIP" download -q --no-deps -d .gpu/py pytest pluggy iniconfig packaging
ls -la .gpu .gpu/py
