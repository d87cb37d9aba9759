#!/usr/bin/env bash
# The whole disca_tools pipeline on a small simulated dataset made from shipped real structures.
#   simulate → pick → extract → cluster → evaluate → split → RELION reconstruction (if installed) → reembed
# Run from the repository root by `make demo` (which creates .venv first). CPU-sized: a few minutes.
# Everything is written under demo_run/, which is treated as the RELION project directory: every path
# inside the STAR files is relative to it, as RELION expects.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${DEMO_DIR:-$ROOT/demo_run}"
SEED="${DEMO_SEED:-1}"
STRUCTURES="${DEMO_STRUCTURES:-4v4r 3j9i 1qvr}"     # 70S ribosome, 20S proteasome, ClpB
export TF_CPP_MIN_LOG_LEVEL=2
if [ -x "$ROOT/.venv/bin/python" ]; then export PATH="$ROOT/.venv/bin:$PATH"; fi

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "1/8 disca_simulate: a crowded 320x320x128 tomogram (12 Å voxels, SNR 0.1, ±60° wedge, CTF)"
# shellcheck disable=SC2086
disca_simulate tomogram --o Simulate/tomogram --structures $STRUCTURES --shape 320,320,128 \
  --n-particles 150 --angpix 12 --snr 0.1 --tilt-range 60 --seed "$SEED"
step "    and a subtomogram set with ground truth (40 per class, 24³, SNR 0.1)"
# shellcheck disable=SC2086
disca_simulate subtomograms --o Simulate/subtomograms --structures $STRUCTURES --n-per-class 40 \
  --box 24 --angpix 12 --snr 0.1 --tilt-range 60 --seed "$SEED"

step "2/8 disca_pick: Difference-of-Gaussians picking (protein dark)"
disca_pick --i Simulate/tomogram/tomogram.mrc --o Pick --particle-diameter 220 --max-picks 170
disca_evaluate --i Pick/coordinates.star --truth Simulate/tomogram/particles.star --picks --o Pick/evaluation

step "3/8 disca_extract: 24³ subtomograms, protein white, 3D CTF/wedge weights"
disca_extract --i Pick/coordinates.star --o Extract --box 24 --tilt-range 60 --border pad

step "4/8 disca_cluster: DISCA (CPU-sized network: --width-scale 0.25)"
disca_cluster --i Extract/particles.star --o Cluster --seed "$SEED" ${DEMO_CLUSTER_ARGS:---width-scale 0.25 --max-iter 6 --k-candidates 2-8}

step "5/8 disca_evaluate: clusters against the simulation's ground truth (matched by position)"
disca_evaluate --i Cluster/clusters.star --truth Simulate/tomogram/particles.star --match coords --o Cluster/evaluation

step "6/8 disca_split_star: one STAR per class, ready for RELION, with unaligned class averages"
disca_split_star --i Cluster/clusters.star --o Split --min-size 5

step "7/8 RELION: reconstruct each class (ground-truth angles transferred, simulation only)"
if command -v relion_reconstruct >/dev/null 2>&1; then
  for star in Split/class_*.star; do
    relion_reconstruct --i "$star" --o "${star%.star}_relion.mrc" >/dev/null 2>&1 \
      && echo "reconstructed ${star%.star}_relion.mrc" || echo "relion_reconstruct failed on $star"
  done
else
  echo "relion_reconstruct not on the PATH: skipped (apt-get install relion)"
fi

step "8/8 disca_reembed: class averages placed back into the tomogram"
disca_reembed --i Cluster/clusters.star --maps Split/class_*_average.mrc --o Reembed \
  --tomograms Simulate/tomogram/tomogram.mrc --spheres

step "Summary"
python - <<'PY'
import json
from pathlib import Path

def load(p):
    f = Path(p)
    return json.loads(f.read_text()) if f.exists() else {}

picks = load("Pick/evaluation/evaluation.json")
clus = load("Cluster/evaluation/evaluation.json")
run = load("Cluster/run.json").get("results", {})
rows = [
    ("picking precision", picks.get("precision")),
    ("picking recall", picks.get("recall")),
    ("clusters found (K)", clus.get("k_found")),
    ("true classes", clus.get("k_true")),
    ("homogeneity", clus.get("homogeneity")),
    ("completeness", clus.get("completeness")),
    ("accuracy (Hungarian)", clus.get("accuracy")),
]
print(f"{'demo figure':28s} value")
for name, value in rows:
    shown = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
    print(f"{name:28s} {shown}")
print("\noutputs:", ", ".join(sorted(str(p) for p in Path('.').iterdir())))
PY
