"""Stage 1: the Hierarchical fMRI Encoder and its hierarchy-to-hierarchy alignment loss.

    from mindhier.encoder import HierarchicalFMRIEncoder, PRESETS, VisionShape, load_encoder
    model = HierarchicalFMRIEncoder(PRESETS["demo"], num_voxels, VisionShape.of(vision))
    out = model(voxels)            # out.levels: e_1..e_M (B, T, D); out.image_final; out.text
    emb = predicted_embedding(out)  # (B, D), comparable with the vision model's image embedding
"""

from mindhier.encoder.io import VoxelCountError, check_voxels, load_encoder, model_tensors
from mindhier.encoder.losses import aligned_mse, encoder_loss, soft_clip_loss
from mindhier.encoder.metrics import flat_cosine, top1_retrieval, two_way_identification
from mindhier.encoder.model import (
    CLIP_VIT_L14,
    PRESETS,
    SUPERVISIONS,
    EncoderConfig,
    EncoderOutput,
    HierarchicalFMRIEncoder,
    VisionShape,
    count_parameters,
    encode_repetitions,
    predicted_embedding,
)
from mindhier.encoder.targets import LAYER_MAP_CHOICES, MissingTargetsError, layer_map

__all__ = [
    "CLIP_VIT_L14", "PRESETS", "SUPERVISIONS", "LAYER_MAP_CHOICES", "EncoderConfig", "EncoderOutput",
    "HierarchicalFMRIEncoder", "VisionShape", "MissingTargetsError", "VoxelCountError",
    "aligned_mse", "check_voxels", "count_parameters", "encode_repetitions", "encoder_loss", "flat_cosine",
    "layer_map", "load_encoder", "model_tensors", "predicted_embedding", "soft_clip_loss", "top1_retrieval",
    "two_way_identification",
]
