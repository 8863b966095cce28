"""Vision hierarchy: HF CLIP folder loading, small CLIP layer indexing, checkpoints, target cache.

Every feature is compared with an independent computation (the HF model's own forward with
output_hidden_states, or the small CLIP's blocks run by hand), so a wrong layer index, a
missing post-LN or a projection applied to the CLS token only would fail here."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

from mindhier.config import ConfigError
from mindhier.vision import VisionError, load_vision, scaled_layer_map
from mindhier.vision.small_clip import (PRESETS, SmallClip, SmallClipModel, WordTokenizer, build_vocab,
                                        load_small_clip, resolve_config, save_small_clip)
from mindhier.vision.targets import TargetCache, TargetCacheError, cache_key, cached_targets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CAPTIONS = ["a large red star above a small blue ring", "a green disc on yellow stripes",
            "a tree left of a house", "two crosses on a checker background"]


# ---------------------------------------------------------------------------- HF CLIP folder
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random CLIP saved exactly as a real one is laid out (config, safetensors, tokenizer)."""
    from mindhier.vision.hf_clip import _make_transformers_importable

    _make_transformers_importable()
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
                           image_size=28, patch_size=7),
        projection_dim=24)
    model = CLIPModel(cfg).eval()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":  # a character-level BPE vocabulary: no merges needed
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    root = tmp_path_factory.mktemp("clip-tiny")
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def test_hf_clip_attributes_and_shapes(hf_dir):
    clip = load_vision(hf_dir)
    assert (clip.num_layers, clip.num_tokens, clip.feature_dim) == (4, 17, 24)
    assert (clip.text_tokens, clip.text_dim, clip.image_size) == (16, 32, 28)
    assert clip.default_layers == scaled_layer_map("balanced", 4)
    images = torch.rand(3, 3, 28, 28)
    feats = clip.image_layer_features(images, [0, 2, 4])
    assert [tuple(f.shape) for f in feats] == [(3, 17, 24)] * 3
    assert tuple(clip.text_features(CAPTIONS[:2]).shape) == (2, 16, 32)
    assert tuple(clip.text_embedding(CAPTIONS[:2]).shape) == (2, 24)
    assert not any(p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.model.training


def test_hf_clip_features_match_independent_computation(hf_dir):
    from transformers import CLIPModel, CLIPTokenizer

    clip = load_vision(hf_dir)
    ref = CLIPModel.from_pretrained(hf_dir, local_files_only=True).eval()
    images = torch.rand(2, 3, 28, 28)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels = (images - mean) / std
    with torch.no_grad():
        out = ref.vision_model(pixel_values=pixels, output_hidden_states=True)
        hidden = out.hidden_states
        # hidden_states[0] is the embedding output (after CLIP's pre-LayerNorm), not layer 1.
        emb = ref.vision_model.pre_layrnorm(ref.vision_model.embeddings(pixels))
        assert torch.allclose(hidden[0], emb, atol=1e-6)
        expected = {g: ref.visual_projection(ref.vision_model.post_layernorm(hidden[g])) for g in range(5)}
        image_embeds = ref.visual_projection(out.pooler_output)
        ids = CLIPTokenizer.from_pretrained(hf_dir)(CAPTIONS[:3], padding="max_length", max_length=16,
                                                    truncation=True, return_tensors="pt").input_ids
        text = ref.text_model(input_ids=ids)
        text_embeds = ref.text_projection(text.pooler_output)
    feats = clip.image_layer_features(images, range(5))
    for g in range(5):  # every token, every layer: post-LN then projection
        assert torch.allclose(feats[g], expected[g], atol=1e-5), f"layer {g}"
    assert not torch.allclose(feats[1], feats[2])  # layers really differ
    assert torch.allclose(clip.image_embedding(images), image_embeds, atol=1e-5)
    assert torch.allclose(feats[4][:, 0], image_embeds, atol=1e-5)
    assert torch.allclose(clip.text_features(CAPTIONS[:3]), text.last_hidden_state, atol=1e-5)
    assert torch.allclose(clip.text_embedding(CAPTIONS[:3]), text_embeds, atol=1e-5)


def test_hf_clip_preprocess_resizes_shortest_side_and_centre_crops(hf_dir):
    clip = load_vision(hf_dir)
    images = torch.zeros(1, 3, 28, 42)
    images[..., 7:35] = 1.0  # the centre 28 columns are white
    x = clip.preprocess(images)
    assert tuple(x.shape) == (1, 3, 28, 28)
    white = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x[0, :, 14, 14], white, atol=1e-4)
    small = clip.preprocess(torch.rand(1, 3, 14, 20))
    assert tuple(small.shape) == (1, 3, 28, 28)


def test_missing_or_incomplete_clip_folder_says_what_to_put_where(tmp_path):
    with pytest.raises(VisionError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        load_vision(tmp_path / "nowhere")
    partial = tmp_path / "clip"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(VisionError, match=r"missing model\.safetensors.*tokenizer"):
        load_vision(partial)
    (partial / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (partial / "model.safetensors").write_bytes(b"")
    (partial / "tokenizer.json").write_text("{}")
    with pytest.raises(VisionError, match="full CLIP"):
        load_vision(partial)


# ---------------------------------------------------------------------------- small CLIP
def small_clip(seed: int = 0, preset: str = "tiny") -> SmallClip:
    torch.manual_seed(seed)
    vocab = build_vocab(CAPTIONS)
    return SmallClip(SmallClipModel(resolve_config(PRESETS[preset], vocab)), vocab)


def test_layer_maps_scale_with_depth():
    assert scaled_layer_map("balanced", 24) == (12, 16, 20, 24)
    assert scaled_layer_map("balanced", 12) == (6, 8, 10, 12)
    assert scaled_layer_map("early", 12) == (3, 6, 9, 12)
    assert scaled_layer_map("late", 12) == (9, 10, 11, 12)
    assert scaled_layer_map("late", 8) == (5, 6, 7, 8)  # rounding collisions step down
    assert len({scaled_layer_map(n, 8) for n in ("balanced", "early", "late")}) == 3
    with pytest.raises(VisionError, match="choose one of"):
        scaled_layer_map("middle", 12)


def test_small_clip_shapes_and_layer_indexing():
    clip = small_clip()
    cfg = clip.cfg
    assert clip.num_tokens == (32 // 8) ** 2 + 1 and clip.num_layers == cfg.layers
    assert clip.default_layers == scaled_layer_map("balanced", cfg.layers)
    images = torch.rand(2, 3, 32, 32)
    feats, final = clip.image_targets(images, range(cfg.layers + 1))
    assert all(tuple(f.shape) == (2, clip.num_tokens, cfg.embed_dim) for f in feats)
    # Independent forward: embeddings + ln_pre = state 0, then one block per layer.
    visual = clip.model.visual
    with torch.no_grad():
        x = visual.patch(clip.preprocess(images)).flatten(2).transpose(1, 2)
        x = torch.cat([visual.cls.expand(2, 1, -1), x], 1) + visual.pos
        states = [visual.ln_pre(x)]
        for block in visual.blocks:
            states.append(block(states[-1]))
    for g, f in enumerate(feats):
        assert torch.allclose(f, visual.proj(visual.ln_post(states[g])), atol=1e-5), f"layer {g}"
    assert torch.allclose(final, feats[-1][:, 0], atol=1e-6)
    assert torch.allclose(clip.image_embedding(images), final, atol=1e-6)
    assert torch.allclose(clip.image_layer_features(images, [3])[0], feats[3], atol=1e-6)
    with pytest.raises(VisionError, match="hidden states 0..8"):
        clip.image_layer_features(images, [9])
    text = clip.text_features(CAPTIONS)
    assert tuple(text.shape) == (4, cfg.text_len, cfg.text_width)
    assert tuple(clip.text_embedding(CAPTIONS).shape) == (4, cfg.embed_dim)


def test_word_tokenizer_is_fixed_length_with_unknown_words():
    vocab = build_vocab(CAPTIONS)
    assert vocab == build_vocab(list(reversed(CAPTIONS)))  # deterministic
    ids = WordTokenizer(vocab, 8).encode(["a red zebra", "a " * 20])
    assert ids.shape == (2, 8)
    assert ids[0, :5].tolist() == [2, vocab.index("a"), vocab.index("red"), 1, 3]  # sot a red <unk> eot
    assert ids[1, -1].item() == 3  # truncated captions still end with <eot>


def test_text_features_ignore_padding_after_end_of_text():
    clip = small_clip()
    short = clip.text_features(["a red star"])
    # Causal attention: the tokens up to <eot> must not depend on what follows them.
    ids = clip.tokenizer.encode(["a red star"])
    ids[0, 6:] = 7
    with torch.no_grad():
        tokens, _ = clip.model.text(ids)
    assert torch.allclose(short[0, :5], tokens[0, :5], atol=1e-6)


def test_small_clip_checkpoint_round_trip_and_config_mismatch(tmp_path):
    clip = small_clip(seed=3)
    save_small_clip(tmp_path / "run" / "vision", clip.model, clip.tokenizer.vocab,
                    tensors={"optim.0.exp_avg": torch.zeros(2)}, extra={"epoch": 1})
    images = torch.rand(2, 3, 32, 32)
    for path in (tmp_path / "run" / "vision", tmp_path / "run" / "vision.safetensors", tmp_path / "run"):
        loaded = load_vision(path)
        assert isinstance(loaded, SmallClip)
        assert torch.allclose(loaded.image_embedding(images), clip.image_embedding(images), atol=1e-6)
        assert loaded.identity() == clip.identity()
    other = resolve_config(PRESETS["tiny"], clip.tokenizer.vocab).__class__(
        **{**vars(clip.cfg), "width": 64})
    with pytest.raises(ConfigError, match="width: expected 64, checkpoint has 32"):
        load_small_clip(tmp_path / "run" / "vision", config=other)
    with pytest.raises(VisionError, match="neither a small-CLIP checkpoint"):
        load_vision(tmp_path / "run" / "nothing.safetensors")


# ---------------------------------------------------------------------------- target cache
@pytest.fixture()
def data_root(tmp_path):
    """A minimal MindEye2-layout image file + captions (what ImageStore/load_captions read)."""
    rng = np.random.default_rng(0)
    n = 10
    with h5py.File(tmp_path / "coco_images_224_float16.hdf5", "w") as f:
        f.create_dataset("images", data=rng.random((n, 3, 32, 32)).astype(np.float16))
    caps = np.array([[f"{CAPTIONS[i % 4]} {j}" for j in range(5)] for i in range(n)])
    np.save(tmp_path / "COCO_73k_annots_curated.npy", caps)
    return tmp_path


def test_target_cache_round_trip_equals_direct_computation(data_root, tmp_path):
    from mindhier.data import ImageStore, load_captions

    clip = small_clip()
    layers = clip.default_layers
    cache = cached_targets(clip, data_root, layers, tmp_path / "cache", show_progress=False)
    assert cache.layers == layers and cache.identity == clip.identity() and len(cache) == 10
    wanted = [7, 2, 7, 0]
    rows = cache.rows_for(wanted)
    images = torch.from_numpy(ImageStore(data_root).get(wanted))
    feats, final = clip.image_targets(images, layers)
    for g, f in zip(layers, feats):
        assert rows[f"layer_{g}"].dtype == torch.float32
        assert torch.allclose(rows[f"layer_{g}"], f, atol=2e-3, rtol=2e-3)
    assert torch.allclose(rows["final_embedding"], final, atol=2e-3, rtol=2e-3)
    captions = load_captions(data_root)
    texts = [captions[i][i % 3] for i in wanted]  # caption i % 3, as the official code
    tokens, emb = clip.text_targets(texts)
    assert torch.allclose(rows["text"], tokens, atol=2e-3, rtol=2e-3)
    assert torch.allclose(rows["text_embedding"], emb, atol=2e-3, rtol=2e-3)
    in_memory = TargetCache(cache.path, in_memory=True).rows_for(wanted)
    assert all(torch.equal(in_memory[k], rows[k]) for k in rows)
    with pytest.raises(TargetCacheError, match=r"no targets for images \[10\]"):
        cache.rows_for([10])


def test_target_cache_is_reused_and_stale_caches_are_detected(data_root, tmp_path):
    clip = small_clip()
    first = cached_targets(clip, data_root, (2, 4), tmp_path / "c", show_progress=False)
    stamp = first.path.stat().st_mtime_ns
    again = cached_targets(clip, data_root, (2, 4), tmp_path / "c", show_progress=False)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    other_layers = cached_targets(clip, data_root, (3, 4), tmp_path / "c", show_progress=False)
    assert other_layers.path != first.path and other_layers.layers == (3, 4)
    retrained = small_clip(seed=1)  # same shape, other weights -> other identity
    assert retrained.identity() != clip.identity()
    with pytest.raises(TargetCacheError, match="stale target cache"):
        TargetCache(first.path, expect_key=cache_key(retrained, (2, 4), True))
    with pytest.raises(TargetCacheError, match="stale target cache"):
        TargetCache(first.path, expect_key=cache_key(clip, (3, 4), True))
    rebuilt = cached_targets(retrained, data_root, (2, 4), tmp_path / "c", show_progress=False)
    assert rebuilt.path != first.path and rebuilt.identity == retrained.identity()


def test_conv_stem_keeps_the_token_grid_and_sees_within_a_patch():
    from dataclasses import replace

    from mindhier.vision.small_clip import conv_stem

    cfg = replace(PRESETS["foundation"], vocab_size=10)
    model = SmallClipModel(cfg).eval()
    assert cfg.stem == "conv" and cfg.num_tokens == PRESETS["demo"].num_tokens
    states = model.visual.hidden_states(torch.rand(2, 3, 64, 64))
    assert all(tuple(h.shape) == (2, cfg.num_tokens, cfg.width) for h in states)
    stem = conv_stem(128, 8)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in stem) == 3
    # two images that differ only inside one 8x8 patch differ in that patch's token, and (the
    # stem's receptive field being 15 px) in none two or more patches away
    a = torch.rand(1, 3, 64, 64)
    b = a.clone()
    b[..., 8:16, 8:16] = b[..., 8:16, 8:16].flip(-1)
    with torch.no_grad():
        diff = (stem(a) - stem(b)).abs().sum(1)[0]
    assert diff[1, 1] > 0
    assert diff[3:].max() == 0 and diff[:, 3:].max() == 0
    with pytest.raises(VisionError, match="power-of-two"):
        conv_stem(128, 6)
    with pytest.raises(VisionError, match="unknown stem"):
        SmallClipModel(replace(cfg, stem="pyramid"))


def test_convnet_stem_is_a_local_residual_cnn_under_the_same_token_grid():
    from dataclasses import replace

    from mindhier.vision.small_clip import ResidualConv, convnet_stem

    cfg = replace(PRESETS["hybrid"], vocab_size=10)
    model = SmallClipModel(cfg).eval()
    assert cfg.stem == "convnet" and cfg.num_tokens == PRESETS["demo"].num_tokens
    states = model.visual.hidden_states(torch.rand(2, 3, 64, 64))
    assert len(states) == cfg.layers + 1
    assert all(tuple(h.shape) == (2, cfg.num_tokens, cfg.width) for h in states)
    stem = convnet_stem(128, 8)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in stem) == 3
    assert sum(isinstance(m, ResidualConv) for m in stem) == 3
    # receptive field: 3 stride-2 and 3 stride-1 3x3 convs cover 43 px, so a change inside the
    # 8x8 patch (1, 1) (pixels 8-15) reaches tokens 0-4 of each axis and none from 5 on
    a = torch.rand(1, 3, 64, 64)
    b = a.clone()
    b[..., 8:16, 8:16] = b[..., 8:16, 8:16].flip(-1)
    with torch.no_grad():
        diff = (stem(a) - stem(b)).abs().sum(1)[0]
    assert diff[1, 1] > 0 and diff[4, 4] > 0
    assert diff[5:].max() == 0 and diff[:, 5:].max() == 0
    with pytest.raises(VisionError, match="power-of-two"):
        convnet_stem(128, 6)
