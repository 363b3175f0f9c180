"""soho: end-to-end vision-language pre-training with a visual dictionary."""
from soho.config import ConfigError, load_config
from soho.models import SohoConfig, SohoForPretraining, SohoModel
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tokenizer import load_tokenizer, train_wordpiece_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "load_config", "SohoConfig", "SohoForPretraining", "SohoModel", "ImageTransformConfig",
    "SohoProcessor", "load_tokenizer", "train_wordpiece_tokenizer", "__version__",
]
