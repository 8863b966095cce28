"""Stage-2 tokenizer: VAR's multi-scale residual VQ-VAE (paper §3.3, SPEC §4).

    from mindhier.tokenizer import PRESETS, MultiScaleVQVAE
    vae = MultiScaleVQVAE(PRESETS["demo"])
    idx = vae.img_to_indices(vae.images01_to_input(images01))   # K maps (B, pn_k²)
    images01 = vae.output_to_images01(vae.indices_to_img(idx))

Training lives in ``mindhier.train.tokenizer`` (``mindhier train-tokenizer``).
"""

from mindhier.tokenizer.config import PRESETS, VQVAEConfig
from mindhier.tokenizer.io import CHECKPOINT_KIND, load_tokenizer, load_vqvae_state_dict, model_tensors
from mindhier.tokenizer.model import MultiScaleVQVAE, TokenizerInputError

__all__ = [
    "CHECKPOINT_KIND",
    "PRESETS",
    "MultiScaleVQVAE",
    "TokenizerInputError",
    "VQVAEConfig",
    "load_tokenizer",
    "load_vqvae_state_dict",
    "model_tensors",
]
