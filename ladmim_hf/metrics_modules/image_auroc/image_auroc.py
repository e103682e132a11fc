"""Image-level AUROC for anomaly detection as a local `evaluate` module.

Load it by path (no network): ``evaluate.load("ladmim_hf/metrics_modules/image_auroc")`` or
``ladmim_hf.metrics.load_metric("image_auroc")``.

Self-contained on purpose: `evaluate` copies this script into its modules cache, so it must not
import ``ladmim_hf``. It calls scikit-learn directly and mirrors the input checks of
``ladmim_hf.metrics.image_auroc`` (finite scores, 0/1 labels, both classes present; an AUROC below
0.5 is returned as it is, never flipped).
"""

import datasets
import evaluate
import numpy as np
import sklearn.metrics

_DESCRIPTION = """
Area under the ROC curve of image anomaly scores (higher = more anomalous) against binary labels
(0 = normal, 1 = anomalous), computed with scikit-learn's roc_auc_score.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): image anomaly scores, finite.
    references (`list` of `int`): 0 for normal images, 1 for anomalous ones; both must occur.
Returns:
    auroc (`float`): area under the ROC curve, in [0, 1].
Examples:
    >>> metric = evaluate.load("ladmim_hf/metrics_modules/image_auroc")
    >>> metric.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])
    {'auroc': 0.75}
"""

_CITATION = """
@article{bergmann2022beyond,
  title   = {Beyond Dents and Scratches: Logical Constraints in Unsupervised Anomaly Detection and Localization},
  author  = {Bergmann, Paul and Batzner, Kilian and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  journal = {International Journal of Computer Vision},
  volume  = {130},
  pages   = {947--969},
  year    = {2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ImageAUROC(evaluate.Metric):
    """Image-level AUROC (higher score = more anomalous)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("float64"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html"],
        )

    def _compute(self, predictions, references):
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        bad = ~np.isfinite(scores)
        if bad.any():
            raise ValueError(
                f"predictions contain {int(bad.sum())} NaN/inf value(s) "
                f"(first at indices {np.flatnonzero(bad)[:5].tolist()}); AUROC needs finite scores"
            )
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"references must be 0 or 1; found {np.unique(labels).tolist()[:10]}")
        if labels.size == 0 or labels.min() == labels.max():
            raise ValueError(
                f"AUROC is undefined: only one class is present in {labels.size} references; "
                "it needs both normal (0) and anomalous (1) samples"
            )
        return {"auroc": float(sklearn.metrics.roc_auc_score(labels, scores))}
