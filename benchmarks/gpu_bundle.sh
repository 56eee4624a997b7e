#!/usr/bin/env bash
# Build .gpu/site.tgz: the Python packages lorafit (and the benchmarks' TRL/DeepSpeed runs) need that the GPU
# machine's image lacks, for Python 3.12, with bitsandbytes trimmed to its CUDA 13 libraries (the full wheel is
# 43 MB; what travels to the device is capped at 64 MiB). Run from the project root, then name `.gpu` in the
# device call's carry and start the command with:
#   mkdir -p /tmp/site && tar xzf .gpu/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
rm -rf .gpu/whl .gpu/site && mkdir -p .gpu/whl .gpu/site
P="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
PY=${PYTHON:-.venv/bin/python}
for pkg in transformers==5.23.0 peft==0.21.2 datasets==5.2.0 pydantic==2.14.3 pydantic_core==2.50.4 \
           annotated-types==0.8.0 typing-inspection==0.4.5 bitsandbytes==0.50.2 trl==1.16.0 liger-kernel==0.8.5 \
           dill==0.4.1 multiprocess==0.70.19 jsonschema==4.25.1 jsonschema-specifications==2025.9.1 \
           referencing==0.37.0 rpds-py==2026.6.3 hjson==3.1.0; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .gpu/whl "$pkg"
done
# DeepSpeed ships only a source archive: build a pure-Python wheel (its CUDA ops compile at first use, JIT).
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w .gpu/whl deepspeed==0.19.8
for w in .gpu/whl/*.whl; do unzip -q -o "$w" -d .gpu/site; done
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*cuda132*' ! -name '*cpu*' -delete
tar czf .gpu/site.tgz -C .gpu/site . && rm -rf .gpu/site .gpu/whl
ls -la .gpu/site.tgz
