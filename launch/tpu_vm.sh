#!/usr/bin/env bash
# Train on a Cloud TPU VM slice or pod: the same command runs on every worker.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/dit_b.py gs://BUCKET/runs/dit_b [--config.x=y ...]
# Each worker installs the project (the files of this checkout that git does not ignore,
# edits included; not .venv/, workdirs/ or downloaded weights: copied to ~/dtr_jax) with
# the jax and libtpu versions the TPU plans of BENCHMARKS.md were compiled with
# (JAX_TPU, below), then plans the run on the whole slice (`--mode plan`: the programs
# compiled for these chips, ~/dtr_jax_plan.log) and starts training only if it fits;
# jax.distributed.initialize() finds the other workers by itself and every host reads
# its own shard of each global batch. The workdir must be shared (gs://).
set -euo pipefail
JAX_TPU=${JAX_TPU:-'jax[tpu]==0.10.2'}  # jax 0.10.2 + libtpu 0.0.42.1: the versions planned
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.field=value ...]" >&2; exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)

bundle=$(mktemp -t dtr_jax.XXXXXX.tar.gz)
trap 'rm -f "$bundle"' EXIT
(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 tar -czf "$bundle" --)
gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all "$bundle" "$tpu":~/dtr_jax_src.tar.gz
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  rm -rf ~/dtr_jax && mkdir ~/dtr_jax && tar -xzf ~/dtr_jax_src.tar.gz -C ~/dtr_jax
  cd ~/dtr_jax
  pip install -q -e . '$JAX_TPU'
  if ! DTR_MULTIHOST=1 python -m dtr_jax.main --config $config --mode plan $* \
      > ~/dtr_jax_plan.log 2>&1; then
    tail -n 20 ~/dtr_jax_plan.log; echo 'not started: the plan failed (~/dtr_jax_plan.log)'
    exit 1
  fi
  DTR_MULTIHOST=1 nohup python -m dtr_jax.main --config $config --workdir $workdir $* \
    > ~/dtr_jax_train.log 2>&1 &
  echo started on \$(hostname)"
echo "Logs: gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=0 --command 'tail -f ~/dtr_jax_train.log'"
