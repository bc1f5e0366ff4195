#!/usr/bin/env bash
# The port on one Gaudi, end to end, in both of Habana's execution modes: eager mode with torch.compile
# (hpu_backend; the default of today's Gaudi software) and lazy mode (mark_step graphs; the legacy mode).
# The Gaudi twin of tools/gpu_check.sh: the training step's speed in each mode (eager: compiled and not),
# training under torchrun (real HCCL collectives, world size 1) in bf16 autocast with the op lists, a SIGTERM
# mid-epoch and its resume, every evaluation script, the multi-crop render and the training loop, and a short
# training run whose k-NN accuracy shows that it learns. Not run on a Gaudi yet (see README, "Gaudi").
#
#   tools/hpu_check.sh [WORK_DIR]          (from anywhere; WORK_DIR defaults to a new folder under /tmp)
#   HPU_CHECK_ONLY=speed tools/hpu_check.sh    the step's speed alone, at batch 64, 128 and 256
#   HPU_CHECK_MODES="eager" ...                one mode only (default: "eager lazy")
#
# Installs nothing and downloads nothing: it uses the python3 on PATH (or $PYTHON) and builds its data from
# the test helpers. One PASS/FAIL line per step, a summary line, exit status 1 if any step failed; each
# step's output is in WORK_DIR/<step>.log.
# HPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with tiny sizes (--lazy_mode is then unread): a check of
# this script, no Gaudi figures.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
WORK=${1:-$(mktemp -d /tmp/dino_hpu_check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
CORES=$(nproc)
LOADERS=$((CORES > 1 ? CORES - 1 : 1))  # loader processes beside the training process
STEPS="$PY tools/gpu_check_steps.py"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 1"
read -r -a MODES <<< "${HPU_CHECK_MODES:-eager lazy}"
declare -A LAZY=([eager]=false [lazy]=true)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
unset PT_HPU_LAZY_MODE  # each step names its mode with --lazy_mode

if [ "${HPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu
    TRAIN_SIZE=(--batch_size_per_device 8 --data_limit 32 --num_workers 2)
    EVAL_SIZE=(--max_batches 2 --batch_size_per_device 16)
    LINEAR_SIZE=(--data_limit 64 --batch_size_per_device 16)
    BENCH_SIZE=(--arch vit_tiny --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 256
                --steps 1 --warmup_steps 1)
    BENCH_BATCHES=(4)
    AUGMENT_SIZE=(--arch vit_tiny --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 256
                  --batch_size_per_device 4 --steps 1 --warmup_steps 1)
    LOOP_SIZE=(--arch vit_tiny --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 256
               --batch_size_per_device 4 --steps 2 --warmup_steps 1 --image_width 120 --image_height 90)
    LEARN_IMAGES=64 LEARN_CAP=120
    LEARN_SIZE=(--local_crops_number 2 --out_dim 256 --batch_size_per_device 16 --epochs 2 --warmup_epochs 1)
else
    DEVICE=hpu
    TRAIN_SIZE=(--batch_size_per_device 32 --data_limit 256 --num_workers 4)
    EVAL_SIZE=(--batch_size_per_device 128)
    LINEAR_SIZE=(--batch_size_per_device 128)
    BENCH_SIZE=(--arch vit_small --steps 10 --warmup_steps 3)
    BENCH_BATCHES=(64)
    AUGMENT_SIZE=(--arch vit_small --batch_size_per_device 32 --steps 3 --warmup_steps 2)
    # the warm-up covers the workers' start and the graph compilations of either mode
    LOOP_SIZE=(--arch vit_small --batch_size_per_device 64 --steps 30 --warmup_steps 10)
    LEARN_IMAGES=51200 LEARN_CAP=180
    LEARN_SIZE=(--local_crops_number 6 --out_dim 4096 --batch_size_per_device 256 --epochs 15 --warmup_epochs 2)
fi
# bf16 autocast with Habana's op lists (ops_bf16.txt, ops_fp32.txt), as the seed's --hmp runs
TINY_DINO=(--arch vit_tiny --patch_size 16 --data_path synthetic --global_crops_size 64 --local_crops_size 32
           --local_crops_number 2 --out_dim 1024 --warmup_epochs 0 --lr 0.002 --epochs 2 --device "$DEVICE"
           --autocast "${TRAIN_SIZE[@]}")
RANDOM16=(--arch vit_tiny --patch_size 16 --pretrained_weights "$WORK/random_vit_tiny16.pth")
# the learning run of tools/gpu_check.sh (README, "Multi-card"), in the default mode
LEARN_RECIPE=(--arch vit_tiny --patch_size 8 --data_path "$WORK/learn_data" --global_crops_size 64
              --local_crops_size 32 --global_crops_scale 0.4 1 --local_crops_scale 0.05 0.4 --lr 0.0005
              --min_lr 1e-6 --weight_decay 0.04 --weight_decay_end 0.4 --momentum_teacher 0.99
              --teacher_temp 0.04 --warmup_teacher_temp 0.04 --freeze_last_layer 1 --clip_grad 3.0
              --saveckp_freq 0 --num_workers "$CORES" --device "$DEVICE" --autocast "${LEARN_SIZE[@]}")

if [ "${HPU_CHECK_ONLY:-}" = speed ]; then
    BENCH_BATCHES=(64 128 256)
fi
START=$(date +%s)
PASSED=0
FAILED=0

# step NAME TIMEOUT_S COMMAND...: run COMMAND (its output to WORK/NAME.log), print one PASS/FAIL line with
# the last line it printed.
step() {
    local name=$1 limit=$2 begin=$SECONDS rc
    shift 2
    timeout -k 20 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    local last
    last=$(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-400)
    if [ $rc -eq 0 ]; then
        PASSED=$((PASSED + 1))
        printf 'PASS %-26s %4ss  %s\n' "$name" $((SECONDS - begin)) "$last"
    else
        FAILED=$((FAILED + 1))
        [ $rc -eq 124 ] && last="timed out after ${limit}s; $last"
        printf 'FAIL %-26s %4ss  %s\n' "$name" $((SECONDS - begin)) "$last"
    fi
    return $rc
}

summary() {
    echo "hpu_check: $PASSED passed, $FAILED failed, $(( $(date +%s) - START ))s on $DEVICE (modes: ${MODES[*]});" \
         "logs in $WORK"
    [ $FAILED -eq 0 ]
    exit $?
}

# the start-up line of a run in mode $1 (on the dry run's CPU: the CPU's)
mode_line() {
    if [ "$DEVICE" = hpu ]; then echo "^Device: hpu, $1 mode"; else echo "^Device: cpu"; fi
}

# ---------------------------------------------------------------- environment
if [ "$DEVICE" = hpu ]; then
    step hpu 120 $STEPS hpu || summary
fi
step requirements 120 $STEPS requirements

# ---------------------------------------------------------------- speed of the training step, per mode
# vit_small/16, 2x224 + 8x96 crops, out_dim 65536, bf16 autocast; eager mode compiled (its default) and not
for batch in "${BENCH_BATCHES[@]}"; do
    for mode in "${MODES[@]}"; do
        compiles=(false)
        [ "$mode" = eager ] && compiles=(true false)
        for compile in "${compiles[@]}"; do
            name=bench_${mode}_b${batch}_$([ $compile = true ] && echo compiled || echo uncompiled)
            step "$name" 600 bash -c "$PY benchmark.py --device $DEVICE --lazy_mode ${LAZY[$mode]} --patch_size 16 \
                ${BENCH_SIZE[*]} --batch_size_per_device $batch --autocast --compile $compile --json \
                > $WORK/$name.json && $STEPS benchmark $WORK/$name.json"
        done
    done
done
[ "${HPU_CHECK_ONLY:-}" = speed ] && summary

step fixtures 240 $STEPS fixtures "$WORK" "$LEARN_IMAGES"

# ---------------------------------------------------------------- training under torchrun (HCCL, world size 1)
for mode in "${MODES[@]}"; do
    step dino_$mode 600 bash -c "$TORCHRUN main_dino.py ${TINY_DINO[*]} --lazy_mode ${LAZY[$mode]} \
        --output_dir $WORK/$mode > $WORK/dino_${mode}.out 2>&1; rc=\$?; cat $WORK/dino_${mode}.out; [ \$rc = 0 ] \
        && $STEPS found $WORK/dino_${mode}.out '$(mode_line "$mode")' && $STEPS training_run $WORK/$mode 2"
    step dino_${mode}_sigterm_resume 600 $STEPS sigterm_resume "$WORK/$mode" "$WORK/${mode}_stopped" \
        $TORCHRUN main_dino.py "${TINY_DINO[@]}" --lazy_mode "${LAZY[$mode]}" --output_dir "$WORK/${mode}_stopped"
done

# ---------------------------------------------------------------- evaluations (torchrun where the script shares work)
# k-NN and linear (which cut lazy graphs with mark_step) in every mode, the others in the first (the default)
for mode in "${MODES[@]}"; do
    step eval_knn_$mode 300 bash -c "$TORCHRUN eval_knn.py ${RANDOM16[*]} --data_path synthetic --nb_knn 10 20 \
        --num_workers 4 --device $DEVICE --lazy_mode ${LAZY[$mode]} ${EVAL_SIZE[*]} \
        && $STEPS found $WORK/eval_knn_$mode.log '^20-NN classifier'"
    step eval_linear_$mode 300 bash -c "$TORCHRUN eval_linear.py ${RANDOM16[*]} --data_path synthetic --epochs 1 \
        --num_labels 10 --num_workers 4 --output_dir $WORK/linear_$mode --device $DEVICE \
        --lazy_mode ${LAZY[$mode]} ${LINEAR_SIZE[*]} && $STEPS found $WORK/eval_linear_$mode.log 'Top-1 test accuracy'"
done
MODE=(--lazy_mode "${LAZY[${MODES[0]}]}")
step eval_copy_detection 300 bash -c "$TORCHRUN eval_copy_detection.py ${RANDOM16[*]} \
    --data_path $WORK/copydays_root/copydays --distractors_path $WORK/copydays_root/distractors \
    --whitening_path $WORK/copydays_root/whitening --imsize 64 --batch_size_per_device 32 --num_workers 2 \
    --device $DEVICE ${MODE[*]} && $STEPS found $WORK/eval_copy_detection.log 'Copydays strong mAP'"
step eval_image_retrieval 300 bash -c "$TORCHRUN eval_image_retrieval.py ${RANDOM16[*]} \
    --data_path $WORK/revisitop --dataset roxford5k --imsize 64 --num_workers 2 --device $DEVICE ${MODE[*]} \
    && $STEPS found $WORK/eval_image_retrieval.log 'mAP M:'"
step eval_video_segmentation 300 bash -c "$PY eval_video_segmentation.py ${RANDOM16[*]} --data_path $WORK/davis \
    --output_dir $WORK/davis_out --device $DEVICE ${MODE[*]} \
    && $STEPS found $WORK/eval_video_segmentation.log 'J&F-Mean'"
step visualize_attention 300 bash -c "$PY visualize_attention.py ${RANDOM16[*]} --image_path $WORK/photo.png \
    --image_size 128 128 --threshold 0.6 --output_dir $WORK/attention --device $DEVICE ${MODE[*]} \
    && ls $WORK/attention/attn-head0.png"
step video_generation 300 bash -c "$PY video_generation.py ${RANDOM16[*]} --input_path $WORK/video.mp4 \
    --output_path $WORK/video_out --batch_size 4 --device $DEVICE ${MODE[*]} && ls $WORK/video_out/video.mp4"

# ---------------------------------------------------------------- multi-crop rendered on the Gaudi, the loop
step augment_step 600 bash -c "$PY benchmark.py --device $DEVICE ${MODE[*]} --patch_size 16 ${AUGMENT_SIZE[*]} \
    --augment_on device --autocast --json > $WORK/bench_augment.json && $STEPS benchmark $WORK/bench_augment.json"
for AUG in device cpu; do
    step train_loop_$AUG 600 bash -c "$PY benchmark.py --mode train --device $DEVICE ${MODE[*]} --augment_on $AUG \
        --num_workers $LOADERS --patch_size 16 ${LOOP_SIZE[*]} --autocast --json > $WORK/train_loop_$AUG.json \
        && $STEPS train $WORK/train_loop_$AUG.json"
done

# ---------------------------------------------------------------- learning you can see (the first mode)
KNN8=(--arch vit_tiny --patch_size 8 --data_path synthetic --nb_knn 20 --num_workers 4 --device "$DEVICE"
      "${MODE[@]}" "${EVAL_SIZE[@]}")
# exit 0 also when the time cap stops it: a SIGTERM makes main_dino.py write its checkpoint and end cleanly
step learning_train $((LEARN_CAP + 180)) timeout -s TERM -k 60 "$LEARN_CAP" \
    $PY main_dino.py "${LEARN_RECIPE[@]}" "${MODE[@]}" --output_dir "$WORK/learn"
step learning_knn_trained 300 $PY eval_knn.py "${KNN8[@]}" --pretrained_weights "$WORK/learn/checkpoint.pth"
step learning_knn_random 300 $PY eval_knn.py "${KNN8[@]}" --pretrained_weights "$WORK/random_vit_tiny8.pth"
step learning 60 $STEPS learning "$WORK/learning_knn_trained.log" "$WORK/learning_knn_random.log" "$WORK/learn" \
    "$WORK/learning_train.log"

summary
