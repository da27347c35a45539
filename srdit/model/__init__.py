"""The SR-DiT network, its frozen encoders and checkpoint conversion."""
from srdit.model.checkpoint import convert_release_state_dict, load_release_weights
from srdit.model.sit import ModelOutput, SRDiT, build_model, count_params, select_tokens

__all__ = [
    "ModelOutput", "SRDiT", "build_model", "count_params", "select_tokens",
    "convert_release_state_dict", "load_release_weights",
]
