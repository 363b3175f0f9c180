from soho.models.config import (
                                AttentionConfig,
                                BackboneConfig,
                                EncoderConfig,
                                ITCConfig,
                                ITMConfig,
                                MVMConfig,
                                SohoConfig,
                                VisualDictionaryConfig,
)
from soho.models.pretrained import SohoPreTrainedModel, read_config
from soho.models.soho import PretrainingOutput, SohoForPretraining, SohoModel, SohoOutput, VisualGrid
from soho.models.tasks import (
    ClassificationOutput,
    SohoForClassification,
    SohoForNLVR2,
    SohoForVisualEntailment,
    SohoForVQA,
)

__all__ = [
    "AttentionConfig", "BackboneConfig", "EncoderConfig", "ITCConfig", "ITMConfig", "MVMConfig",
    "SohoConfig", "VisualDictionaryConfig", "SohoPreTrainedModel", "read_config", "PretrainingOutput",
    "SohoForPretraining", "SohoModel", "SohoOutput", "VisualGrid", "ClassificationOutput", "SohoForClassification",
    "SohoForNLVR2", "SohoForVisualEntailment", "SohoForVQA",
]
