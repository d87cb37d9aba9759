#!/bin/bash
# Pick and extract every tomogram of a RELION project on a SLURM cluster: one array task per
# tomogram, then one merge job.
#
#   bash examples/slurm_pick_extract.sh tomograms.txt
#
# tomograms.txt lists one tomogram MRC per line (paths relative to the project directory, where this
# script is run from: RELION resolves every path in a STAR file against that directory; blank lines
# are ignored). The tomograms' file names (less .mrc/.rec) must differ: task i writes Picks/<name>/
# and Extract/<name>/. Run without sbatch: the script checks the list, creates logs/ (SLURM opens the
# --output file before a job starts, so a missing folder fails every task without a log), submits
# the array (this file again, with --task) and a merge job that starts once every task has
# succeeded (afterok). The merge is RELION's own `relion_star_handler --combine` (set
# RELION_STAR_HANDLER, e.g. to "module load relion; relion_star_handler", where it is not on the
# PATH of the compute nodes); it writes Extract/particles.star for disca_cluster and RELION
# (disca_cluster and disca_split_star read its subtomograms from the per-tomogram stores
# Extract/<name>/subtomograms.npy in place: keep those folders where they are).
#
# Settings (environment): DIAMETER particle diameter in Å (250), BOX subtomogram box in voxels
# after binning (24), BIN (1), PICK_ARGS / EXTRACT_ARGS more options for disca_pick /
# disca_extract (e.g. EXTRACT_ARGS="--tilt-range 60"), SBATCH_ARGS more sbatch options for every
# job (e.g. "--partition=cpu --account=lab").
#
# Memory: disca_pick reads the tomogram through a memory map in blocks (--chunk-mb per block array),
# so a 100 GB tomogram needs about 1 GB of RAM; disca_extract streams one box at a time.
#SBATCH --job-name=disca_pick_extract
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=02:00:00
#SBATCH --output=logs/pick_extract_%A_%a.out

set -euo pipefail
die() { echo "slurm_pick_extract.sh: $*" >&2; exit 2; }
name_of() { local n; n=$(basename "$1"); n=${n%.mrc}; echo "${n%.rec}"; }

if [ "${1:-}" = "--task" ]; then  # one array task: the tomogram on line SLURM_ARRAY_TASK_ID
    LIST=$2
    export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} TF_CPP_MIN_LOG_LEVEL=2
    TOMO=$(sed -n "${SLURM_ARRAY_TASK_ID:?not a SLURM array task}p" "$LIST")
    NAME=$(name_of "$TOMO")
    # shellcheck disable=SC2086
    disca_pick --i "$TOMO" --o "Picks/$NAME" --particle-diameter "${DIAMETER:-250}" \
        --bin "${BIN:-1}" --quiet ${PICK_ARGS:-}
    # shellcheck disable=SC2086
    disca_extract --i "Picks/$NAME/coordinates.star" --o "Extract/$NAME" --box "${BOX:-24}" \
        --bin "${BIN:-1}" --quiet ${EXTRACT_ARGS:-}
    exit 0
fi

LIST=${1:?usage: bash slurm_pick_extract.sh tomograms.txt}
[ -f "$LIST" ] || die "$LIST: no such file"
# the tasks read a copy without blank lines or trailing spaces (the list itself is left as it is)
tomograms=$(sed -e '/^[[:space:]]*$/d' -e 's/[[:space:]]*$//' "$LIST")
[ -n "$tomograms" ] || die "$LIST: lists no tomogram"
n=$(wc -l <<< "$tomograms")
stars=
while read -r tomo; do
    [ -f "$tomo" ] || die "$LIST: $tomo does not exist (paths are relative to $(pwd))"
    name=$(name_of "$tomo")
    for d in Picks Extract; do
        [ ! -e "$d/$name" ] || die "$d/$name exists: move it away first"
    done
    stars+="Extract/$name/particles.star "
done <<< "$tomograms"
dup=$(while read -r tomo; do name_of "$tomo"; done <<< "$tomograms" | sort | uniq -d | head -1)
[ -z "$dup" ] || die "$LIST: two tomograms are named $dup; their Picks/ and Extract/ folders would collide"
[ ! -e Extract/particles.star ] || die "Extract/particles.star exists: move it away first (the merge would replace it)"
mkdir -p logs
TASKS=logs/tomograms_$(date +%Y%m%d_%H%M%S)_$$.txt
echo "$tomograms" > "$TASKS"

# shellcheck disable=SC2086
array_id=$(sbatch --parsable ${SBATCH_ARGS:-} --array=1-"$n" "$0" --task "$TASKS")
# shellcheck disable=SC2086
merge_id=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=disca_merge --dependency=afterok:"$array_id" --kill-on-invalid-dep=yes \
    --ntasks=1 --cpus-per-task=1 --mem=2G --time=00:30:00 --output=logs/merge_%j.out \
    --wrap="${RELION_STAR_HANDLER:-relion_star_handler} --combine --i '${stars% }' --o Extract/particles.star")
echo "submitted array job $array_id ($n tomograms) and merge job $merge_id (Extract/particles.star)"
