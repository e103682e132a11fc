"""Branch AUROCs of a trained model under other scoring settings, without retraining.

Each `--variants` entry is a comma-separated list of `field=value` overrides of the model's
`LadmimConfig` scoring fields (`kernel_bandwidth`, `histogram_distance`, `score_num_masked`,
`score_min_block`, `min_aspect`, `num_masks`) or of the tokenizer's structural-map fields
(`residual_normalization`, `residual_variance_floor`; `cell_channel` statistics are refitted on the
training images, as training does); an empty entry (`""`) is the model as trained. Every variant is
saved to a temporary folder and scored with `ladmim_hf.evaluation.evaluate` on the same test images
with the same mask seeds.

The branches alone are reported (the logical branch on logical anomalies, the structural branch on
structural ones) because they need no calibration: the fused score's standardisation statistics
were measured with the trained settings and would be stale under others.

    python experiments/scoring_sweep.py --model outputs/synthloco/model --data_root data/synthloco \
        --variants "" kernel_bandwidth=0.25 kernel_bandwidth=4 score_num_masked=44,score_min_block=8 \
        residual_normalization=none

Last stdout line: JSON with one entry per variant: the overrides, the mean logical-branch AUROC
(good vs logical) and structural-branch AUROC (good vs structural), and the per-category values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _shared as S

SCORING_FIELDS = {"kernel_bandwidth": float, "histogram_distance": str, "score_num_masked": int,
                  "score_min_block": int, "min_aspect": float, "num_masks": int}
TOKENIZER_FIELDS = {"residual_normalization": str, "residual_variance_floor": float}
FIELDS = {**SCORING_FIELDS, **TOKENIZER_FIELDS}


def parse_variant(text: str) -> dict:
    """`"a=1,b=2"` -> `{"a": 1, "b": 2}` with each field's type; `""` -> `{}`."""
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        field, sep, value = item.partition("=")
        if not sep or field not in FIELDS:
            raise SystemExit(f"bad variant item {item!r}: use field=value with field one of {sorted(FIELDS)}")
        try:
            overrides[field] = FIELDS[field](value)
        except ValueError:
            raise SystemExit(f"bad variant item {item!r}: {field} takes a {FIELDS[field].__name__}") from None
    return overrides


def apply_variant(model, overrides: dict, data_root: str | None = None, dataset_format: str = "loco") -> None:
    """Set the overrides on `model.config` (and rebuild the tokenizer for structural-map fields), after
    the configs' own checks accept them (setting an attribute alone would skip them: an unknown
    distance would silently score as L1). `cell_channel` residual statistics are refitted on each
    category's training images under `data_root`."""
    scoring = {k: v for k, v in overrides.items() if k in SCORING_FIELDS}
    structural = {k: v for k, v in overrides.items() if k in TOKENIZER_FIELDS}
    from ladmim_hf import LadmimTokenizerConfig

    try:
        type(model.config).from_dict({**model.config.to_dict(), **scoring})
        tokenizer_config = LadmimTokenizerConfig.from_dict({**model.config.tokenizer_config.to_dict(), **structural})
    except ValueError as error:
        raise SystemExit(f"variant {overrides}: {error}") from None
    for field, value in scoring.items():
        setattr(model.config, field, value)
    if not structural:
        return
    from ladmim_hf import LadmimTokenizerModel
    from ladmim_hf.data import find_layout
    from ladmim_hf.scoring import extract_features
    from ladmim_hf.models.image_processing_ladmim import LadmimImageProcessor

    tokenizer = LadmimTokenizerModel(tokenizer_config).eval()
    # the residual buffers exist only under cell_channel; everything else is the trained tokenizer
    tokenizer.load_state_dict({k: v for k, v in model.tokenizer.state_dict().items() if not k.startswith("residual_")},
                              strict=False)
    model.tokenizer, model.config.tokenizer_config = tokenizer, tokenizer_config
    if tokenizer_config.residual_normalization == "cell_channel":
        if data_root is None:
            raise SystemExit(f"variant {overrides}: refitting residual statistics needs the data root")
        processor = LadmimImageProcessor(size=tokenizer_config.image_size)
        for category in model.categories:
            paths = find_layout(data_root, dataset_format).paths(category, "train")
            tokenizer.fit_residual_statistics(extract_features(model.tokenizer, processor, paths, 16,
                                                               f"residuals {category}"), category)


def main(argv=None) -> None:
    parser = S.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder (or Hub id)")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--variants", nargs="+", default=[""], help='e.g. "" kernel_bandwidth=2 score_num_masked=44,score_min_block=8')
    parser.add_argument("--categories", nargs="+", default=["all"])
    parser.add_argument("--dataset_format", choices=["loco", "mvtec_ad"], default="loco")
    args = parser.parse_args(argv)
    S.use_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants]

    from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor
    from ladmim_hf.evaluation import evaluate

    categories = "all" if args.categories == ["all"] else args.categories
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for index, overrides in enumerate(variants):
            model = LadmimForAnomalyDetection.from_pretrained(args.model)
            apply_variant(model, overrides, args.data_root, args.dataset_format)
            model_dir = root / f"variant_{index}"
            model.save_pretrained(model_dir)
            LadmimImageProcessor.from_pretrained(args.model).save_pretrained(model_dir)  # the model's own preprocessing
            metrics = evaluate(str(model_dir), args.data_root, categories, str(root / f"eval_{index}"), seed=args.seed,
                               knn_baseline=False, dataset_format=args.dataset_format, report_images=0)
            per_category = {name: round(entry["branches"]["logical"]["auroc_logical"], 4)
                            for name, entry in metrics["categories"].items()}
            structural = {name: round(entry["branches"]["structural"]["auroc_structural"], 4)
                          for name, entry in metrics["categories"].items()}
            mean = round(metrics["branches_mean"]["logical"]["auroc_logical"], 4)
            structural_mean = round(metrics["branches_mean"]["structural"]["auroc_structural"], 4)
            rows.append({"overrides": overrides, "logical_branch_auroc": mean, "per_category": per_category,
                         "structural_branch_auroc": structural_mean, "structural_per_category": structural})
            S.progress(f"[scoring_sweep] {overrides or 'as trained'}: logical branch {mean:.4f} {per_category}; "
                  f"structural branch {structural_mean:.4f} {structural}")
    summary = "scoring sweep: logical-branch / structural-branch AUROC " + "; ".join(
        f"{','.join(f'{k}={v}' for k, v in row['overrides'].items()) or 'as trained'}: "
        f"{row['logical_branch_auroc']:.3f} / {row['structural_branch_auroc']:.3f}"
        for row in rows)
    S.report(summary, {"experiment": "scoring_sweep", "model": args.model, "seed": args.seed, "variants": rows})


if __name__ == "__main__":
    main()
