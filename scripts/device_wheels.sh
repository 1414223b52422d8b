#!/usr/bin/env bash
# Fetches into .whl/ (git-ignored) the Python 3.12 manylinux wheels of the packages the
# device image lacks (docs/accelerators.md), at the versions of constraints.txt, so that
# `benchmarks/accelerator.py` runs there without a package registry. The image already has
# jax, flax, optax, orbax-checkpoint, numpy, scipy, pandas, matplotlib, scikit-learn,
# pyarrow, protobuf, etils, chex, pillow, absl-py, PyYAML, requests, tqdm, psutil and wrapt.
# Pure-Python packages published only as source (promise) are built into wheels here.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the trainer, its data pipeline and the MNIST data need beyond the image.
LACKING=(tensorflow-datasets tensorflow-metadata googleapis-common-protos array_record dm-tree
         immutabledict promise simple-parsing docstring_parser termcolor toml grain portpicker
         ml_collections dm_pix tensorboardX mlxtend importlib_resources)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
pip=(python3 -m pip)
rm -rf .whl && mkdir -p .whl
for name in "${LACKING[@]}"; do
  pattern="^$(echo "$name" | tr '[:upper:]' '[:lower:]' | sed 's/[-_]/[-_]/g')=="
  pin=$(grep -i "$pattern" constraints.txt | head -1)
  [ -n "$pin" ] || { echo "no version of $name in constraints.txt" >&2; exit 1; }
  if ! "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 \
       --implementation cp "${PLATFORMS[@]}" -d .whl "$pin" 2>/dev/null; then
    "${pip[@]}" wheel -q --no-deps -w .whl "$pin"  # a pure-Python source release
  fi
done
ls .whl
size=$(du -sm .whl | cut -f1)
echo "$(find .whl -name '*.whl' | wc -l) wheels, ${size} MiB in .whl/ (the device tool carries at most 64 MiB)"
[ "$size" -lt 60 ] || { echo "too large to travel with the tree" >&2; exit 1; }
