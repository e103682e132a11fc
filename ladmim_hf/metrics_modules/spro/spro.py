"""AU-sPRO (MVTec LOCO AD, Bergmann et al. IJCV 2022) as a local `evaluate` module.

Load it by path (no network): ``evaluate.load("ladmim_hf/metrics_modules/spro")`` or
``ladmim_hf.metrics.load_metric("spro")``.

This is a thin wrapper: `_compute` imports ``ladmim_hf.metrics`` at call time and runs
``ladmim_hf.metrics.au_spro`` (exact FPR-sPRO curve, trapezoid area up to ``max_fpr``, divided by
``max_fpr``). `evaluate` copies this script into its modules cache, so the import works only where
``ladmim_hf`` is importable: installed (``pip install -e .``), or the repository root on
``sys.path`` (e.g. loading through ``ladmim_hf.metrics.load_metric``). The import is inside
`_compute`, not at the top, because `evaluate` checks top-level imports as pip dependencies.

Inputs go through Arrow as nested lists (maps of different sizes are allowed):
``predictions`` = one 2-D float map per image, ``references`` = per image a list of 2-D region
masks (uint8 grey values = the defect's ``pixel_value``; an empty list for good images).
For large evaluations call ``ladmim_hf.metrics.au_spro`` directly and skip the Arrow round trip.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Area under the saturated per-region overlap (sPRO) curve up to a false-positive-rate limit
(default 0.05), normalised to [0, 1], as defined for MVTec LOCO AD. Each ground-truth region's
overlap with the thresholded anomaly map saturates at its defect type's saturation area from
defects_config.json; the FPR is computed on defect-free pixels.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D float arrays): anomaly maps (H, W), one per image.
    references (`list` of `list` of 2-D uint8 arrays): region masks per image (empty for good images).
    defects_config (`list` of `dict` or path, optional): content of the category's defects_config.json;
        None = no saturation (saturation area = region area).
    max_fpr (`float`, defaults to 0.05): integration limit.
    num_thresholds (`int`, optional): None = exact curve; an int = that many quantile thresholds.
    fpr_pixels (`str`, defaults to "defect_free"): "defect_free" (official LOCO code: every pixel
        outside the regions) or "good_images" (only pixels of images without regions).
Returns:
    au_spro (`float`): normalised area in [0, 1].
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


def _as_2d(x, dtype):
    """Arrow gives nested lists back; ragged rows make ``np.stack`` raise a clear error."""
    arr = np.asarray(x)
    if arr.dtype == object:
        arr = np.stack([np.asarray(row) for row in x])
    return arr.astype(dtype, copy=False)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SPRO(evaluate.Metric):
    """Normalised area under the FPR-sPRO curve (MVTec LOCO AD)."""

    # Copied from image_auroc.ImageAUROC._info, with this metric's features: `evaluate.load` reads each
    # module file on its own, so the two cannot share a base class.
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.List(datasets.Value("float32"))),
                    "references": datasets.List(datasets.List(datasets.List(datasets.Value("uint8")))),
                }
            ),
            reference_urls=["https://www.mvtec.com/company/research/datasets/mvtec-loco"],
        )

    def _compute(self, predictions, references, defects_config=None, max_fpr=0.05, num_thresholds=None,
                 fpr_pixels="defect_free"):
        try:
            import ladmim_hf.metrics as core
        except ImportError as err:
            raise ImportError(
                "the spro metric calls ladmim_hf.metrics.au_spro; install the package "
                "(pip install -e <repo>) or load the metric with ladmim_hf.metrics.load_metric('spro')"
            ) from err
        maps = [_as_2d(m, np.float32) for m in predictions]
        regions = [[_as_2d(r, np.uint8) for r in image_regions] for image_regions in references]
        value = core.au_spro(
            maps,
            regions,
            defects_config,
            max_fpr=max_fpr,
            num_thresholds=num_thresholds,
            fpr_pixels=fpr_pixels,
        )
        return {"au_spro": value}
