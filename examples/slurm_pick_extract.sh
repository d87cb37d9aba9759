#!/bin/bash
# Pick and extract every tomogram of a RELION project on a SLURM cluster: one array task per tomogram.
#
#   sbatch --array=1-$(wc -l < tomograms.txt) examples/slurm_pick_extract.sh tomograms.txt
#
# tomograms.txt lists one tomogram MRC per line (paths relative to the project directory, where this
# script is submitted from: RELION resolves every path in a STAR file against that directory).
# Each task writes Picks/<tomo>/ and Extract/<tomo>/; the last step (run once all tasks are done, see
# the end of this file) merges the per-tomogram particle files for disca_cluster / RELION.
#
# Memory: disca_pick reads the tomogram through a memory map in blocks (--chunk-mb per block array),
# so a 100 GB tomogram needs about 1 GB of RAM; disca_extract streams one box at a time.
#SBATCH --job-name=disca_pick_extract
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --output=logs/pick_extract_%A_%a.out

set -euo pipefail
LIST=${1:?usage: sbatch --array=1-N slurm_pick_extract.sh tomograms.txt}
DIAMETER=${DIAMETER:-250}   # particle diameter in Å
BOX=${BOX:-24}              # subtomogram box (voxels, after binning)
BIN=${BIN:-1}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} TF_CPP_MIN_LOG_LEVEL=2
mkdir -p logs

TOMO=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$LIST")
NAME=$(basename "$TOMO"); NAME=${NAME%.mrc}; NAME=${NAME%.rec}

disca_pick --i "$TOMO" --o "Picks/$NAME" --particle-diameter "$DIAMETER" --bin "$BIN" --quiet
disca_extract --i "Picks/$NAME/coordinates.star" --o "Extract/$NAME" --box "$BOX" --bin "$BIN" --quiet

# After the array finishes (e.g. sbatch --dependency=afterok:<array job id> --wrap "..."), merge:
#   python - <<'PY'
#   import glob
#   from disca_tools.io.star import read_particles, write_particles
#   import pandas as pd
#   tables = [read_particles(f) for f in sorted(glob.glob("Extract/*/particles.star"))]
#   merged = tables[0].with_particles(pd.concat([t.particles for t in tables], ignore_index=True))
#   write_particles("Extract/all_particles.star", merged)
#   PY
# (disca_cluster reads each Extract/<tomo>/subtomograms.npy fast store, or the merged STAR's .mrc files.)
