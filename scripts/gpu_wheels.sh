#!/usr/bin/env bash
# Download the wheels that the borrowed GPU machine lacks into .whl/ (git-ignored), at the versions of
# requirements.lock, for its Python 3.12 on x86-64. That machine has torch 2.11, transformers 5.17, numpy,
# tokenizers, safetensors, huggingface_hub and the rest of a data-science image, but no Composer,
# streaming, torch-optimi or OmegaConf, and no network. Then, on the GPU machine (docs/benchmarks.md):
#
#     scripts/gpu_wheels.sh                           # here, once (about 15 MB)
#     run: command "bash scripts/gpu_check.sh", carry [".whl"]
#
# flash-attn-4 cannot travel this way: its CuTe DSL runtime (nvidia-cutlass-dsl-libs-cu13) is a 92 MB
# wheel, over the 64 MiB one call carries; gpu_check.py reports it as not installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
mkdir -p "$out"
# What `import ettin_train.train` and a train.py run load that the GPU image does not hold.
names="mosaicml mosaicml-cli mosaicml-streaming torch-optimi omegaconf coolname catalogue dill backoff gql
graphql-core importlib-metadata paramiko bcrypt pynacl cryptography cffi pycparser prompt-toolkit questionary
wcwidth python-snappy cramjam ruamel-yaml truststore validators websockets zstd brotli httpx2 httpcore2"
pins=$(python3 - "$names" <<'PY'
import re, sys
names = set(sys.argv[1].split())
pins = {}
for line in open("requirements.lock"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)(.*)$", line.strip())
    if not m or m.group(1).lower() not in names:
        continue
    marker = m.group(3)
    if "python_full_version < '3.11'" in marker:  # the GPU machine runs 3.12
        continue
    pins[m.group(1).lower()] = m.group(2)
# zstd 1.5.7.2 has no cp312 manylinux wheel; 1.5.7.3 is the same zstd library, repackaged.
pins["zstd"] = "1.5.7.3"
missing = names - set(pins)
if missing:
    sys.exit(f"not in requirements.lock: {sorted(missing)}")
print(" ".join(f"{n}=={v}" for n, v in sorted(pins.items())))
PY
)
platforms=""
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux1_x86_64 any; do platforms="$platforms --platform $p"; done
failed=""
for pin in $pins; do
  if ! python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
       --implementation cp $platforms -d "$out" "$pin" 2> >(grep -v "^WARNING: Location" >&2); then
    failed="$failed $pin"
  fi
done
# Keep one version of each (two stop the whole install there).
ls "$out"
du -sh "$out"
if [ -n "$failed" ]; then echo "no wheel for:$failed" >&2; exit 1; fi
