#!/usr/bin/env bash
# Submit the two stages of the recipe as dependent Slurm jobs: stage 2 (the anneal) starts once
# stage 1 has completed, from stage 1's latest checkpoint (checkpoint.init_from = stage 1's run
# dir). Either job may be preempted and requeued on the way; the dependency waits for it.
#
#   launch/slurm/chain_stages.sh [SBATCH_OPTION ...] STAGE1_CONFIG [--section.field=value ...] \
#       -- STAGE2_CONFIG [--section.field=value ...]
#
# e.g. launch/slurm/chain_stages.sh --nodes=32 --gpus-per-node=8 --time=48:00:00 \
#          configs/bamba-9b-stage1.yaml -- configs/bamba-9b-stage2-anneal.yaml
# Run from the repository root. The sbatch options apply to both jobs; the variables of
# train.sbatch (GPUS_PER_NODE, NCCL_*, ...) reach both through the environment.
set -euo pipefail

die() {
    echo "chain_stages.sh: error: $*" >&2
    exit 2
}
usage="usage: launch/slurm/chain_stages.sh [SBATCH_OPTION ...] STAGE1_CONFIG [OVERRIDE ...] \
-- STAGE2_CONFIG [OVERRIDE ...]"

[[ -f launch/slurm/train.sbatch ]] || die "run from the repository root (launch/slurm/train.sbatch not found)"
sbatch_options=()
while [[ $# -gt 0 && $1 == -* ]]; do
    sbatch_options+=("$1")
    shift
done
stage1=()
while [[ $# -gt 0 && $1 != -- ]]; do
    stage1+=("$1")
    shift
done
[[ $# -gt 0 ]] || die "no '--' before the stage 2 config; $usage"
shift
stage2=("$@")
[[ ${#stage1[@]} -gt 0 && ${#stage2[@]} -gt 0 ]] || die "$usage"
[[ -f ${stage1[0]} ]] || die "stage 1 config file not found: ${stage1[0]}"
[[ -f ${stage2[0]} ]] || die "stage 2 config file not found: ${stage2[0]}"

# Resolve stage 1's config as its job will (which also checks both configs before submitting).
run_dirs=$(python - "${stage1[@]}" -- "${stage2[@]}" <<'EOF'
import sys
from pathlib import Path
from fms_bamba.config import ConfigError, load_job_config

split = sys.argv.index("--")
stages = [sys.argv[1:split], sys.argv[split + 1:]]
try:
    for number, (config, *overrides) in enumerate(stages, 1):
        run_dir = load_job_config(config, [item.removeprefix("--") for item in overrides]).job.run_dir
        print(Path(run_dir).resolve())
except ConfigError as err:
    print(f"chain_stages.sh: error: stage {number}: {err}", file=sys.stderr)
    sys.exit(2)
EOF
)
stage1_run_dir=$(sed -n 1p <<<"$run_dirs")
stage2_run_dir=$(sed -n 2p <<<"$run_dirs")
[[ $stage1_run_dir != "$stage2_run_dir" ]] || die "both stages use the run dir $stage1_run_dir"

stage1_job=$(sbatch --parsable "${sbatch_options[@]}" --job-name=stage1 launch/slurm/train.sbatch "${stage1[@]}")
stage1_job=${stage1_job%%;*}
stage2_job=$(sbatch --parsable "${sbatch_options[@]}" --job-name=stage2 \
    --dependency="afterok:$stage1_job" --kill-on-invalid-dep=yes \
    launch/slurm/train.sbatch "${stage2[0]}" --checkpoint.init_from="$stage1_run_dir" "${stage2[@]:1}")
stage2_job=${stage2_job%%;*}
echo "stage 1: job $stage1_job, run dir $stage1_run_dir"
echo "stage 2: job $stage2_job, run dir $stage2_run_dir," \
    "starts from stage 1's latest checkpoint once job $stage1_job completes"
