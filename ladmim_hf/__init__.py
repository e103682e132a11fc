"""ladmim-hf: LADMIM logical anomaly detection as Hugging Face models.

Importing the package registers the models with the transformers Auto classes, so
`AutoModel.from_pretrained(path)` works without `trust_remote_code` when `ladmim_hf` is installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .models.configuration_ladmim import LadmimConfig, LadmimPredictorConfig, LadmimTokenizerConfig
from .models.image_processing_ladmim import ImageDecodeError, LadmimImageProcessor, load_image
from .models.masking import BlockMaskGenerator
from .models.modeling_ladmim import LadmimAnomalyOutput, LadmimForAnomalyDetection
from .models.modeling_ladmim_predictor import LadmimPredictorModel, LadmimPredictorOutput
from .models.modeling_ladmim_tokenizer import LadmimTokenizerModel, LadmimTokenizerOutput
from .models.modeling_ladmim_utils import code_histograms

__version__ = "0.1.0"


def _register() -> None:
    """Register with the Auto classes (in-process) and mark the classes for remote-code saving."""
    for config_class, model_class in (
        (LadmimConfig, LadmimForAnomalyDetection),
        (LadmimTokenizerConfig, LadmimTokenizerModel),
        (LadmimPredictorConfig, LadmimPredictorModel),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModel")
    AutoImageProcessor.register(LadmimConfig, slow_image_processor_class=LadmimImageProcessor, exist_ok=True)
    LadmimImageProcessor.register_for_auto_class("AutoImageProcessor")


_register()

from .models import pipeline_ladmim  # noqa: E402  registers the "image-anomaly-detection" pipeline task

__all__ = [
    "BlockMaskGenerator",
    "ImageDecodeError",
    "LadmimAnomalyOutput",
    "LadmimConfig",
    "LadmimForAnomalyDetection",
    "LadmimImageProcessor",
    "LadmimPredictorConfig",
    "LadmimPredictorModel",
    "LadmimPredictorOutput",
    "LadmimTokenizerConfig",
    "LadmimTokenizerModel",
    "LadmimTokenizerOutput",
    "code_histograms",
    "load_image",
]
