"""Hugging Face DeepSeek-V3 checkpoints in and out: config.json mapping, weight streaming, the CLI.

`python -m moe_train.hf import|export|config ...` (see docs/checkpoints.md); train.py's model.init_from
calls :func:`load_hf_weights`.
"""

from .config import hf_config_to_model_config, model_config_to_hf_config
from .convert import from_pretrained, load_hf_weights, read_hf_config, save_pretrained, save_state_dict

__all__ = [
    "from_pretrained",
    "hf_config_to_model_config",
    "load_hf_weights",
    "model_config_to_hf_config",
    "read_hf_config",
    "save_pretrained",
    "save_state_dict",
]
