#!/usr/bin/env bash
# How a SLURM job's task starts its Python inside the sweep's container (the cluster YAML's
# `container` and `container_runtime`): submitit runs `bash containers/job/run.sh RUNTIME IMAGE
# MOUNTS` as the job's python, on the compute node, outside the container, and appends its own
# arguments (-u -m submitit.core._submit FOLDER).
#
#   RUNTIME  apptainer: apptainer exec --nv (GPUs passed in); podman: podman run (the dev cluster's
#            stand-in for the runtimes of clusters, CPU only). pyxis does not come here: srun
#            itself starts the container (--container-image), see trainer/launch/slurm.py.
#   IMAGE    a .sif file (apptainer), an image name (podman)
#   MOUNTS   comma-separated host folders, each mounted at its own path: the sweep folder, the
#            data, the checkout the launcher read its configs from, the submit folder
#
# This folder is mounted into the container at /opt/cifar-job, read-only: its `python` puts its
# `scontrol` first on PATH. Images carry no SLURM, so submitit's `scontrol requeue` after a
# pre-emption checkpoint would fail inside; that scontrol hands the request out to the batch script
# (the watcher trainer/launch/slurm.py writes into it), which requeues the job from outside.
set -euo pipefail
[[ $# -ge 3 ]] || { echo "run.sh: usage: run.sh RUNTIME IMAGE MOUNTS [python arguments]" >&2; exit 2; }
runtime=$1 image=$2 mounts=$3
shift 3
tools=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IFS=, read -r -a folders <<< "$mounts"

case $runtime in
    apptainer)
        binds=("--bind" "$tools:/opt/cifar-job:ro")
        for f in "${folders[@]}"; do binds+=("--bind" "$f:$f"); done
        # Apptainer passes the host's environment (SLURM_*, CIFAR_REQUEUE_FILE, ...) in as it is.
        exec apptainer exec --nv "${binds[@]}" --pwd "$PWD" "$image" /opt/cifar-job/python "$@"
        ;;
    podman)
        args=(run --rm --init --network=host --ipc=host --pull=never --workdir "$PWD"
              -v "$tools:/opt/cifar-job:ro")
        for f in "${folders[@]}"; do args+=(-v "$f:$f"); done
        # Rootless podman keeps the user's uid inside, so that the run folders stay theirs.
        [[ $(id -u) == 0 ]] || args+=(--userns=keep-id)
        # What the job's Python reads from its environment: SLURM's and submitit's variables (rank,
        # job id, nodes), the requeue hand-over, W&B's settings, the GPUs SLURM gave.
        for name in 'SLURM_*' 'SUBMITIT_*' 'CIFAR_*' 'WANDB_*' 'NCCL_*' CUDA_VISIBLE_DEVICES OMP_NUM_THREADS; do
            args+=(--env "$name")
        done
        # podman run passes SIGUSR2/SIGTERM on to the container's process (--sig-proxy, the default).
        exec podman "${args[@]}" "$image" /opt/cifar-job/python "$@"
        ;;
    *)
        echo "run.sh: unknown container runtime '$runtime' (apptainer or podman)" >&2
        exit 2
        ;;
esac
