"""What bench/device_check.py runs on: sizes per preset, the inputs it writes to a temporary
folder — a random CLIP in the Hugging Face layout, a synthetic data folder in the MindEye2
layout, random tokenizer and encoder checkpoints — and its clock and memory gauge. Nothing is
downloaded (issue 14).

The ``paper`` sizes are the paper's (SPEC §2–§5): CLIP ViT-L/14, subject 1's 15,724 nsdgeneral
voxels, the paper HFE, VQVAE-Switti and Switti-d30 at 512 px. The per-GPU batches follow the
paper's global batches (stage 1: 512, stage 2: 80) split over the 8 GPUs of README's torchrun
commands — the paper does not say how many GPUs it used. ``tiny`` is for the CPU test.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import torch

# CLIP ViT-L/14's shapes (openai/clip-vit-large-patch14's config.json), random weights. The
# tokenizer written beside it is character-level with <|startoftext|> = 0, <|endoftext|> = 1,
# so the text config names those ids (the real model's are 49406 / 49407; the shapes are equal).
CLIP_L14 = {
    "text_config": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=1, pad_token_id=1),
    "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
    "projection_dim": 768,
}
# tests/test_vision.py's tiny CLIP: 4 layers, 17 image tokens of width 24, 16 text tokens.
CLIP_TINY = {
    "text_config": dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                        pad_token_id=1),
    "vision_config": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                          image_size=28, patch_size=7),
    "projection_dim": 24,
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    clip: dict
    voxels: int                  # nsdgeneral voxels of the subject
    encoder: str                 # encoder / tokenizer / generator preset names
    tokenizer: str
    generator: str
    stage1_batch: int            # per-GPU batch of stage 1
    stage2_batch: int            # per-GPU batch of stage 2
    recon_batches: tuple         # batched reconstruction throughput at these batch sizes
    image_size: int              # stimuli in the synthetic data folder (NSD's MindEye2 file: 224)
    train_trials: int
    test_images: int
    matmul_n: int                # the peak-measuring matmul
    warmup_steps: int
    timed_steps: int
    repeats: int                 # timed reconstruction passes per setting (median)


SIZES = {
    "paper": Sizes(clip=CLIP_L14, voxels=15724, encoder="paper", tokenizer="paper", generator="paper",
                   stage1_batch=512 // 8, stage2_batch=80 // 8, recon_batches=(8, 32), image_size=224,
                   train_trials=128, test_images=8, matmul_n=8192, warmup_steps=2, timed_steps=5, repeats=1),
    "tiny": Sizes(clip=CLIP_TINY, voxels=64, encoder="tiny", tokenizer="tiny", generator="tiny",
                  stage1_batch=8, stage2_batch=4, recon_batches=(2, 4), image_size=32,
                  train_trials=16, test_images=4, matmul_n=128, warmup_steps=1, timed_steps=2, repeats=1),
}

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("red", "green", "blue", "disc", "square", "star", "above", "below", "small", "large")


def ensure_tqdm() -> None:
    """The training loops import tqdm; where it is missing, a silent stand-in (no bars)."""
    try:
        import tqdm.auto  # noqa: F401
        return
    except ImportError:
        pass

    class SilentBar:
        def __init__(self, iterable=None, *args, **kw):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable or ())

        def update(self, *args, **kw):
            pass

        set_postfix = set_description = close = update

    module = types.ModuleType("tqdm")
    module.tqdm = SilentBar
    module.auto = module
    sys.modules["tqdm"] = sys.modules["tqdm.auto"] = module


# ---------------------------------------------------------------------------------------------
# The clock and the memory gauge
# ---------------------------------------------------------------------------------------------

def now(device: torch.device) -> float:
    """Wall-clock seconds after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated on the GPU since the last reset (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bf16_is_fast(device: torch.device) -> bool:
    """Where the loops autocast and the pipeline casts the generator to bf16 (mindhier.runtime)."""
    from mindhier.runtime import bf16_is_fast as fast

    return fast(device)


# ---------------------------------------------------------------------------------------------
# A random CLIP folder, read back through the real --vision path (mindhier.vision.hf_clip)
# ---------------------------------------------------------------------------------------------

def write_clip_folder(root: Path, clip: dict, seed: int = 0) -> Path:
    """config.json + model.safetensors (fp16) + vocab.json/merges.txt, as a real folder holds."""
    from mindhier.vision.hf_clip import _make_transformers_importable

    _make_transformers_importable()
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**clip)).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(root)    # half the bytes to write; loaded as float32
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:  # character-level BPE: every word splits into letters, no merges needed
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return root


def clip_shape(clip: dict):
    """The encoder's VisionShape of a CLIP config (what the folder's model will report)."""
    from mindhier.encoder import VisionShape

    v, t = clip["vision_config"], clip["text_config"]
    return VisionShape(num_tokens=(v["image_size"] // v["patch_size"]) ** 2 + 1, feature_dim=clip["projection_dim"],
                       text_tokens=t["max_position_embeddings"], text_dim=t["hidden_size"])


# ---------------------------------------------------------------------------------------------
# A synthetic data folder in the MindEye2 layout (random betas: only speed is measured on it)
# ---------------------------------------------------------------------------------------------

def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _write_tar(path: Path, rows: list[tuple[int, int, int]]) -> None:
    from mindhier.data import layout

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for image, trial, shared in rows:
            behav = -np.ones((1, layout.BEHAV_COLUMNS))
            behav[0, layout.COL_IMAGE], behav[0, layout.COL_TRIAL], behav[0, layout.COL_SHARED] = image, trial, shared
            data = _npy(behav)
            info = tarfile.TarInfo(f"sample{trial:09d}.behav.npy")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_dataset(root: Path, sizes: Sizes, subject: int = 1, seed: int = 0) -> Path:
    """Images, captions, betas (trials × voxels) and the webdataset tars of one subject: two
    training sessions of ``train_trials`` single showings, and ``test_images`` shown 3 times."""
    import h5py

    from mindhier.data import layout

    rng = np.random.default_rng(seed)
    n_train, n_test = sizes.train_trials, sizes.test_images
    n_images = n_train + n_test
    root.mkdir(parents=True, exist_ok=True)
    images = rng.random((n_images, 3, sizes.image_size, sizes.image_size), dtype=np.float32)
    with h5py.File(layout.images_hdf5_path(root), "w") as f:
        f.create_dataset("images", data=images.astype(np.float16))
    captions = np.array([[" ".join(rng.choice(WORDS, 4)) for _ in range(5)] for _ in range(n_images)])
    np.save(layout.captions_path(root), captions)
    test = np.arange(n_train, n_images)
    trial_images = np.concatenate([np.arange(n_train), np.repeat(test, 3)])
    betas = rng.standard_normal((len(trial_images), sizes.voxels), dtype=np.float32)
    with h5py.File(layout.betas_path(root, subject), "w") as f:
        f.create_dataset("betas", data=betas)
    half = n_train // 2
    for session, trials in enumerate((range(0, half), range(half, n_train))):
        _write_tar(layout.train_tar_path(root, subject, session), [(t, t, 0) for t in trials])
    _write_tar(layout.test_tar_path(root, subject),
               [(int(trial_images[t]), t, 1) for t in range(n_train, len(trial_images))])
    return root


# ---------------------------------------------------------------------------------------------
# Checkpoints the stage-2 loop and the sampler load
# ---------------------------------------------------------------------------------------------

def write_tokenizer(path: Path, preset: str, seed: int = 0) -> Path:
    from mindhier.checkpoint import save_checkpoint
    from mindhier.tokenizer import PRESETS, MultiScaleVQVAE

    torch.manual_seed(seed)
    return save_checkpoint(path, MultiScaleVQVAE(PRESETS[preset]).state_dict(), kind="tokenizer",
                           config=PRESETS[preset])


def write_encoder(path: Path, sizes: Sizes, clip_dir: Path, model=None, layers=None, seed: int = 0) -> Path:
    """``model`` (the stage-1 encoder) or a random one of the preset, as train-encoder records it
    for the loaders: config, voxel count, subject and the vision model's shape and folder."""
    from mindhier.checkpoint import save_checkpoint
    from mindhier.encoder import PRESETS, HierarchicalFMRIEncoder

    shape = clip_shape(sizes.clip)
    if model is None:
        torch.manual_seed(seed)
        model = HierarchicalFMRIEncoder(PRESETS[sizes.encoder], sizes.voxels, shape)
    vision = {"shape": dataclasses.asdict(shape), "path": str(clip_dir)}
    if layers is not None:
        vision["layers"] = [int(g) for g in layers]
    return save_checkpoint(path, model.state_dict(), kind="encoder", config=model.cfg,
                           extra={"num_voxels": sizes.voxels, "subject": 1, "vision": vision})
