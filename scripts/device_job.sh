#!/usr/bin/env bash
# The reference policy's GPU job, in stages, for the lent GPU machine (no network; see docs/reference.md):
#
#   scripts/device_job.sh setup demos train     # call 1 (carry .gl and .devpack)
#   scripts/device_job.sh eval                  # call 2, on the same warm machine (/tmp survives)
#
# setup  unpack the GL loaders (.gl/*.deb), MuJoCo's wheel and the LIBERO pack (.devpack/, made by
#        scripts/pack_libero.py) under $W
# demos  `duquant demos` on libero_object init states 0-44, 2 episodes each (clean + noisy), DEMO_MIN minutes
# train  `duquant train` for TRAIN_MIN minutes (TRAIN_RUN_MIN of them in this call; rerun to resume) on every
#        GPU, held-out init states 45-49; the checkpoint goes to $OUT
# eval   scripts/reference_eval.py: FP on all 500 episodes, then the quantization matrix (EVAL_MIN)
# speed  scripts/gpu_speed_job.py (full pi05, random bf16 weights) -> $OUT/gpu_speed.json, SPEED_S seconds at most
#        (SPEED_ARGS: more options, e.g. --stages ...)
# throughput  scripts/libero_throughput.py on one GPU and 16 cores (TP_CKPT: default the random full pi05, in memory;
#        TP_WORKERS (N or N/M: at most M per policy call), TP_EPISODES per worker, TP_ARGS e.g. --compile-step)
#        -> $OUT/libero_throughput${TP_TAG}.json, TP_S seconds at most
# Every stage appends its timing to $OUT/job.log; outputs land in $OUT (8 files at most come back).
set -uo pipefail
W=${W:-/tmp/dq}
OUT=${OUT:-/tmp/dq-out}
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
export PYTHONPATH="$PWD:$W/site:$W/lp/site" MUJOCO_GL=egl LIBERO_CONFIG_PATH="$W/libero-config"
export PYTHONWARNINGS=ignore
[ -d "$W/lp/assets" ] && export LIBERO_ASSETS_DIR="$W/lp/assets"   # LIBERO from the pack (GPU machine)
vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f "$vendor" ] && export __EGL_VENDOR_LIBRARY_FILENAMES="$vendor"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/job.log"; }

stage_setup() {
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    mkdir -p "$W/site" "$W/lp"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" .devpack/mujoco-*.whl || return 1
    tar -xJf .devpack/libero_pack.tar.xz -C "$W/lp" || return 1
    export LIBERO_ASSETS_DIR="$W/lp/assets"
    python3 - <<'EOF' || return 1
import time
t = time.perf_counter()
from pytest_duquant.libero import sim_setup
sim_setup.prepare()
from pytest_duquant.libero.episode import LiberoEnv
from pytest_duquant.libero.protocol import ProtocolSettings, DUMMY_ACTION, make_observation
env = LiberoEnv("libero_object", 0, ProtocolSettings())
env.seed(7); env.reset(); obs = env.set_init_state(env.init_states[0])
for r in (True, False):
    t1 = time.perf_counter()
    for _ in range(20):
        obs, *_ = env.step(list(DUMMY_ACTION), render=r)
    print(f"smoke: {'rendered' if r else 'unrendered'} {1e3 * (time.perf_counter() - t1) / 20:.1f} ms/step")
o = make_observation(obs, env.language)
print("smoke ok:", o["observation/image"].shape, float(o["observation/image"].mean()), env.language,
      f"{time.perf_counter() - t:.1f} s")
EOF
}

stage_demos() {
    python3 -m pytest_duquant demos --suite libero_object --out "$W/demos" --trials "${DEMO_TRIALS:-0-44}" --repeats 2 \
        --noise 0.1 --workers "$WORKERS" --max-minutes "${DEMO_MIN:-4}" >>"$W/demos.log" 2>&1
    tail -c 600 "$W/demos.log" | tr "\r" "\n" | tail -3
    python3 - "$W/demos" <<'EOF' | tee -a "$OUT/job.log"
import json, sys
from pytest_duquant.libero.demos import read_manifest
recs = read_manifest(sys.argv[1])
ok = [r for r in recs if r["success"]]
print(json.dumps({"attempted": len(recs), "kept": len(ok), "frames": sum(r["frames"] for r in ok),
                  "mean_wall_s": round(sum(r["wall_s"] for r in recs) / max(1, len(recs)), 2)}))
EOF
    cp "$W/demos/demos.jsonl" "$OUT/demos.jsonl"
}

stage_train() {
    # TRAIN_MIN: training time of all calls together (the LR schedule spans them); TRAIN_RUN_MIN: this call's
    # share (rerun `train` in the next call to resume); GPUS: DistributedDataParallel over that many GPUs
    python3 -m pytest_duquant train --demos "$W/demos" --out "$W/ckpt" --holdout 45-49 \
        --max-minutes "${TRAIN_MIN:-4.5}" ${TRAIN_RUN_MIN:+--stop-after-minutes "$TRAIN_RUN_MIN"} \
        --gpus "${GPUS:-$(nvidia-smi -L | wc -l)}" --steps 1000000 --batch "${BATCH:-192}" --lr "${LR:-3e-4}" \
        --seed 0 >>"$OUT/train.log" 2>&1
    tail -3 "$OUT/train.log"
    cp "$W/ckpt/train_log.json" "$W/ckpt/loss.png" "$OUT/" 2>/dev/null
    tar -cf "$W/ckpt.tar" -C "$W" --exclude train_state.pt ckpt && split -b 15M -d "$W/ckpt.tar" "$OUT/ckpt.tar.part"
}

stage_eval() {
    # SEED_RESULTS: a folder of earlier results JSONL (e.g. docs/results/reference): copied in first, so the
    # episodes they hold are not run again (the harness resumes); EVAL_S: hard limit, so the results still
    # come back when the call's own limit is near
    mkdir -p "$W/results"
    local f
    for f in ${SEED_RESULTS:+"$SEED_RESULTS"/*.jsonl}; do    # never over a results file already there
        [ -e "$W/results/$(basename "$f")" ] || cp "$f" "$W/results/"
    done
    timeout "${EVAL_S:-560}" python3 scripts/reference_eval.py --ckpt "${CKPT:-$W/ckpt}" --out "$W/results" --suite libero_object \
        --fp-trials "${FP_TRIALS:-0-49}" --matrix-trials "${MATRIX_TRIALS:-0-9}" --workers "$WORKERS" \
        --deadline-min "${EVAL_MIN:-8}" ${SETTINGS:+--settings "$SETTINGS"} >>"$OUT/eval.log" 2>&1
    tail -12 "$OUT/eval.log"
    (cd "$W/results" && tar -czf "$OUT/results.tgz" ./*.jsonl summary.json)
}

stage_speed() {
    timeout "${SPEED_S:-330}" python3 scripts/gpu_speed_job.py --out "$OUT/gpu_speed.json" --test-timeout "${SPEED_TEST_S:-240}" \
        ${SPEED_ARGS:-} >"$OUT/speed.log" 2>&1
    local rc=$?
    tail -5 "$OUT/speed.log"
    [ -s "$OUT/gpu_speed.json" ] || return 1
    [ "$rc" -eq 0 ] || echo "gpu_speed_job exited $rc (124: cut by SPEED_S; the JSON keeps the finished stages)"
}

stage_throughput() {
    CUDA_VISIBLE_DEVICES=0 timeout "${TP_S:-240}" taskset -c 0-15 python3 scripts/libero_throughput.py \
        --suite libero_object ${TP_CKPT:+--ckpt "$TP_CKPT"} --workers "${TP_WORKERS:-1,14}" \
        --episodes-per-worker "${TP_EPISODES:-2}" --out "$OUT/libero_throughput${TP_TAG:-}.json" ${TP_ARGS:-} \
        >>"$OUT/throughput.log" 2>&1
    local rc=$?
    tail -6 "$OUT/throughput.log"
    [ -s "$OUT/libero_throughput${TP_TAG:-}.json" ] || return 1
    [ "$rc" -eq 0 ] || echo "libero_throughput exited $rc (124: cut by TP_S; the JSON keeps the finished runs)"
}

for stage in "$@"; do
    log "stage $stage: start"
    t0=$(date +%s)
    if "stage_$stage"; then log "stage $stage: done in $(( $(date +%s) - t0 )) s"
    else log "stage $stage: FAILED after $(( $(date +%s) - t0 )) s"; exit 1; fi
done
