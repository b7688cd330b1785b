#!/usr/bin/env bash
# The figures in docs/performance.md, in one go, on a 2-GPU H200 host (nvidia-h200-x2):
#   bash benchmarks/h200_suite.sh OUT_DIR [GROUP ...]
# Groups: trainer-1b (1 GPU; issue 4), scaling-1b (FSDP 1 vs 2, HSDP 2x1), checkpoint-1b (sync vs
# async save), bamba-9b (FSDP2 over 2 GPUs, eager), bamba-9b-compile,
# bamba-9b-mb2-compile (micro-batch 2), bamba-9b-profile (that run with torch.profiler on steps
# 9-10: summary in OUT_DIR/9b-profile-rank0.txt), bamba-9b-fsdp-options (reshard_after_forward
# and reduce_dtype, micro-batch 2, compile), bamba-9b-best (the fastest configuration, profiled on
# steps 13-14), loss-match-1b (50 steps of bamba-1b on a learnable corpus, 4 sequences per step: every
# throughput option, plus the overrides in $FAST_SET, vs the reference mixer, eager, fp32 reduce; ';' between
# override sets runs one fast run per set), fused-op (the mixer's custom op vs mamba-ssm's
# direct call), loss-check (the fused LM-head cross-entropy vs float64, and its time and memory
# against autograd), bamba-9b-final (the kept configuration), bamba-9b-overlap (it with and without
# optimizer.overlap_step), bamba-9b-master (it with and without optimizer.master_weights), bamba-9b-nccl-proto
# (it with NCCL_PROTO=$NCCL_PROTO_SET, default Simple; plus $PROTO_SET), bamba-9b-nccl-channels (it with
# NCCL_MAX_NCHANNELS in $NCCL_CHANNELS, default "8 4"), bamba-9b-keep-last (it with
# reshard_after_forward=keep-last-N, N in $KEEP_LAST, default "8 16"), checkpoint-9b (one async save of
# Bamba-9B's 117 GB while training for each mode in $CKPT_MODES, default "async,async_process":
# written by a thread, then by DCP's checkpoint process; $CKPT_REPEATS saves of each, default 1; plus the
# overrides in $CKPT_SET; host buffers allocated before the warm-up unless CKPT_PREPARE=False), checkpoint-1b-prepare
# (one GPU: bamba-1b's async saves with the host buffers allocated at the first save, then at the start),
# trainer-1b-async-ckpt (one GPU: the trainer, bamba-1b, an async save every 100 steps, tokens/s per 10 steps), bamba-9b-power (the kept configuration with both GPUs' SM clock and power
# sampled every 0.5 s by nvidia-smi: OUT_DIR/9b-power.csv, summarised by benchmarks/power_summary.py),
# step-parts (one GPU: each matmul of a step with cuBLAS and cuBLASLt, weight layouts, the MLP with
# gate and up fused or not, the SSD chunk size; benchmarks/step_parts.py), all-gather-check (FSDP's
# all-gather on NCCL's kernels and on copy engines, alone and beside a matmul;
# benchmarks/all_gather_check.py), bamba-9b-copy-engine (the kept configuration with
# parallelism.all_gather=nccl, then as kept, copy-engine, plus $CE_SET), compute-9b (one GPU: Bamba-9B's forward+backward at
# micro-batch 2 without FSDP or optimizer, compiled as the trainer does, then eager;
# benchmarks/model_kernels.py), compute-9b-variants (the same, compiled, as kept and with a larger loss chunk,
# SSD chunk 128, inductor's coordinate-descent tuning), copy-engine-1gpu (one GPU: bamba-1b's trainer with
# parallelism.all_gather=copy-engine, then all-gather-check, on one rank; with NCCL_CTA_POLICY=0 or 1 in the
# environment, the all-gathers on a zero-CTA communicator of their own), bamba-9b-cta-policy (the kept
# configuration with NCCL_CTA_POLICY in $CTA_POLICIES, default "2 0 1": 2 is as kept, 0 and 1 give the
# reduce-scatters NCCL's default or efficiency policy, the all-gathers staying zero-CTA), copies-check (one
# GPU: FSDP2's three copies for one Bamba-9B block, torch's kernels against a memcpy per piece on the copy
# engines, alone and beside a matmul; benchmarks/copies_check.py), per-param-1gpu (one GPU: bamba-1b's trainer
# with the kept options under parallelism.sharding=per-param, on NCCL's all-gathers then copy engines, and fsdp2; losses
# compared, the kernels of two profiled steps counted; $PP_RUNS picks the runs, $PP_SET adds overrides),
# bamba-9b-variants (the kept configuration once per override set in $VARIANTS, ';' between sets, an empty set as kept;
# default "parallelism.sharding=per-param;"; $ROUNDS times, default 1; with $DEPTH, Bamba-9B's width at that many
# blocks, e.g. NPROC=1 DEPTH=12 on one GPU), attention-check (one GPU: a Bamba-9B attention layer on each SDPA backend,
# benchmarks/attention_check.py), float8-check (one GPU: each Linear of a Bamba-9B block in bf16 and fp8,
# per tensor and per row, benchmarks/float8_check.py).
# $NPROC sets the GPUs of the groups that run on two (default 2).
# Default: the first five.
# $STEPS_9B sets the steps of the kept configuration's runs (default 16; 12 before session 5). Each benchmark's whole
# output is kept in OUT_DIR/<name>.log.
set -uo pipefail
out=${1:?usage: h200_suite.sh OUT_DIR [GROUP ...]}
shift
groups=${*:-"trainer-1b scaling-1b checkpoint-1b bamba-9b bamba-9b-compile"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
seq="--seq-len 4096"
# The kept Bamba-9B configuration (docs/performance.md); groups below vary it. `--set` is last, so
# a group can add overrides after it.
final9b="benchmarks/train.py --preset bamba-9b $seq --micro-batch-size 2 --steps ${STEPS_9B:-16} --log-interval 4 --compile
  --workdir /tmp/b9f --set parallelism.reduce_dtype=bfloat16 parallelism.reshard_after_forward=keep-last-16
  optimizer.overlap_step=true optimizer.master_weights=true parallelism.all_gather=copy-engine"

bench() {  # name, seconds allowed, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "exit $? after $((SECONDS - start)) s"; grep -E "^(preset|step time|tokens/s/GPU|MFU|peak memory)|sync save|async|blocked" "$out/$name.log" || tail -5 "$out/$name.log"
}
torchrun2="torchrun --standalone --nproc_per_node=${NPROC:-2}"
split_sets() {  # "a b;c;" -> override_sets=("a b" "c" ""): ';' between sets, an empty set being no overrides
  local sets=$1; override_sets=()
  while [[ $sets == *";"* ]]; do override_sets+=("${sets%%;*}"); sets=${sets#*;}; done
  override_sets+=("$sets")
}

for group in $groups; do
  case $group in
    trainer-1b)
      bench 1b-fsdp1 150 python benchmarks/train.py --preset bamba-1b $seq --micro-batch-size 2 --steps 20 --workdir /tmp/b1 ;;
    scaling-1b)
      bench 1b-fsdp2 150 $torchrun2 benchmarks/train.py --preset bamba-1b $seq --micro-batch-size 2 --steps 20 --workdir /tmp/b2
      bench 1b-hsdp2x1 150 $torchrun2 benchmarks/train.py --preset bamba-1b $seq --micro-batch-size 2 --steps 20 --workdir /tmp/b3 --set parallelism.dp_replicate=2 ;;
    checkpoint-1b)
      bench 1b-checkpoint 300 python benchmarks/checkpoint.py configs/bamba-1b.yaml --out=/tmp/ckpt-bench ;;
    bamba-9b)
      bench 9b-fsdp2-mb1 240 $torchrun2 benchmarks/train.py --preset bamba-9b $seq --micro-batch-size 1 --steps 15 --workdir /tmp/b9 ;;
    bamba-9b-compile)
      bench 9b-fsdp2-mb1-compile 300 $torchrun2 benchmarks/train.py --preset bamba-9b $seq --micro-batch-size 1 --steps 15 --workdir /tmp/b9c --compile ;;
    bamba-9b-mb2-compile)
      bench 9b-fsdp2-mb2-compile 200 $torchrun2 benchmarks/train.py --preset bamba-9b $seq --micro-batch-size 2 --steps 12 --workdir /tmp/b9m2 --compile ;;
    bamba-9b-profile)  # the kept configuration, with $PROFILE_SET added
      bench 9b-profile 240 $torchrun2 $final9b profiling.enable=true profiling.start_step=9 profiling.steps=2 ${PROFILE_SET:-}
      cp /tmp/b9f/run/profile/rank0.txt "$out/9b-profile-rank0.txt"
      sed -n '/^per step/,/^$/p' "$out/9b-profile-rank0.txt" ;;
    bamba-9b-fsdp-options)
      m2="--preset bamba-9b $seq --micro-batch-size 2 --steps 12 --log-interval 4 --compile"
      bench 9b-mb2-never-bf16 150 $torchrun2 benchmarks/train.py $m2 --workdir /tmp/b9o \
        --set parallelism.reshard_after_forward=never parallelism.reduce_dtype=bfloat16
      bench 9b-mb2-never 150 $torchrun2 benchmarks/train.py $m2 --workdir /tmp/b9o --set parallelism.reshard_after_forward=never
      bench 9b-mb2-bf16 150 $torchrun2 benchmarks/train.py $m2 --workdir /tmp/b9o --set parallelism.reduce_dtype=bfloat16 ;;
    bamba-9b-best)
      bench 9b-best 240 $torchrun2 benchmarks/train.py --preset bamba-9b $seq --micro-batch-size 2 --steps 16 --log-interval 4 \
        --compile --workdir /tmp/b9b --set parallelism.reshard_after_forward=never parallelism.reduce_dtype=bfloat16 \
        profiling.enable=true profiling.start_step=13 profiling.steps=2
      cp /tmp/b9b/run/profile/rank0.txt "$out/9b-best-profile-rank0.txt"
      sed -n '/^per step/,/^$/p' "$out/9b-best-profile-rank0.txt" ;;
    loss-match-1b)  # 4 sequences per step on any $NPROC, so one GPU sees the batch two GPUs see
      lm="--preset bamba-1b $seq --micro-batch-size $((4 / ${NPROC:-2})) --steps 50 --log-interval 1 --learnable-data --workdir /tmp/lm"
      # The reference mixer holds more activations: at most 2 sequences per micro-batch, accumulated to 4
      bench 1b-loss-reference 300 $torchrun2 benchmarks/train.py $lm --run-name reference --micro-batch-size 2 \
        --set model.mixer_impl=reference training.global_batch_sequences=4
      split_sets "${FAST_SET:-}"
      for i in "${!override_sets[@]}"; do  # one fast run per override set, each against the reference
        bench 1b-loss-fast$i 200 $torchrun2 benchmarks/train.py $lm --run-name fast$i --compile \
          --set parallelism.reshard_after_forward=keep-last-16 parallelism.reduce_dtype=bfloat16 ${override_sets[$i]}
        echo "fast$i: ${override_sets[$i]}" | tee -a "$out/loss-match-1b.txt"
        python benchmarks/compare_losses.py /tmp/lm/fast$i /tmp/lm/reference | tee -a "$out/loss-match-1b.txt"
      done ;;
    fused-op)
      bench fused-op-check 180 python benchmarks/fused_op_check.py ;;
    loss-check)
      bench loss-check 180 python benchmarks/loss_check.py
      grep -E "fwd\+bwd" "$out/loss-check.log" ;;
    bamba-9b-final)
      bench 9b-final 240 $torchrun2 $final9b ;;
    bamba-9b-nccl-channels)  # the final configuration with NCCL held to fewer channels (SMs)
      for channels in ${NCCL_CHANNELS:-8 4}; do
        NCCL_MAX_NCHANNELS=$channels bench 9b-final-nccl$channels 240 $torchrun2 $final9b
      done ;;
    bamba-9b-keep-last)  # the final configuration keeping the last N blocks' gathered params for backward
      for n in ${KEEP_LAST:-8 16}; do
        bench 9b-final-keep-last-$n 240 $torchrun2 $final9b parallelism.reshard_after_forward=keep-last-$n
      done ;;
    bamba-9b-overlap)  # the kept configuration (the optimizer's update beside the next forward), then without it
      bench 9b-final-overlap 300 $torchrun2 $final9b
      bench 9b-final-keep-last-16 240 $torchrun2 $final9b optimizer.overlap_step=false ;;
    bamba-9b-master)  # the kept configuration (a bf16 model, fp32 masters in the optimizer), then without the masters
      bench 9b-final-master 400 $torchrun2 $final9b
      bench 9b-final-plain 240 $torchrun2 $final9b optimizer.master_weights=false ;;
    bamba-9b-nccl-proto)  # the kept configuration with NCCL held to one protocol, $NCCL_PROTO_SET (default Simple)
      NCCL_PROTO=${NCCL_PROTO_SET:-Simple} bench 9b-final-nccl-proto 240 $torchrun2 $final9b ${PROTO_SET:-} ;;
    checkpoint-1b-async)  # $CKPT_REPEATS async saves of each mode, on one GPU: the host buffers reused
      bench 1b-checkpoint-async 300 python benchmarks/checkpoint.py configs/bamba-1b.yaml --out=/tmp/ckpt-bench \
        --modes=${CKPT_MODES:-async,async_process} --repeats=${CKPT_REPEATS:-2} --discard=True --prepare=${CKPT_PREPARE:-True} ;;
    trainer-1b-async-ckpt)  # one GPU: the trainer with an async save every 100 steps (a write takes ~30 s, 80 steps); tokens/s of every 10-step interval
      bench 1b-trainer-async-ckpt 400 python benchmarks/train.py --preset bamba-1b $seq --micro-batch-size 2 --steps 300 \
        --log-interval 10 --workdir /tmp/b1c --set checkpoint.enable=true checkpoint.interval=100 checkpoint.async_mode=async \
        checkpoint.keep_last=1
      python -c "import json,sys; [print(r['step'], round(r['tokens_per_sec_per_gpu'])) for r in map(json.loads, open(sys.argv[1]))]" \
        /tmp/b1c/run/metrics.jsonl | tee "$out/1b-trainer-async-ckpt-intervals.txt" ;;
    checkpoint-1b-prepare)  # one GPU: the host buffers allocated at the first save, then at the start (as the trainer does)
      for prepare in False True; do
        bench 1b-checkpoint-prepare-$prepare 300 python benchmarks/checkpoint.py configs/bamba-1b.yaml --out=/tmp/ckpt-bench \
          --modes=${CKPT_MODES:-async,async_process} --repeats=${CKPT_REPEATS:-2} --discard=True --prepare=$prepare
      done ;;
    checkpoint-9b)  # $CKPT_REPEATS saves of each mode in $CKPT_MODES (default: 1 by a thread, then 1 by the process)
      bench 9b-checkpoint 580 $torchrun2 benchmarks/checkpoint.py configs/bamba-9b-stage1.yaml --out=/tmp/ckpt-bench-9b \
        --modes=${CKPT_MODES:-async,async_process} --repeats=${CKPT_REPEATS:-1} --discard=True --training.micro_batch_size=2 \
        --parallelism.activation_checkpoint=none --parallelism.reduce_dtype=bfloat16 --prepare=${CKPT_PREPARE:-True} ${CKPT_SET:-} ;;
    copies-check)  # one GPU
      bench copies-check 300 python benchmarks/copies_check.py
      grep -E "copy|matmul" "$out/copies-check.log" ;;
    copy-engine-1gpu)  # one GPU: the copy-engine path's set-up and gathers on a one-rank communicator
      bench 1b-copy-engine-1gpu 400 torchrun --standalone --nproc_per_node=1 benchmarks/train.py --preset bamba-1b $seq \
        --micro-batch-size 2 --steps 20 --log-interval 5 --workdir /tmp/b1ce --set parallelism.all_gather=copy-engine
      grep -E "step +[0-9]+|loss" "$out/1b-copy-engine-1gpu.log" | tail -4
      bench all-gather-copy-engine-1gpu 120 torchrun --standalone --nproc_per_node=1 benchmarks/all_gather_check.py \
        --all-gather copy-engine
      grep -E "all-gather |Error" "$out/all-gather-copy-engine-1gpu.log" ;;
    all-gather-check)  # FSDP's all-gather on NCCL's kernels vs copy engines, beside a matmul
      for engine in nccl copy-engine; do
        bench all-gather-$engine 120 $torchrun2 benchmarks/all_gather_check.py --all-gather $engine
        grep -E "all-gather |Error" "$out/all-gather-$engine.log"
      done ;;
    bamba-9b-copy-engine)  # the kept configuration without and with copy-engine all-gathers, one call
      bench 9b-final-nccl 240 $torchrun2 $final9b parallelism.all_gather=nccl
      bench 9b-final-copy-engine 300 $torchrun2 $final9b ${CE_SET:-} ;;
    bamba-9b-cta-policy)  # the kept configuration, the reduce-scatters under each NCCL_CTA_POLICY in $CTA_POLICIES
      for policy in ${CTA_POLICIES:-2 0 1}; do
        NCCL_CTA_POLICY=$policy bench 9b-final-cta-$policy 300 $torchrun2 $final9b
      done ;;
    per-param-1gpu)  # one GPU: bamba-1b's trainer with the kept options under parallelism.sharding=per-param (NCCL's
      # all-gathers, then copy engines, profiled), then fsdp2, on the same learnable tokens; losses compared, kernels counted
      pp="benchmarks/train.py --preset bamba-1b $seq --micro-batch-size 2 --steps 24 --log-interval 1 --compile --learnable-data
        --workdir /tmp/pp1"
      for run in ${PP_RUNS:-per-param:nccl per-param:copy-engine fsdp2:nccl}; do
        sharding=${run%:*} engine=${run#*:}
        bench 1b-$sharding-$engine-1gpu 300 python $pp --run-name $sharding-$engine --set parallelism.reduce_dtype=bfloat16 \
          parallelism.reshard_after_forward=keep-last-16 optimizer.overlap_step=true optimizer.master_weights=true \
          parallelism.sharding=$sharding parallelism.all_gather=$engine profiling.enable=true profiling.start_step=9 ${PP_SET:-}
        python -m fms_bamba.profiling /tmp/pp1/$sharding-$engine/profile/rank0.json.gz 2 --count AllGather ReduceScatter \
          Memcpy split_with_sizes chunk_cat foreach_copy | tee "$out/per-param-1gpu-kernels-$sharding-$engine.txt"
        sed -n '/^per step/,/longest/p' /tmp/pp1/$sharding-$engine/profile/rank0.txt
      done
      for run in /tmp/pp1/per-param-*; do
        python benchmarks/compare_losses.py $run /tmp/pp1/fsdp2-nccl | tee "$out/per-param-1gpu-losses-${run##*/}.txt"
      done ;;
    bamba-9b-variants)  # the kept configuration once per override set in $VARIANTS (';' between sets, an empty set
      # is the kept configuration itself; default: per-param, then as kept), $ROUNDS times (default 1), on $NPROC GPUs
      # (default 2); with $DEPTH, Bamba-9B's width at that many blocks (attention at block 9), e.g. NPROC=1 DEPTH=12 on one GPU
      split_sets "${VARIANTS-parallelism.sharding=per-param;}"
      depth=${DEPTH:+model.n_layers=$DEPTH model.attn_layer_indices=[9]}
      for round in $(seq ${ROUNDS:-1}); do
        for index in "${!override_sets[@]}"; do
          bench 9b${DEPTH:+-depth$DEPTH}-variant$index-round$round 300 $torchrun2 $final9b $depth ${override_sets[$index]}
        done
      done ;;
    attention-check)  # one GPU: a Bamba-9B attention layer's SDPA on each backend, time and error against float64
      bench attention-check 300 python benchmarks/attention_check.py
      grep -E "ms .*TFLOP|not run" "$out/attention-check.log" ;;
    float8-check)  # one GPU: each Linear of a Bamba-9B block in bf16 and fp8 (per tensor, per row), time and error against float64
      bench float8-check 300 python benchmarks/float8_check.py
      grep -E "ms .*TFLOP" "$out/float8-check.log" ;;
    bamba-9b-power)  # the kept configuration, with clocks and power sampled: is the step held back by the power limit?
      nvidia-smi --query-gpu=index,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.sw_power_cap \
        --format=csv -lms 500 > "$out/9b-power.csv" &
      sampler=$!
      bench 9b-power 300 $torchrun2 $final9b
      kill $sampler
      python benchmarks/power_summary.py "$out/9b-power.csv" | tee "$out/9b-power.txt" ;;
    compute-9b)  # one GPU: the kept step's computation alone (micro-batch 2, compiled; then eager), no FSDP or optimizer
      for how in --compile ""; do
        bench model-9b-mb2${how:+-compiled} 300 python benchmarks/model_kernels.py --seq-lens 4096 --full-batch 2 $how
        grep -E "^(##|[0-9.]+ ms/step)" "$out/model-9b-mb2${how:+-compiled}.log"
      done ;;
    compute-9b-variants)  # one GPU: the computation alone, compiled, as kept and with one change each
      floor="python benchmarks/model_kernels.py --seq-lens 4096 --full-batch 2 --compile --full-model-only"
      bench compute-9b 240 $floor
      bench compute-9b-loss-chunk-8192 150 $floor --set loss_chunk_tokens=8192
      bench compute-9b-ssd-chunk-128 200 $floor --set mamba_chunk_size=128
      TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 bench compute-9b-coordinate-descent 200 $floor ;;
    step-parts)
      bench step-parts 400 python benchmarks/step_parts.py
      grep -v -i warn "$out/step-parts.log" ;;
    *) echo "unknown group $group"; exit 2 ;;
  esac
done
