"""soho: end-to-end vision-language pre-training with a visual dictionary."""
from soho.config import ConfigError, load_config
from soho.models import SohoConfig, SohoForNLVR2, SohoForPretraining, SohoForVisualEntailment, SohoForVQA, SohoModel
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import load_tokenizer, train_wordpiece_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "load_config", "SohoConfig", "SohoForPretraining", "SohoModel", "SohoForNLVR2",
    "SohoForVisualEntailment", "SohoForVQA", "ImageTransformConfig",
    "SohoProcessor", "load_tokenizer", "train_wordpiece_tokenizer", "__version__",
]
