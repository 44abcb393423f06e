#!/usr/bin/env bash
# Runs a dit_jax job (by default the paper's scaling sweep) on every worker of a Cloud TPU pod slice.
#
#   tools/launch_tpu_pod.sh TPU_NAME ZONE BUCKET [more dit_jax.main flags ...]   # BUCKET: no gs://
#   FID_REF=/gcs/VIRTUAL_imagenet256_labeled.npz VAE=/gcs/sd-vae-ft-ema \
#     tools/launch_tpu_pod.sh my-v4-64 us-central2-b my-bucket --config.sweep.member=DiT-XL/2
#
# 1. packs this checkout (git archive HEAD) and copies it to every worker;
# 2. installs it on every worker in ~/dit_jax_venv with jax[tpu];
# 3. mounts gs://BUCKET at /gcs on every worker with gcsfuse: checkpoints (every host writes its
#    shards), results.jsonl and the ImageNet latents (tools/extract_latents.py output, expected at
#    /gcs/imagenet256_latents) must be visible to all hosts;
# 4. starts `python -m dit_jax.main` on all workers at once (DIT_JAX_DISTRIBUTED=1 makes the trainer
#    call jax.distributed.initialize(), which finds the pod's workers by itself), detached, logging
#    to ~/dit_jax.log on each worker.
# Re-running it resumes: finished sweep members are skipped, an interrupted one restarts from its
# newest checkpoint. Environment: CONFIG (default configs/dit_sweep.py:paper), WORKDIR (default
# /gcs/dit_sweep_paper), LATENTS (default /gcs/imagenet256_latents), FID_REF (the reference
# statistics .npz, e.g. ADM's VIRTUAL_imagenet256_labeled.npz) and VAE (the diffusers SD-VAE folder
# that decodes samples for FID, e.g. stabilityai/sd-vae-ft-ema), both paths the workers see (under
# /gcs), required for the paper preset and passed to any other CONFIG when set.
# Follow a worker: gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=0 --command="tail -f ~/dit_jax.log"
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,/^set /{/^#/p}' "$0"; exit 2
fi
TPU=$1 ZONE=$2 BUCKET=$3
shift 3
CONFIG=${CONFIG:-configs/dit_sweep.py:paper}
WORKDIR=${WORKDIR:-/gcs/dit_sweep_paper}
LATENTS=${LATENTS:-/gcs/imagenet256_latents}
if [[ $CONFIG == *:paper ]]; then
  : "${FID_REF:?set FID_REF to the reference statistics .npz on the workers (e.g. /gcs/VIRTUAL_imagenet256_labeled.npz)}"
  : "${VAE:?set VAE to the SD-VAE folder on the workers that decodes samples (e.g. /gcs/sd-vae-ft-ema)}"
fi
EVAL=""
[[ -z ${FID_REF:-} ]] || EVAL+=$(printf ' %q' "--config.eval.fid.reference=$FID_REF")
[[ -z ${VAE:-} ]] || EVAL+=$(printf ' %q' "--config.eval.vae_path=$VAE")
EXTRA=""
[[ $# -eq 0 ]] || EXTRA=$(printf ' %q' "$@")  # quoted for the remote shell

cd "$(dirname "$0")/.."
git archive --format=tar.gz -o /tmp/dit_jax.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/dit_jax.tar.gz "$TPU":~/dit_jax.tar.gz --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
set -e
rm -rf ~/dit_jax && mkdir -p ~/dit_jax && tar xzf ~/dit_jax.tar.gz -C ~/dit_jax
[ -x ~/dit_jax_venv/bin/python ] || python3 -m venv ~/dit_jax_venv
~/dit_jax_venv/bin/pip install -q -e ~/dit_jax 'jax[tpu]'
command -v gcsfuse > /dev/null || { echo 'install gcsfuse on the workers: https://cloud.google.com/storage/docs/cloud-storage-fuse/install'; exit 1; }
sudo mkdir -p /gcs
mountpoint -q /gcs || sudo gcsfuse --implicit-dirs -o allow_other $BUCKET /gcs
cd ~/dit_jax
DIT_JAX_DISTRIBUTED=1 nohup ~/dit_jax_venv/bin/python -m dit_jax.main --config=$CONFIG \
  --workdir=$WORKDIR --config.data.path=$LATENTS$EVAL $EXTRA > ~/dit_jax.log 2>&1 < /dev/null &
echo \"worker \$(hostname): started, log ~/dit_jax.log\"
"
