"""What happens to class information inside the EM loop, iteration by iteration?

Runs ``disca_tools.cluster.em.run_em`` on a Table S1-style simulated set and records, at every
iteration, the K the mixtures chose and its homogeneity against the truth, and how separable the
(PCA-reduced) features are: homogeneity of k-means with the true K. The loop itself is unchanged;
the probe only wraps its mixture-selection call to look at its input and output. ``--init-k K`` is
an oracle on K: iteration 0 fits K components only (later iterations choose K by BIC as usual), to
ask what the loop does with the right number of clusters to start from.

    python benchmarks/probe_em_dynamics.py [--n-per-class 200] [--snr 0.1] \\
        [--snr-convention volume|aitom] [--init network|voxels] [--max-iter 4] [--tag T] \\
        [--set key=value ...]   (any EMConfig field, e.g. --set lr=3e-4 --set pca_dim=8) [--init-k K] \\
        [--pca-sweep 3 4 6 8 16]   (K and accuracy of the BIC on fewer principal components too)

Prints a table and saves benchmarks/results/probe_em_dynamics[_TAG].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from disca_tools.model.backend import import_tensorflow  # noqa: E402

import_tensorflow()  # TensorFlow's start-up lines kept out of the log

import numpy as np  # noqa: E402
from common import save_result  # noqa: E402
from sklearn.metrics import homogeneity_score  # noqa: E402
from table_s1_cell import (  # noqa: E402
    STRUCTURES,
    IterationWatcher,
    add_cell_arguments,
    simulate_cell,
)

from disca_tools.cluster import em  # noqa: E402
from disca_tools.io.store import SubtomogramStore  # noqa: E402
from disca_tools.model.yopo import resolve_precision  # noqa: E402


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _force_first_k(k: int) -> None:
    """Make the loop's first mixture selection (iteration 0) fit ``k`` components only."""
    select = em.select_mixture
    calls = []

    def first_at_k(x, k_candidates, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            k_candidates = [k]
        return select(x, k_candidates, *args, **kwargs)

    em.select_mixture = first_at_k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_arguments(ap)
    ap.add_argument("--width-scale", type=float, default=0.1)
    ap.add_argument("--max-iter", type=int, default=4)
    ap.add_argument("--init", default="network")
    ap.add_argument("--set", action="append", default=[], help="EMConfig field=value")
    ap.add_argument("--init-k", type=int, default=0, help="oracle: iteration 0 fits this K only")
    ap.add_argument(
        "--pca-sweep",
        type=int,
        nargs="+",
        default=[],
        help="also select K (paper BIC) on the first d principal components of each iteration's "
        "points, for each d given (at most --set pca_dim)",
    )
    args = ap.parse_args()
    if args.init_k:
        _force_first_k(args.init_k)
    from disca_tools.runtime.log import configure

    configure()
    t0 = time.time()
    sim = simulate_cell(args)
    truth = sim.labels
    overrides = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = em.EMConfig(
        max_iter=args.max_iter,
        width_scale=args.width_scale,
        seed=args.seed,
        precision=resolve_precision("auto"),
        init=args.init,
        **overrides,
    )
    store = SubtomogramStore(
        volumes=sim.volumes, names=[f"s{i}" for i in range(len(sim))], path=Path("<memory>")
    )
    watch = IterationWatcher(
        truth, len(STRUCTURES), echo=True, pca_sweep=args.pca_sweep, k_candidates=cfg.k_candidates
    )
    res = em.run_em(store, np.arange(len(sim)), cfg, on_iteration=watch)
    records = watch.records
    final_h = float(homogeneity_score(truth, res.labels))
    print(f"best iteration {res.best_iteration}: K={res.k} h={final_h:.4f}")
    out = {
        "protocol": {**vars(args), "effective_snr": sim.effective_snr},
        "overrides": overrides,
        "iterations": records,
        "best_iteration": int(res.best_iteration),
        "final_k": int(res.k),
        "final_h": round(final_h, 4),
        "seconds": round(time.time() - t0, 1),
    }
    save_result("probe_em_dynamics", args.tag, out)


if __name__ == "__main__":
    main()
