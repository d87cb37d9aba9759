#!/bin/bash
# disca_cluster on a SLURM cluster, through an Apptainer/Singularity image (disca_tools.sif).
#
# One file, three recipes; pick one with the first argument, which submits the jobs:
#
#   bash examples/slurm_cluster.sh train-node   Particles/particles.star Cluster/run1
#        (a) training on one node with several GPUs: --distribute mirrored
#   bash examples/slurm_cluster.sh train-multi  Particles/particles.star Cluster/run1
#        (b) training on several nodes: --distribute multiworker, one task per node,
#            the cluster taken from SLURM by tf.distribute's SlurmClusterResolver
#   bash examples/slurm_cluster.sh predict      New/particles.star Cluster/assign Cluster/run1 [N]
#        (c) assign many particles with a trained run: a job array of N --shard jobs and a
#            merge job that starts when all of them have succeeded (afterok)
#
# Adapt the settings below (environment variables) to your site. The project folder must be visible
# from every node (shared file system); run from its top, as RELION does. Apptainer binds $PWD by
# default; add --bind for other places (e.g. /scratch). DISCA_SIF= (empty) runs disca_cluster from
# the PATH instead of the image (a site module or virtual environment); DISCA_GPUS=0 asks for no GPU
# (training and prediction then run on the CPU cores: set DISCA_CPUS to what a node has). A missing
# logs/ folder is created first: SLURM opens each job's --output file before the job starts.
#
# Multi-node notes (b):
#  * srun starts one disca_cluster per node (--ntasks-per-node=1); each uses all GPUs of its node.
#    SlurmClusterResolver reads SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST and
#    SLURM_STEP_TASKS_PER_NODE and gives worker i the address <node>:$DISCA_PORT_BASE(+k).
#    The port (default 8888) must be free and reachable between the nodes.
#  * Instead of SLURM variables you may export TF_CONFIG yourself (it wins when set), e.g. per task:
#      TF_CONFIG='{"cluster":{"worker":["node1:8888","node2:8888"]},"task":{"type":"worker","index":'$SLURM_PROCID'}}'
#  * Task 0 (the chief) writes --o; the other workers write to a temporary folder of their own.
#  * Every worker computes all features and the same deterministic mixture fits; the nodes must
#    be the same hardware (and precision) so that they agree bit for bit.
#
# Shards (c): shard I of N holds rows I-1, I-1+N, I-1+2N, ... of the STAR file; each writes
# clusters.star (its rows only, every input column + rlnClassNumber/rlnMaxValueProbDistribution),
# features.npy and shard.json (rows, model and input fingerprints). --merge-shards checks the set
# and writes clusters.star + features.npy in the input's original order.

set -euo pipefail

SIF=${DISCA_SIF-disca_tools.sif}  # empty: disca_cluster from the PATH, no container
PARTITION=${DISCA_PARTITION:-gpu}
GPUS=${DISCA_GPUS:-4}          # GPUs per node (0: none)
CPUS=${DISCA_CPUS:-8}          # CPU cores per training task
MEM=${DISCA_MEM:-64G}          # memory per node (training) and per shard (prediction)
NODES=${DISCA_NODES:-2}        # nodes for multi-node training
PER_NODE=${DISCA_TASKS_PER_NODE:-1}  # workers per node for multi-node training
TIME=${DISCA_TIME:-24:00:00}
NET=${DISCA_NET:-}             # e.g. "--width-scale 0.5 --feature-dim 512"; empty = the full network

die() { echo "slurm_cluster.sh: $*" >&2; exit 2; }
for v in GPUS CPUS NODES PER_NODE; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "DISCA_$v must be a whole number, got '${!v}'"
done
nv=; gres() { :; }
if [ "$GPUS" -gt 0 ]; then nv=--nv; gres() { echo "--gres=gpu:$1"; }; fi
disca() {
    if [ -n "$SIF" ]; then echo "apptainer exec $nv $SIF disca_cluster $*"; else echo "disca_cluster $*"; fi
}

recipe=${1:-}
[ -n "$recipe" ] || die "usage: $0 train-node|train-multi|predict STAR OUTDIR [MODEL_DIR [N]]"
star=${2:?particles STAR file}
out=${3:?output folder}
mkdir -p logs

case "$recipe" in
train-node)
    # (a) one node, all its GPUs: MirroredStrategy, global batch = --batch-size x GPUs
    # shellcheck disable=SC2046
    sbatch --job-name=disca_train --partition="$PARTITION" --nodes=1 --ntasks=1 \
        $(gres "$GPUS") --cpus-per-task="$CPUS" --mem="$MEM" --time="$TIME" \
        --output=logs/%x_%j.out \
        --wrap="$(disca --i "$star" --o "$out" --distribute mirrored $NET)"
    ;;
train-multi)
    # (b) NODES nodes x GPUS GPUs: MultiWorkerMirroredStrategy, one task per node; the cluster
    # comes from the SLURM_* variables of the srun step (no TF_CONFIG needed)
    # shellcheck disable=SC2046
    sbatch --job-name=disca_train_mw --partition="$PARTITION" --nodes="$NODES" \
        --ntasks-per-node="$PER_NODE" $(gres "$GPUS") --cpus-per-task="$CPUS" --mem="$MEM" --time="$TIME" \
        --output=logs/%x_%j.out \
        --wrap="export DISCA_PORT_BASE=\${DISCA_PORT_BASE:-8888}; srun $(disca --i "$star" --o "$out" --distribute multiworker $NET)"
    # resume after a time limit: the same command with --continue (workers copy the chief's checkpoint)
    ;;
predict)
    # (c) a job array of N shards (one GPU each) and a merge job after all of them
    model=${4:?trained run folder (--model)}
    n=${5:-8}
    [ "$n" -ge 1 ] 2>/dev/null || die "number of shards must be a positive integer, got $n"
    # shellcheck disable=SC2046
    array_id=$(sbatch --parsable --job-name=disca_shard --partition="$PARTITION" \
        --array=1-"$n" --ntasks=1 $(gres $((GPUS > 0))) --cpus-per-task=$((CPUS < 4 ? CPUS : 4)) --mem="$MEM" --time=04:00:00 \
        --output=logs/%x_%A_%a.out \
        --wrap="$(disca --i "$star" --model "$model" --shard "\${SLURM_ARRAY_TASK_ID}/$n" \
                 --o "$out/shard_\${SLURM_ARRAY_TASK_ID}")")
    shards=$(for i in $(seq 1 "$n"); do printf '%s/shard_%s ' "$out" "$i"; done)
    sbatch --job-name=disca_merge --partition="$PARTITION" --dependency=afterok:"$array_id" --kill-on-invalid-dep=yes \
        --ntasks=1 --cpus-per-task=1 --mem=8G --time=00:30:00 --output=logs/%x_%j.out \
        --wrap="$(disca --merge-shards $shards --o "$out/merged")"
    echo "submitted shard array $array_id (1-$n) and a merge job into $out/merged"
    ;;
*)
    die "unknown recipe '$recipe' (train-node, train-multi or predict)"
    ;;
esac
