#!/usr/bin/env bash
# The whole disca_tools pipeline on a small simulated dataset made from shipped real structures.
#   simulate → pick → extract → cluster → evaluate → 3D classification → split → RELION reconstruction
#   (if installed) → reembed
# Run from the repository root by `make demo` (which creates .venv first). CPU-sized: a few minutes.
# Everything is written under demo_run/, which is treated as the RELION project directory: every path
# inside the STAR files is relative to it, as RELION expects.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${DEMO_DIR:-$ROOT/demo_run}"
SEED="${DEMO_SEED:-1}"
SNR="${DEMO_SNR:-1}"                                # signal variance / noise variance, in 3D
STRUCTURES="${DEMO_STRUCTURES:-4v4r 3j9i 1qvr}"     # 70S ribosome, 20S proteasome, ClpB
export TF_CPP_MIN_LOG_LEVEL=2
if [ -x "$ROOT/.venv/bin/python" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "1/9 disca_simulate: a crowded 320x320x128 tomogram (12 Å voxels, SNR $SNR, ±60° wedge, CTF)"
# shellcheck disable=SC2086
disca_simulate tomogram --o Simulate/tomogram --structures $STRUCTURES --shape 320,320,128 \
  --n-particles 150 --angpix 12 --snr "$SNR" --tilt-range 60 --seed "$SEED"
step "    and a subtomogram set with ground truth (40 per class, 24³, SNR $SNR)"
# shellcheck disable=SC2086
disca_simulate subtomograms --o Simulate/subtomograms --structures $STRUCTURES --n-per-class 40 \
  --box 24 --angpix 12 --snr "$SNR" --tilt-range 60 --seed "$SEED"

step "2/9 disca_pick: Difference-of-Gaussians picking (protein dark)"
disca_pick --i Simulate/tomogram/tomogram.mrc --o Pick --particle-diameter 220 --max-picks 170
disca_evaluate --i Pick/coordinates.star --truth Simulate/tomogram/particles.star --picks --o Pick/evaluation

step "3/9 disca_extract: 24³ subtomograms, protein white, 3D CTF/wedge weights"
disca_extract --i Pick/coordinates.star --o Extract --box 24 --tilt-range 60 --border pad

step "4/9 disca_cluster: DISCA (CPU-sized network: --width-scale 0.25)"
disca_cluster --i Extract/particles.star --o Cluster --seed "$SEED" ${DEMO_CLUSTER_ARGS:---width-scale 0.25 --max-iter 6 --k-candidates 2-8}

step "5/9 disca_evaluate: clusters against the simulation's ground truth (matched by position)"
disca_evaluate --i Cluster/clusters.star --truth Simulate/tomogram/particles.star --match coords --o Cluster/evaluation

step "6/9 disca_classify3d: the clusters refined by 3D classification, the pose marginalised"
disca_classify3d --i Cluster/clusters.star --o Class3D --rotations 500 --iter 10 --hold-iter 4 --max-tilt-deg 60 --seed "$SEED"
disca_evaluate --i Class3D/clusters.star --truth Simulate/tomogram/particles.star --match coords --o Class3D/evaluation

step "7/9 disca_split_star: one STAR per class, ready for RELION, with unaligned class averages"
disca_split_star --i Cluster/clusters.star --o Split --min-size 5

step "8/9 RELION: reconstruct each class, then a short 3D refinement of class 1"
if command -v relion_reconstruct >/dev/null 2>&1 && command -v relion_refine >/dev/null 2>&1; then
  for star in Split/class_*[0-9].star; do
    # picked particles carry no angles yet: this is each class's unaligned reconstruction
    relion_reconstruct --i "$star" --o "${star%.star}_relion.mrc" --ctf >/dev/null 2>&1 \
      && echo "reconstructed ${star%.star}_relion.mrc" || echo "relion_reconstruct failed on $star"
  done
  mkdir -p Refine3D/class_001
  relion_refine --i Split/class_001.star --ref Split/class_001_average.mrc --firstiter_cc --ini_high 60 \
    --iter 3 --K 1 --ctf --particle_diameter 240 --pool 10 --pad 1 --healpix_order 1 --offset_range 2 \
    --offset_step 2 --sym C1 --norm --scale --j 2 --o Refine3D/class_001/run >Refine3D/class_001/run.log 2>&1 \
    && echo "relion_refine: Refine3D/class_001/run_it003_data.star" || echo "relion_refine failed (see Refine3D/class_001/run.log)"
else
  echo "RELION not on the PATH: skipped (apt-get install relion)"
fi

step "9/9 disca_reembed: classes placed back into the tomogram"
disca_reembed --i Cluster/clusters.star --maps Split/class_*_average.mrc --o Reembed/classes \
  --tomograms Simulate/tomogram/tomogram.mrc --spheres
if [ -f Refine3D/class_001/run_it003_data.star ]; then
  # RELION's refined angles and shifts: the refined map placed at each particle's pose
  disca_reembed --i Refine3D/class_001/run_it003_data.star --maps Refine3D/class_001/run_it003_class001.mrc \
    --o Reembed/refined_class_001 --tomograms Simulate/tomogram/tomogram.mrc
fi

step "Summary"
python - <<'PY'
import json
from pathlib import Path

def load(p):
    f = Path(p)
    return json.loads(f.read_text()) if f.exists() else {}

picks = load("Pick/evaluation/evaluation.json")
clus = load("Cluster/evaluation/evaluation.json")
c3d = load("Class3D/evaluation/evaluation.json")
run = load("Cluster/run.json").get("results", {})
rows = [
    ("picking precision", picks.get("precision")),
    ("picking recall", picks.get("recall")),
    ("clusters found (K)", clus.get("k_found")),
    ("true classes", clus.get("k_true")),
    ("homogeneity", clus.get("homogeneity")),
    ("completeness", clus.get("completeness")),
    ("accuracy (Hungarian)", clus.get("accuracy")),
    ("accuracy after classify3d", c3d.get("accuracy")),
]
print(f"{'demo figure':28s} value")
for name, value in rows:
    shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    print(f"{name:28s} {shown}")
print("\noutputs:", ", ".join(sorted(str(p) for p in Path('.').iterdir())))
PY
