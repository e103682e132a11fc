"""Logical AUROC of a trained model against the number of test-time masks, without retraining.

For every m in `--masks`, `ladmim_hf.evaluation.evaluate(..., num_masks=m, knn_baseline=False)` on the
same test images with the same seed; reports the mean image AUROC good vs logical of the fused score
and of the logical branch alone. The scoring time per mask count is a speed question:
`benchmarks/mask_sweep.py`.

    python experiments/mask_count.py --model outputs/synthloco/model --data_root data/synthloco

Last stdout line: JSON with num_masks, logical_auroc and logical_branch_auroc (one value per count).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ladmim_hf.evaluation import evaluate

import _shared as S


def main(argv=None) -> None:
    parser = S.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder (or Hub id)")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--masks", default="1,5,10,20,50", help="comma-separated mask counts")
    parser.add_argument("--categories", nargs="+", default=["all"])
    parser.add_argument("--dataset_format", choices=["loco", "mvtec_ad"], default="loco")
    parser.add_argument("--output_dir", default=None, help="where each evaluation writes (default: a temporary folder)")
    args = parser.parse_args(argv)
    S.use_threads(args.threads)
    counts = [int(m) for m in args.masks.split(",")]
    categories = "all" if args.categories == ["all"] else args.categories
    fused, branch = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.output_dir or tmp)
        for m in counts:
            metrics = evaluate(args.model, args.data_root, categories, str(root / f"masks_{m}"), num_masks=m,
                               seed=args.seed, knn_baseline=False, dataset_format=args.dataset_format)
            fused.append(round(metrics["mean"]["auroc_logical"], 4))
            branch.append(round(metrics["branches_mean"]["logical"]["auroc_logical"], 4))
            S.progress(f"[mask_count] {m} masks: logical AUROC {fused[-1]:.4f} (logical branch {branch[-1]:.4f})")
    S.report("mask count: logical AUROC (logical branch) " + ", ".join(
        f"{m}: {a:.3f} ({b:.3f})" for m, a, b in zip(counts, fused, branch)),
        {"experiment": "mask_count", "model": args.model, "seed": args.seed, "num_masks": counts,
         "logical_auroc": fused, "logical_branch_auroc": branch})


if __name__ == "__main__":
    main()
