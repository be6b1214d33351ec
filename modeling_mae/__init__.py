"""MAE (masked autoencoders for vision) as transformers models.

`import modeling_mae` registers the classes with the Auto classes, so that `AutoConfig`,
`AutoModel`, `AutoModelForPreTraining`, `AutoModelForImageClassification` and `AutoBackbone` (`MAEBackbone`) know
`model_type="mae"` (and `AutoModelForSemanticSegmentation` knows "mae_upernet", UperNet on `MAEBackbone`, with
`MAESegmentationImageProcessor` for `AutoImageProcessor` and `pipeline("image-segmentation")`),
and marks them for `register_for_auto_class`, so that `save_pretrained` / `push_to_hub` write
`auto_map` and the modeling code beside the weights (loadable with `trust_remote_code=True`).
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

from .configuration_mae import MAE_PRESETS, MAEConfig
from .image_processing_mae import MAEImageProcessor
from .image_processing_mae_segmentation import MAESegmentationImageProcessor
from .masking import make_noise, random_masking
from .modeling_mae import (
    MAEForImageClassification,
    MAEForPreTraining,
    MAEForPreTrainingOutput,
    MAEModel,
    MAEModelOutput,
    MAEPreTrainedModel,
)
from .modeling_mae_backbone import MAEBackbone, MAEUperNetConfig, MAEUperNetForSemanticSegmentation
from .pos_embed import interpolate_pos_embed, sincos_2d


__version__ = "0.1.0"

AutoConfig.register("mae", MAEConfig, exist_ok=True)
AutoModel.register(MAEConfig, MAEModel, exist_ok=True)
AutoModelForPreTraining.register(MAEConfig, MAEForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MAEConfig, MAEForImageClassification, exist_ok=True)
AutoBackbone.register(MAEConfig, MAEBackbone, exist_ok=True)
AutoImageProcessor.register(
    MAEConfig, image_processor_classes={"pil": MAEImageProcessor, "torchvision": MAEImageProcessor}, exist_ok=True
)
AutoConfig.register("mae_upernet", MAEUperNetConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(MAEUperNetConfig, MAEUperNetForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(
    MAEUperNetConfig,
    image_processor_classes={"pil": MAESegmentationImageProcessor, "torchvision": MAESegmentationImageProcessor},
    exist_ok=True,
)

MAEConfig.register_for_auto_class()
MAEModel.register_for_auto_class("AutoModel")
MAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MAEBackbone.register_for_auto_class("AutoBackbone")
MAEImageProcessor.register_for_auto_class("AutoImageProcessor")
MAEUperNetConfig.register_for_auto_class()
MAEUperNetForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
MAESegmentationImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "MAE_PRESETS",
    "MAEConfig",
    "MAEModel",
    "MAEForPreTraining",
    "MAEForImageClassification",
    "MAEBackbone",
    "MAEImageProcessor",
    "MAESegmentationImageProcessor",
    "MAEUperNetConfig",
    "MAEUperNetForSemanticSegmentation",
    "MAEPreTrainedModel",
    "MAEModelOutput",
    "MAEForPreTrainingOutput",
    "make_noise",
    "random_masking",
    "sincos_2d",
    "interpolate_pos_embed",
]
