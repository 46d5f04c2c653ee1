#!/usr/bin/env bash
# Train on one host with one or more GPUs: a single process drives every local GPU
# (the mesh spans them all; no jax.distributed needed).
#   launch/gpu_host.sh configs/dit_b.py /data/runs/dit_b [--config.x=y ...]
# Install jax with CUDA first:  pip install -e . 'jax[cuda12]'
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2; exit 2
fi
config=$1 workdir=$2; shift 2
cd "$(dirname "$0")/.."
# Let XLA take most of the GPU memory up front, as JAX does by default, but leave a margin.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m dtr_jax.main --config "$config" --workdir "$workdir" "$@"
