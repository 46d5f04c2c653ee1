#!/usr/bin/env bash
# The measurements of BENCHMARKS.md, one per name, each a markdown table on stdout and in
# $OUT/<name>.md (default benchmarks/results/). Every command finishes in a few minutes.
#
#   benchmarks/run_all.sh cpu              # the CPU tables (2-core machine: ~25 min)
#   benchmarks/run_all.sh gpu              # the GPU tables (one H100/A100: ~25 min)
#   benchmarks/run_all.sh gpu xl_train     # one of them
#   benchmarks/run_all.sh plan             # the TPU plans (needs libtpu, no TPU: hours)
#
# On a bare accelerator host (jax, flax, optax, orbax, numpy, torch; no ml_collections):
#   pip download ml-collections --no-deps -d .whl     # once, where a registry is reachable
#   pip install --no-deps .whl/*.whl                  # on the host (pure Python, ~80 KB)
# Run from the repository root; nothing else is installed or downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"

run() {  # run NAME ARGS...: python -m ARGS, the table to stdout and $OUT/NAME.md
  local name=$1
  shift
  echo "== $name: python -m $*" >&2
  python -m "$@" | tee "$OUT/$name.md"
}

BF16=(--set model.dtype=bfloat16)
declare -A CPU=(
  [matmul]="benchmarks.matmul --size 1024,2048"
  [digits_train]="benchmarks.train_step --config configs/digits.py --torch eager,compiled --steps 20 --rounds 5"
  [s2_train]="benchmarks.train_step --config configs/dit_s.py --batch 8 --steps 3 --rounds 8 --torch eager,compiled"
  [digits_sample]="benchmarks.sample --config configs/digits.py --batch 64 --kinds none,dtr --torch eager,compiled"
  # every fixed-step sampler of each objective at 25 steps (Heun: 50 model calls)
  [digits_samplers]="benchmarks.sample --config configs/digits.py --batch 64 --kinds dtr --samplers ddpm,ddim,dpmpp_2m --num-steps 25"
  [digits_flow_samplers]="benchmarks.sample --config configs/digits_flow.py --batch 64 --kinds dtr --samplers euler,heun,euler_maruyama --num-steps 25"
  [xl_compile]="benchmarks.train_step --config configs/dit_xl.py --batch 2 --kinds dtr ${BF16[*]} --vary model.scan_blocks=false,true --compile-only"
  [extract]="benchmarks.extract --batch 2"
  [cost]="benchmarks.train_step --config configs/dit_s.py --batch 4 --kinds dtr --vary model.name=DiT-S/2,DiT-B/2,DiT-L/2 --steps 1 --rounds 3"
  # the ADM U-Net (digits, ADM-XS): none / dtr, JAX against the same PyTorch U-Net, eager
  [unet_train]="benchmarks.train_step --config configs/digits_unet.py --kinds none,dtr --torch eager --torch-kinds none,dtr --steps 10 --rounds 5"
)
declare -A GPU=(
  [matmul]="benchmarks.matmul --size 4096,8192,16384"
  # DTR / none and MFU (JAX alone: 75% of the GPU), then remat and cuDNN attention
  [b2_train]="benchmarks.train_step --config configs/dit_b.py --batch 256 ${BF16[*]} --kinds none,dtr --steps 10 --rounds 5"
  [b2_options]="benchmarks.train_step --config configs/dit_b.py --batch 256 ${BF16[*]} --kinds dtr --vary model.attention=xla,cudnn --vary model.remat_policy=,dots_with_no_batch_dims_saveable"
  [xl_train]="benchmarks.train_step --config configs/dit_xl.py --batch 64 ${BF16[*]} --set model.attention=cudnn --kinds none,dtr --steps 10 --rounds 5"
  # compile time with and without scan, and the largest batch (XLA's account vs the limit)
  [xl_compile]="benchmarks.train_step --config configs/dit_xl.py --batch 64 ${BF16[*]} --kinds dtr --vary model.scan_blocks=false,true --compile-only"
  [b2_max_batch]="benchmarks.train_step --config configs/dit_b.py ${BF16[*]} --kinds dtr --vary global_batch_size=256,512,768,1024 --vary model.remat_policy=,dots_with_no_batch_dims_saveable --compile-only"
  [xl_max_batch]="benchmarks.train_step --config configs/dit_xl.py ${BF16[*]} --set model.scan_blocks=true --kinds dtr --vary global_batch_size=64,128,256 --vary model.remat_policy=,dots_with_no_batch_dims_saveable --compile-only"
  # JAX vs PyTorch (torch.compile and eager) on the same GPU, side by side
  [b2_torch]="benchmarks.train_step --config configs/dit_b.py --batch 64 ${BF16[*]} --kinds dtr --torch eager,compiled --steps 10 --rounds 5"
  [xl_torch]="benchmarks.train_step --config configs/dit_xl.py --batch 32 ${BF16[*]} --set model.attention=cudnn --kinds dtr --torch compiled --steps 10 --rounds 5"
  # 250-step DDPM with guidance: JAX vs the compiled PyTorch sampler
  [b2_sample]="benchmarks.sample --config configs/dit_b.py --batch 64 ${BF16[*]} --kinds none,dtr --torch compiled --rounds 3"
  # the README's cost table: train images/s of every size, and the extraction's
  [cost]="benchmarks.train_step --config configs/dit_s.py --batch 256 ${BF16[*]} --set model.scan_blocks=true --set model.remat_policy=dots_with_no_batch_dims_saveable --kinds dtr --vary model.name=DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2 --steps 5 --rounds 3"
  [extract]="benchmarks.extract --batch 64 --dtype bfloat16"
  # the paper's pixel-space U-Net (ADM-64, 64x64): DTR / none, then against PyTorch
  [adm64_train]="benchmarks.train_step --config configs/adm_imagenet64.py --batch 64 ${BF16[*]} --kinds none,dtr --steps 10 --rounds 5"
  [adm64_torch]="benchmarks.train_step --config configs/adm_imagenet64.py --batch 32 ${BF16[*]} --kinds dtr --torch compiled --steps 10 --rounds 5"
)

# TPU plans: compiled for the TPU without one (libtpu; any machine), resumable (rows kept
# in benchmarks/results/tpu_plans.jsonl); hours on a 2-core machine. The table last.
PLANS=(--out "$OUT/tpu_plans.jsonl")
declare -A PLAN=(
  [1_slices]="benchmarks.tpu_plans --configs dit_xl,dit_l,dit_b,dit_s,ffhq_dit_b --topologies v5e-8,v5p-8,v4-8,v6e-8,v5e-32 ${PLANS[*]}"
  [2_none]="benchmarks.tpu_plans --configs dit_b,dit_xl --topologies v5e-8,v5p-8 --kinds none --programs train ${PLANS[*]}"
  [3_kinds]="benchmarks.tpu_plans --configs dit_s,dit_l,dit_xl,dit_b,ffhq_dit_b --topologies v5e-8,v5p-8,v4-8,v6e-8,v5e-32 --kinds random,none --no-count ${PLANS[*]}"
  [4_meshes]="benchmarks.tpu_plans --configs dit_s,dit_l,dit_xl,dit_b,ffhq_dit_b --topologies v5e-8,v5e-32 --meshes data,fsdp --no-count ${PLANS[*]}"
  [5_table]="benchmarks.tpu_plans --table ${PLANS[*]}"
)

platform=${1:?usage: $0 cpu|gpu|plan [name]}
case $platform in
  cpu) declare -n TABLE=CPU ;;
  gpu) declare -n TABLE=GPU ;;
  plan) declare -n TABLE=PLAN ;;
  *) echo "usage: $0 cpu|gpu|plan [name]" >&2; exit 2 ;;
esac
names=("${@:2}")
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <(printf '%s\n' "${!TABLE[@]}" | sort)
fi
for name in "${names[@]}"; do
  [ -n "${TABLE[$name]:-}" ] || { echo "unknown measurement $name: ${!TABLE[*]}" >&2; exit 2; }
  # shellcheck disable=SC2086
  run "$name" ${TABLE[$name]}
done
