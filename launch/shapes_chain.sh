#!/usr/bin/env bash
# Usage: launch/shapes_chain.sh RUNS_DIR [main.py train flags for every stage...]
#
# The bundled shapes model from scratch, the chain of docs/training.md: the VAE, the CLIP text
# encoder, three U-Net stages at batch 64, two at batch 256 and one at batch 128 with a lower learning
# rate, each stage starting from the last one's export; the VAE's decoder fitted to that U-Net's
# latents; then `main.py eval` on 1000 captions. The data
# set is generated in memory (data.source=shapes: the examples of the TFDS build, no TensorFlow needed).
#
# Re-running it goes on where it stopped: a finished stage is skipped, an interrupted one
# resumes from its newest checkpoint. Each stage's and export's wall time goes to RUNS_DIR/times.tsv
# (name, steps, seconds; a fourth column `interrupted` for a stage stopped by a signal).
#
# Environment:
#   STEPS_SCALE   multiplies every stage's step count (default 1; e.g. 0.002 for a smoke run)
#   EVAL_N        captions for the final eval (default 1000; 0 skips it)
#
# Example, on one GPU host:
#   launch/shapes_chain.sh /runs/chain
set -euo pipefail

RUNS=${1:?usage: $0 RUNS_DIR [main.py train flags...]}
shift
STEPS_SCALE=${STEPS_SCALE:-1}
EVAL_N=${EVAL_N:-1000}
cd "$(dirname "$0")/.."
mkdir -p "$RUNS"
COMMON=(--config.data.source=shapes --config.sample_every=0 "$@")

steps() { python3 -c "import sys; print(max(1, round(int(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$STEPS_SCALE"; }

# train NAME STEPS TRAIN_FLAGS...: the run RUNS/NAME for STEPS steps (skipped once RUNS/NAME.done exists)
train() {
  local name=$1 n; n=$(steps "$2"); shift 2
  if [[ -e $RUNS/$name.done ]]; then
    echo "== $name: done already, skipped"
    return
  fi
  echo "== $name: $n steps"
  local t0=$SECONDS
  # A stage stopped by a signal (a job's time limit: `timeout 540 launch/shapes_chain.sh ...`) still
  # has its time counted: the re-run resumes it from its last checkpoint and adds its own row.
  trap 'printf "%s\t%s\t%d\tinterrupted\n" "$name" "$n" $((SECONDS - t0)) | tee -a "$RUNS/times.tsv"; exit 143' TERM INT
  python3 main.py train "$@" --workdir "$RUNS/$name" --config.train.steps="$n" "${COMMON[@]}"
  trap - TERM INT
  printf '%s\t%s\t%d\n' "$name" "$n" $((SECONDS - t0)) | tee -a "$RUNS/times.tsv"
  touch "$RUNS/$name.done"
}

# export NAME [main.py export flags...]: RUNS/NAME -> the diffusers folder RUNS/NAME.out
export_run() {
  local name=$1 t0=$SECONDS; shift
  [[ -e $RUNS/$name.out/model_index.json ]] && return
  python3 main.py export "$RUNS/$name" "$RUNS/$name.out" "$@"
  printf '%s\t0\t%d\n' "$name.export" $((SECONDS - t0)) | tee -a "$RUNS/times.tsv"
}

train vae 3000 --config configs/shapes_vae.py
train clip 1000 --config configs/shapes_clip.py --config.init.path="$RUNS/vae"
train unet1 7000 --config configs/shapes_unet.py --config.init.path="$RUNS/clip" \
  --config.init.components='("vae","text_encoders")' --config.train.train_text_encoder=False
export_run unet1 --raw  # the next stage starts from its raw weights, the later ones from EMA weights
train unet2 7000 --config configs/shapes_unet.py:retext --config.init.path="$RUNS/unet1.out"
export_run unet2
train unet3 5000 --config configs/shapes_unet.py:retext --config.init.path="$RUNS/unet2.out"
export_run unet3
train unet4 1300 --config configs/shapes_unet.py:retext --config.init.path="$RUNS/unet3.out" \
  --config.train.batch_size=256
export_run unet4
train unet5 7000 --config configs/shapes_unet.py:retext --config.init.path="$RUNS/unet4.out" \
  --config.train.batch_size=256
export_run unet5
train unet6 2800 --config configs/shapes_unet.py:retext --config.init.path="$RUNS/unet5.out" \
  --config.train.batch_size=128 --config.train.learning_rate=2e-4 --config.train.warmup_steps=100
export_run unet6 --sampler dpmpp_2m_sde --steps 30 --cfg 2
# the decoder, on the U-Net's img2img redraws of training images (everything else frozen)
train decoder 1200 --config configs/shapes_vae.py:redraw --config.init.path="$RUNS/unet6.out"
export_run decoder  # with the defaults its redraws were drawn with (shapes_vae.py:redraw)

awk -F'\t' '{s += $3} END {printf "== the chain took %d s (%.1f min)\n", s, s / 60}' "$RUNS/times.tsv"
if [[ $EVAL_N -gt 0 ]]; then
  python3 main.py eval --model "$RUNS/decoder.out" --n "$EVAL_N" --seed 1
fi
