#!/usr/bin/env bash
# The port on one NVIDIA GPU, end to end, in about 15 minutes (not timed on a GPU yet): the training step's
# speed, compiled (--compile, the CUDA default) and eager, training under torchrun (real NCCL collectives, world
# size 1) in fp16 and bf16, a SIGTERM mid-epoch and its resume, every evaluation script, the multi-crop
# render's speed, the training loop's with either --augment_on, and a short training
# run whose k-NN accuracy shows that it learns.
#
#   tools/gpu_check.sh [WORK_DIR]          (from anywhere; WORK_DIR defaults to a new folder under /tmp)
#   GPU_CHECK_ONLY=speed tools/gpu_check.sh    the step's speed alone, at batch 64, 128 and 256
#   GPU_CHECK_BATCHES="128 256" ...            the step's speed at these batch sizes (default 64)
#
# Installs nothing and downloads nothing: it uses the python3 on PATH (or $PYTHON) and builds its data from
# the test helpers. One PASS/FAIL line per step, a summary line, exit status 1 if any step failed; each
# step's output is in WORK_DIR/<step>.log.
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU with tiny sizes: a check of this script, no GPU figures.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
WORK=${1:-$(mktemp -d /tmp/dino_gpu_check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
CORES=$(nproc)
LOADERS=$((CORES > 1 ? CORES - 1 : 1))  # loader processes beside the training process
STEPS="$PY tools/gpu_check_steps.py"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node 1"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu
    TRAIN_SIZE=(--batch_size_per_device 8 --data_limit 32 --num_workers 2)
    EVAL_SIZE=(--max_batches 2 --batch_size_per_device 16)
    LINEAR_SIZE=(--data_limit 64 --batch_size_per_device 16)
    BENCH_SIZE=(--arch vit_tiny --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 256
                --steps 1 --warmup_steps 1 --profile_steps 1)
    BENCH_BATCHES=(4)
    AUGMENT_SIZE=(--arch vit_tiny --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 256
                  --batch_size_per_device 4 --steps 1 --warmup_steps 1)
    LOOP_SIZE=(--arch vit_tiny --global_crops_size 32 --local_crops_size 16 --local_crops_number 2 --out_dim 256
               --batch_size_per_device 4 --steps 2 --warmup_steps 1 --image_width 120 --image_height 90)
    LEARN_IMAGES=64 LEARN_CAP=120
    LEARN_SIZE=(--local_crops_number 2 --out_dim 256 --batch_size_per_device 16 --epochs 2 --warmup_epochs 1)
else
    DEVICE=cuda
    TRAIN_SIZE=(--batch_size_per_device 32 --data_limit 256 --num_workers 4)
    EVAL_SIZE=(--batch_size_per_device 128)
    LINEAR_SIZE=(--batch_size_per_device 128)
    BENCH_SIZE=(--arch vit_small --steps 10 --warmup_steps 3 --profile_steps 2)
    BENCH_BATCHES=(64)
    AUGMENT_SIZE=(--arch vit_small --batch_size_per_device 32 --steps 3 --warmup_steps 1)
    # the warm-up covers the workers' start and the compilations
    LOOP_SIZE=(--arch vit_small --batch_size_per_device 64 --steps 30 --warmup_steps 10)
    # the learning run: 51200 images / batch 256 = 200 iterations per epoch, 15 epochs = 3000 iterations
    # (about 3 minutes); a SIGTERM at LEARN_CAP seconds stops it early with a checkpoint if it is slower
    LEARN_IMAGES=51200 LEARN_CAP=180
    LEARN_SIZE=(--local_crops_number 6 --out_dim 4096 --batch_size_per_device 256 --epochs 15 --warmup_epochs 2)
fi
TINY_DINO=(--arch vit_tiny --patch_size 16 --data_path synthetic --global_crops_size 64 --local_crops_size 32
           --local_crops_number 2 --out_dim 1024 --warmup_epochs 0 --lr 0.002 --epochs 2 --device "$DEVICE"
           "${TRAIN_SIZE[@]}")
RANDOM16=(--arch vit_tiny --patch_size 16 --pretrained_weights "$WORK/random_vit_tiny16.pth")
# Learning you can see: the paper's recipe (ViT-S/16, 100 epochs, batch 1024) scaled to a 3-minute run on
# 64-pixel shape images; the reasons are in README.md ("Multi-card").
LEARN_RECIPE=(--arch vit_tiny --patch_size 8 --data_path "$WORK/learn_data" --global_crops_size 64
              --local_crops_size 32 --global_crops_scale 0.4 1 --local_crops_scale 0.05 0.4 --lr 0.0005
              --min_lr 1e-6 --weight_decay 0.04 --weight_decay_end 0.4 --momentum_teacher 0.99
              --teacher_temp 0.04 --warmup_teacher_temp 0.04 --freeze_last_layer 1 --clip_grad 3.0
              --saveckp_freq 0 --num_workers "$CORES" --device "$DEVICE" "${LEARN_SIZE[@]}")

if [ "${GPU_CHECK_ONLY:-}" = speed ]; then
    BENCH_BATCHES=(64 128 256)
fi
if [ -n "${GPU_CHECK_BATCHES:-}" ]; then
    read -r -a BENCH_BATCHES <<< "$GPU_CHECK_BATCHES"
fi
declare -A PRECISION=([fp16]="" [bf16]="--use_fp16 false --autocast")
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
        printf 'PASS %-22s %4ss  %s\n' "$name" $((SECONDS - begin)) "$last"
    else
        FAILED=$((FAILED + 1))
        [ $rc -eq 124 ] && last="timed out after ${limit}s; $last"
        printf 'FAIL %-22s %4ss  %s\n' "$name" $((SECONDS - begin)) "$last"
    fi
    return $rc
}

summary() {
    echo "gpu_check: $PASSED passed, $FAILED failed, $(( $(date +%s) - START ))s on $DEVICE; logs in $WORK"
    [ $FAILED -eq 0 ]
    exit $?
}

# ---------------------------------------------------------------- environment
if [ "$DEVICE" = cuda ]; then
    step gpu 120 $STEPS gpu || summary
fi
step requirements 120 $STEPS requirements

# ---------------------------------------------------------------- speed of the training step
# vit_small/16, 2x224 + 8x96 crops, out_dim 65536, fp16 + GradScaler and bf16, compiled and eager; each log
# also holds torch.profiler's table of the operators and kernels that take the most GPU time
for batch in "${BENCH_BATCHES[@]}"; do
    for precision in fp16 bf16; do
        for compile in true false; do
            name=bench_${precision}_b${batch}_$([ $compile = true ] && echo compiled || echo eager)
            step "$name" 400 bash -c "$PY benchmark.py --device $DEVICE --patch_size 16 ${BENCH_SIZE[*]} \
                --batch_size_per_device $batch ${PRECISION[$precision]} --compile $compile --json \
                > $WORK/$name.json && $STEPS benchmark $WORK/$name.json"
        done
    done
done
[ "${GPU_CHECK_ONLY:-}" = speed ] && summary

step fixtures 240 $STEPS fixtures "$WORK" "$LEARN_IMAGES"

# ---------------------------------------------------------------- training under torchrun (NCCL, world size 1)
step dino_fp16 300 bash -c "$TORCHRUN main_dino.py ${TINY_DINO[*]} --output_dir $WORK/fp16 \
    && $STEPS training_run $WORK/fp16 2"
step dino_bf16 300 bash -c "$TORCHRUN main_dino.py ${TINY_DINO[*]} --use_fp16 false --autocast \
    --output_dir $WORK/bf16 && $STEPS training_run $WORK/bf16 2"
step dino_sigterm_resume 400 $STEPS sigterm_resume "$WORK/fp16" "$WORK/stopped" \
    $TORCHRUN main_dino.py "${TINY_DINO[@]}" --output_dir "$WORK/stopped"

# ---------------------------------------------------------------- evaluations (torchrun where the script shares work)
step eval_knn 300 bash -c "$TORCHRUN eval_knn.py ${RANDOM16[*]} --data_path synthetic --nb_knn 10 20 \
    --num_workers 4 --device $DEVICE ${EVAL_SIZE[*]} && $STEPS found $WORK/eval_knn.log '^20-NN classifier'"
step eval_linear 300 bash -c "$TORCHRUN eval_linear.py ${RANDOM16[*]} --data_path synthetic --epochs 1 \
    --num_labels 10 --num_workers 4 --output_dir $WORK/linear --device $DEVICE ${LINEAR_SIZE[*]} \
    && $STEPS found $WORK/eval_linear.log 'Top-1 test accuracy'"
step eval_copy_detection 300 bash -c "$TORCHRUN eval_copy_detection.py ${RANDOM16[*]} \
    --data_path $WORK/copydays_root/copydays --distractors_path $WORK/copydays_root/distractors \
    --whitening_path $WORK/copydays_root/whitening --imsize 64 --batch_size_per_device 32 --num_workers 2 \
    --device $DEVICE && $STEPS found $WORK/eval_copy_detection.log 'Copydays strong mAP'"
step eval_image_retrieval 300 bash -c "$TORCHRUN eval_image_retrieval.py ${RANDOM16[*]} \
    --data_path $WORK/revisitop --dataset roxford5k --imsize 64 --num_workers 2 --device $DEVICE \
    && $STEPS found $WORK/eval_image_retrieval.log 'mAP M:'"
step eval_video_segmentation 300 bash -c "$PY eval_video_segmentation.py ${RANDOM16[*]} --data_path $WORK/davis \
    --output_dir $WORK/davis_out --device $DEVICE && $STEPS found $WORK/eval_video_segmentation.log 'J&F-Mean'"
step visualize_attention 300 bash -c "$PY visualize_attention.py ${RANDOM16[*]} --image_path $WORK/photo.png \
    --image_size 128 128 --threshold 0.6 --output_dir $WORK/attention --device $DEVICE \
    && ls $WORK/attention/attn-head0.png"
# 11,237 tokens: above visualize_attention.LARGE_TOKENS, so the memory check (the GPU's free memory) and the
# progress bar run
step attention_large_image 300 bash -c "$PY visualize_attention.py ${RANDOM16[*]} --image_path $WORK/photo.png \
    --image_size 1700 1700 --output_dir $WORK/attention_large --device $DEVICE \
    && $STEPS found $WORK/attention_large_image.log 'MiB of memory, and .* times the attention work' \
    && $STEPS found $WORK/attention_large_image.log 'Attention blocks: 100%'"
step video_generation 300 bash -c "$PY video_generation.py ${RANDOM16[*]} --input_path $WORK/video.mp4 \
    --output_path $WORK/video_out --batch_size 4 --device $DEVICE && ls $WORK/video_out/video.mp4"

# ---------------------------------------------------------------- multi-crop rendered on the GPU (--augment_on)
# the CPU share per loader core (original PIL pipeline, --augment_on cpu, --augment_on device) and the device
# share, side by side; then the step with each batch's views rendered on the GPU
step augment_data 300 bash -c "$PY benchmark.py --mode data --device $DEVICE --augment_on device \
    --num_workers $CORES --patch_size 16 ${AUGMENT_SIZE[*]} && $STEPS found $WORK/augment_data.log 'device share'"
step augment_step 300 bash -c "$PY benchmark.py --device $DEVICE --patch_size 16 ${AUGMENT_SIZE[*]} \
    --augment_on device --json > $WORK/bench_augment.json && $STEPS benchmark $WORK/bench_augment.json"

# ---------------------------------------------------------------- the training loop end to end (--mode train)
# main_dino's DataLoader over test JPEGs with a worker per core but one, the views rendered on the GPU
# (device) or by the workers (cpu), and the step, beside the step alone: whether data or compute sets the
# speed, and which --augment_on is the faster here
for AUG in device cpu; do
    step train_loop_$AUG 600 bash -c "$PY benchmark.py --mode train --device $DEVICE --augment_on $AUG \
        --num_workers $LOADERS --patch_size 16 ${LOOP_SIZE[*]} --json > $WORK/train_loop_$AUG.json \
        && $STEPS train $WORK/train_loop_$AUG.json"
done

# ---------------------------------------------------------------- learning you can see
KNN8=(--arch vit_tiny --patch_size 8 --data_path synthetic --nb_knn 20 --num_workers 4 --device "$DEVICE"
      "${EVAL_SIZE[@]}")
# exit 0 also when the time cap stops it: a SIGTERM makes main_dino.py write its checkpoint and end cleanly
step learning_train $((LEARN_CAP + 120)) timeout -s TERM -k 60 "$LEARN_CAP" \
    $PY main_dino.py "${LEARN_RECIPE[@]}" --output_dir "$WORK/learn"
step learning_knn_trained 300 $PY eval_knn.py "${KNN8[@]}" --pretrained_weights "$WORK/learn/checkpoint.pth"
step learning_knn_random 300 $PY eval_knn.py "${KNN8[@]}" --pretrained_weights "$WORK/random_vit_tiny8.pth"
step learning 60 $STEPS learning "$WORK/learning_knn_trained.log" "$WORK/learning_knn_random.log" "$WORK/learn" \
    "$WORK/learning_train.log"

summary
