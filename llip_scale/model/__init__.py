"""Pure-PyTorch models: towers, the Llip head and the baselines, named sizes."""
from llip_scale.model.config import HeadConfig, ModelConfig, TextConfig, VisionConfig
from llip_scale.model.llip import ContrastiveModel, build_model
from llip_scale.model.zoo import model_config, model_names

__all__ = ["ContrastiveModel", "build_model", "model_config", "model_names", "ModelConfig",
           "VisionConfig", "TextConfig", "HeadConfig"]
