"""Train the in-project small CLIP on a world's image–caption pairs (the offline stand-in for
CLIP ViT-L/14 whose layers stage 1 aligns to; SPEC §2).

Symmetric InfoNCE over the global batch (features gathered across processes), several caption
paraphrases per image as text augmentation and small random shifts as image augmentation, AdamW
with warmup + cosine, bf16 autocast where the device supports it. The test images (the shared
test set of the fMRI data) are held out; at the end their image→caption and caption→image
top-1 retrieval is written to OUT/eval.json.

Output: OUT/vision.safetensors + OUT/vision.json (load with `mindhier.vision.load_vision(OUT)`;
the checkpoint also holds the optimiser state so --resume continues where a run stopped), every
step's loss, learning rate, gradient norm and logit scale in OUT/log.jsonl, drawn into
OUT/curves.png after every epoch.

Examples:
  mindhier train-vision --data worlds/demo --preset demo --out runs/vision-demo
  torchrun --standalone --nproc_per_node=2 -m mindhier train-vision --data worlds/demo --out runs/v
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mindhier.checkpoint import (load_checkpoint, load_state_strict, optimizer_from_tensors, optimizer_to_tensors,
                                 paths_for)
from mindhier.config import get_preset, to_dict
from mindhier.data import DataError, ImageStore, load_captions
from mindhier.data import layout
from mindhier.data.manifest import data_manifest
from mindhier.errors import MindhierError
from mindhier.train import common
from mindhier.train.distributed import Dist, all_reduce_mean, distributed_session, split_global_batch
from mindhier.world.corpus import held_out_image_indices as test_image_indices
from mindhier.world.images import CATEGORIES
from mindhier.vision.small_clip import (CHECKPOINT_NAME, PRESETS, SmallClip, SmallClipModel, WordTokenizer,
                                        build_vocab, model_tensors, normalise_images, resolve_config,
                                        save_small_clip)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    epochs: int = 6  # demo world: held-out image->caption top-1 0.84 of 300 after 6 (~15 min, 2 CPU cores)
    global_batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1  # CLIP's contrastive pre-training value
    warmup_fraction: float = 0.05
    shift: int = 4  # max random translation in pixels (no flips/colour jitter: captions say left/red)
    hard_negatives: str = "none"  # "shape": NegCLIP-style shape-swapped captions (see HARD_NEGATIVES)
    label_loss: float = 0.0  # weight of the supervised main-object shape loss on the embedding (see LABEL_HEAD)
    seed: int = 0


# NegCLIP (Yuksekgonul et al., "When and why vision-language models behave like bags-of-words",
# ICLR 2023): contrasting each image also with its own caption minimally edited teaches what
# plain batches never ask for. On the corpus, colour and background tell almost every in-batch
# pair apart, so without it the small CLIP's embedding read the main object's shape at chance
# (linear probe 8 % on the demo world's test stimuli, majority guess 11 %). "shape": the first
# shape word of the caption (the main object's: captions name it first) swapped for another.
HARD_NEGATIVES = {"none": (), "shape": CATEGORIES}

# The label loss: a linear head on the unit image embedding predicts the main object's category
# from the corpus's scene labels (corpus/labels.npz), cross-entropy weighted by --label-loss.
# Why: with the contrastive loss alone, shape-swapped negatives included, the embedding read
# the main object's shape at chance (probe 12 %, guess 11 %) after an epoch of the 98 k corpus
# with the hybrid (CNN-trunk) tower as with the patchify ViT, while colour read at 80-88 %: the
# hard negative's loss sat at its shape-blind floor, a symmetric point where neither tower gets
# a gradient toward shape. A supervised head breaks that symmetry, as supervised pretraining
# does for many vision backbones; it is a training-only module (saved as ``train.*``, never
# released). HEAD_SCALE is the fixed logit scale unit embeddings need for a softmax.
LABEL_ATTRIBUTE = "main_category"
HEAD_SCALE = 10.0


class WithShapeHead(torch.nn.Module):
    """The small CLIP plus a training-only linear head reading the main object's shape from
    its unit image embedding; ``forward`` returns the CLIP outputs and the head's logits."""

    def __init__(self, model: SmallClipModel, classes: int):
        super().__init__()
        self.model = model
        self.shape_head = torch.nn.Linear(model.cfg.embed_dim, classes)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        image, text, scale = self.model(pixels, ids)
        return image, text, scale, self.shape_head(image * HEAD_SCALE)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainSettings()
    p.add_argument("--data", required=True, help="data root in MindEye2 layout (e.g. from `mindhier world`)")
    p.add_argument("--out", required=True, help="output folder (checkpoint OUT/vision.*, OUT/eval.json)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="model size (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training images (default: %(default)s)")
    p.add_argument("--global-batch", type=int, default=d.global_batch,
                   help="image-caption pairs per step over all processes, i.e. the negatives each pair is "
                        "contrasted with (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay (default: %(default)s)")
    p.add_argument("--hard-negatives", default=d.hard_negatives, choices=sorted(HARD_NEGATIVES),
                   help="also contrast each image with its caption edited so it is wrong: 'shape' swaps the "
                        "main object's shape word (synthetic-world captions; NegCLIP)")
    p.add_argument("--label-loss", type=float, default=d.label_loss, metavar="WEIGHT",
                   help="also train a linear head on the image embedding to name the main object's shape from "
                        "the corpus's scene labels (corpus/labels.npz), with this weight; 0: off "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed for init, data order, augmentation (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="stop once this many epochs are done (for time-limited jobs); --resume continues")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in OUT")
    p.add_argument("--no-bf16", action="store_true",
                   help="disable bf16 autocast (on by default where the device supports it: CUDA, AVX-512 bf16 CPUs)")


# ---------------------------------------------------------------------------- data
class PairData:
    """Training images (kept in memory as fp16, or uint8 as stored) with all their caption
    paraphrases tokenised."""

    def __init__(self, root: Path, image_size: int, text_len: int, vocab: list[str] | None = None,
                 swap_words: tuple[str, ...] = ()):
        store = ImageStore(root)
        captions = load_captions(root)
        if len(captions) < store.num_images:
            raise DataError(f"{layout.captions_path(root)}: {len(captions)} caption rows for {store.num_images} images")
        self.test = test_image_indices(root)
        self.train = np.setdiff1d(np.arange(store.num_images), self.test)
        if len(self.train) == 0:
            raise DataError(f"{root}: every image is a test image; nothing to train on")
        self.vocab = vocab if vocab is not None else build_vocab(captions[self.train].ravel())
        self.tokenizer = WordTokenizer(self.vocab, text_len)
        self.captions = captions
        # uint8 sources (the pretraining corpus: 100 k images) stay uint8 in memory: 1.2 GB, not 2.4
        self.images = (torch.from_numpy(store.get_uint8(self.train)) if store.kind == "imgbrick"
                       else torch.from_numpy(store.get(self.train)).half())
        store.close()
        self.ids, self.variants = self._tokenise(self.train)
        self.labels: torch.Tensor | None = None
        self.image_size = image_size
        self.swap_words = torch.tensor([self.tokenizer.index[w] for w in swap_words if w in self.tokenizer.index],
                                       dtype=torch.long)
        if swap_words and len(self.swap_words) < 2:
            raise DataError(f"{layout.captions_path(root)}: --hard-negatives needs captions that name at least two "
                            f"of {', '.join(swap_words)}; these name {len(self.swap_words)}")

    def load_shape_labels(self, root: Path) -> None:
        """The training images' main-object categories, for --label-loss."""
        from mindhier.world.corpus import CorpusError, load_labels

        try:
            labels = load_labels(root)[LABEL_ATTRIBUTE]
        except CorpusError as err:
            raise DataError(f"--label-loss needs scene labels: {err}") from err
        if len(labels) < len(self.captions):
            raise DataError(f"{root}: scene labels for {len(labels)} images, captions for {len(self.captions)}")
        self.labels = torch.from_numpy(np.asarray(labels[self.train], dtype=np.int64))

    def _tokenise(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, k, text_len) ids of every non-empty paraphrase (empty ones repeat the first)."""
        k = self.captions.shape[1]
        rows, counts = [], []
        for i in indices:
            options = [c for c in self.captions[i] if str(c).strip()] or [""]
            counts.append(len(options))
            rows += [options[j % len(options)] for j in range(k)]
        ids = self.tokenizer.encode(rows).view(len(indices), k, -1)
        return ids, torch.tensor(counts)

    def batch(self, positions: torch.Tensor, draws: dict, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented images (B,3,H,W) in [0,1] and one paraphrase per image (B, text_len), using
        this rank's slice of random ``draws`` made for the whole global batch (see augment_draws)."""
        images = self.images[positions].float() / (255 if self.images.dtype == torch.uint8 else 1)
        if shift:
            images = random_shift(images, shift, draws["dy"], draws["dx"])
        pick = (draws["u"] * self.variants[positions]).long()
        return images, self.ids[positions, pick]


def augment_draws(n: int, shift: int, gen: torch.Generator, hard_negatives: bool = False) -> dict:
    """Random numbers for a global batch of ``n``, drawn identically on every rank so that a run
    does not depend on how many processes share it."""
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=gen)
    draws = {"dy": dy, "dx": dx, "u": torch.rand(n, generator=gen)}
    if hard_negatives:  # drawn only then, so runs without them keep their random stream
        draws["swap"] = torch.rand(n, generator=gen)
    return draws


def swap_first_word(ids: torch.Tensor, words: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(edited ids, which rows were edited): in each row the first token that is one of
    ``words`` becomes another of them (the ``u``-th of the others, u in [0, 1)). Rows without
    such a token are returned unchanged and marked False (they have no hard negative)."""
    is_word = torch.isin(ids, words)
    has = is_word.any(dim=1)
    first = is_word.int().argmax(dim=1)
    rows = torch.arange(len(ids))
    current = ids[rows, first]
    others = (u * (len(words) - 1)).long()                       # index among the other words
    position = (words.view(1, -1) == current.view(-1, 1)).int().argmax(dim=1)
    replacement = words[others + (others >= position).long()]   # skip the current word
    edited = ids.clone()
    edited[rows[has], first[has]] = replacement[has]
    return edited, has


def random_shift(images: torch.Tensor, shift: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Translate image i by (dy[i] - shift, dx[i] - shift) pixels (edge padding)."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(len(images))])


# ---------------------------------------------------------------------------- loss
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns to each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = len(x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on my rows
        return grad[dist.get_rank() * ctx.rows: (dist.get_rank() + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Features of the whole global batch; gradients flow back to the rank that made them."""
    return _GatherWithGrad.apply(x) if d.enabled else x


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, d: Dist,
                     negatives: torch.Tensor | None = None, has_negative: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's pairs against every pair of the global batch (CLIP).
    ``negatives`` (one edited caption per image, NegCLIP): extra wrong captions every image is
    also contrasted with; those of rows ``has_negative`` False are left out."""
    all_image, all_text = gather_with_grad(image, d), gather_with_grad(text, d)
    labels = torch.arange(len(image), device=image.device) + d.rank * len(image)
    logits_image = scale * image @ all_text.T
    if negatives is not None:
        all_neg = gather_with_grad(negatives, d)
        keep = gather_with_grad(has_negative.float(), d) > 0.5
        extra = (scale * image @ all_neg.T).masked_fill(~keep.view(1, -1), float("-inf"))
        logits_image = torch.cat([logits_image, extra], dim=1)
    logits_text = scale * text @ all_image.T
    return 0.5 * (F.cross_entropy(logits_image.float(), labels) + F.cross_entropy(logits_text.float(), labels))


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def retrieval(clip: SmallClip, store: ImageStore, captions: np.ndarray, indices: np.ndarray,
              batch: int = 128) -> dict:
    """Top-1 image→caption and caption→image retrieval among ``indices`` (caption i % 3 of
    image i, as the stage-1 targets use). ``*_same_text`` also counts a hit when the retrieved
    caption reads exactly like the true one (synthetic captions can repeat)."""
    from mindhier.vision.targets import caption_policy

    texts = [str(captions[i][caption_policy(int(i))]) for i in indices]
    image_emb, text_emb = [], []
    for s in range(0, len(indices), batch):
        image_emb.append(clip.image_embedding(torch.from_numpy(store.get(indices[s: s + batch]))))
        text_emb.append(clip.text_embedding(texts[s: s + batch]))
    sim = F.normalize(torch.cat(image_emb), dim=-1) @ F.normalize(torch.cat(text_emb), dim=-1).T
    truth = torch.arange(len(indices))
    i2t, t2i = sim.argmax(1), sim.argmax(0)
    same = np.array(texts)
    return {
        "n": len(indices), "chance": 1.0 / len(indices),
        "image_to_caption_top1": float((i2t == truth).float().mean()),
        "caption_to_image_top1": float((t2i == truth).float().mean()),
        "image_to_caption_top1_same_text": float(np.mean(same[i2t.numpy()] == same)),
    }


# ---------------------------------------------------------------------------- training
def run(args) -> int:
    with distributed_session(args.device) as d:
        return train(args, d)


def prepare_out(out: Path, resume: bool, force: bool) -> Path | None:
    """The checkpoint to resume from, None for a fresh run; refuses to clobber a finished run."""
    ckpt = out / CHECKPOINT_NAME
    exists = paths_for(ckpt)[1].exists()
    if resume:
        if not exists:
            raise MindhierError(f"--resume: no checkpoint {paths_for(ckpt)[1]} to resume from")
        return ckpt
    if exists and not force:
        raise MindhierError(f"{out} already holds a vision checkpoint; pass --resume to continue it "
                            "or --force to start over")
    return None


def train(args, d: Dist) -> int:
    settings = TrainSettings(epochs=args.epochs, global_batch=args.global_batch, lr=args.lr,
                             weight_decay=args.weight_decay, seed=args.seed, hard_negatives=args.hard_negatives,
                             label_loss=getattr(args, "label_loss", 0.0))
    out, root = Path(args.out), Path(args.data)
    resume_from = prepare_out(out, args.resume, args.force)
    preset = get_preset(PRESETS, args.preset, "vision")
    meta, tensors = None, None
    if resume_from is not None:
        tensors, meta = load_checkpoint(resume_from, kind="vision")
    data = PairData(root, preset.image_size, preset.text_len, vocab=meta["vocab"] if meta else None,
                    swap_words=HARD_NEGATIVES[settings.hard_negatives])
    cfg = resolve_config(preset, data.vocab)
    if meta is not None:
        load_checkpoint(resume_from, kind="vision", config=cfg)  # names differing fields
        for flag, default in (("hard_negatives", "none"), ("label_loss", 0.0)):
            before = meta.get("train", {}).get(flag, default)
            if before != getattr(settings, flag):
                raise MindhierError(f"--resume: {resume_from} was trained with --{flag.replace('_', '-')} {before}, "
                                    f"not {getattr(settings, flag)}; resume with the same flag or start over with "
                                    "--force")
    if settings.label_loss:
        data.load_shape_labels(root)
    common.seed_everything(settings.seed)
    model = SmallClipModel(cfg).to(d.device)
    trainable = WithShapeHead(model, len(CATEGORIES)).to(d.device) if settings.label_loss else model
    opt = common.adamw(trainable, settings.lr, settings.weight_decay, betas=(0.9, 0.98))
    start_epoch, trained_seconds = 0, 0.0
    if meta is not None:
        load_state_strict(model, model_tensors(tensors), where=resume_from)
        if settings.label_loss:
            trainable.shape_head.load_state_dict({k[len("train.shape_head."):]: v for k, v in tensors.items()
                                                  if k.startswith("train.shape_head.")})
        optimizer_from_tensors(opt, {k: v.to(d.device) for k, v in tensors.items()}, meta["optimizer"])
        start_epoch = int(meta["epoch"])
        trained_seconds = float(meta.get("train_seconds") or 0.0)  # absent in checkpoints before it was recorded
    per_rank, _ = split_global_batch(settings.global_batch, d.world_size)
    steps_per_epoch = len(data.train) // settings.global_batch
    if steps_per_epoch == 0:
        raise MindhierError(f"--global-batch {settings.global_batch} exceeds the {len(data.train)} training images")
    total = steps_per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup_fraction * total))
    net = torch.nn.parallel.DistributedDataParallel(trainable) if d.enabled else trainable
    manifest = data_manifest(root, subjects=[]) if d.is_main else None
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        common.trim_log(out / "log.jsonl", start_epoch * steps_per_epoch)  # a fresh run starts it anew
        print(f"train-vision: {len(data.train)} training / {len(data.test)} held-out images, vocab "
              f"{len(data.vocab)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
              f"{d.world_size} process(es), batch {per_rank}/rank, {steps_per_epoch} steps/epoch", flush=True)
    guard: dict = {}
    stop = settings.epochs if args.stop_after is None else min(settings.epochs, args.stop_after)
    for epoch in range(start_epoch, stop):
        t0 = time.time()
        loss_sum = run_epoch(net, model, opt, data, settings, d, epoch, steps_per_epoch, total, warmup, guard,
                             use_bf16=not args.no_bf16, log=out if d.is_main else None)
        if d.is_main:
            seconds = time.time() - t0
            trained_seconds += seconds
            print(f"epoch {epoch + 1}/{settings.epochs}: loss {loss_sum / steps_per_epoch:.4f} "
                  f"({seconds:.1f} s)", flush=True)
            save(out, trainable, opt, data, settings, epoch + 1, manifest, trained_seconds)
            common.plot_curves(out)
    if d.is_main and stop == settings.epochs:
        evaluate(out, model, data, root)
    return 0


def run_epoch(net, model, opt, data: PairData, s: TrainSettings, d: Dist, epoch: int, steps: int,
              total: int, warmup: int, guard: dict, use_bf16: bool, log: Path | None = None) -> float:
    """One pass in a data order fixed by (seed, epoch) so that resumed runs see the same batches;
    each step a line of ``log``/log.jsonl when ``log`` is given."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
    gen = torch.Generator().manual_seed(s.seed * 1000 + epoch + 1)
    per_rank = s.global_batch // d.world_size
    net.train()
    loss_sum = 0.0
    bar = common.progress(range(steps), desc=f"vision epoch {epoch + 1}", enabled=d.is_main, leave=False)
    for step in bar:
        global_step = epoch * steps + step
        lr = common.warmup_cosine(global_step, total, warmup, s.lr)
        common.set_lr(opt, lr)
        chunk = order[step * s.global_batch: (step + 1) * s.global_batch]
        mine = slice(d.rank * per_rank, (d.rank + 1) * per_rank)
        draws = {k: v[mine] for k, v in augment_draws(s.global_batch, s.shift, gen, bool(data.swap_words.numel())).items()}
        images, ids = data.batch(chunk[mine], draws, s.shift)
        pixels = normalise_images(images.to(d.device), data.image_size)
        negatives = has = None
        with common.autocast(d.device, enabled=use_bf16):
            image, text, scale, *head = net(pixels, ids.to(d.device))
            if data.swap_words.numel():
                edited, has = swap_first_word(ids, data.swap_words, draws["swap"])
                negatives = F.normalize(model.text(edited.to(d.device))[1], dim=-1).float()
        loss = contrastive_loss(image.float(), text.float(), scale.float(), d, negatives, has)
        if head:  # --label-loss: the main object's category from the image embedding
            shape_loss = F.cross_entropy(head[0].float(), data.labels[chunk[mine]].to(d.device))
            loss = loss + s.label_loss * shape_loss
        if not common.check_finite(loss, global_step, max_bad=5, state=guard):
            opt.zero_grad(set_to_none=True)
            if log is not None:
                common.append_log(log, {"step": global_step + 1, "epoch": epoch + 1, "lr": lr, "skipped": True})
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        value = float(all_reduce_mean(loss.detach(), d))
        loss_sum += value
        shown = {"shape_loss": f"{float(shape_loss.detach()):.3f}"} if head else {}
        if log is not None:
            common.append_log(log, {"step": global_step + 1, "epoch": epoch + 1, "loss": value, "lr": lr,
                                    "grad_norm": float(norm), "scale": float(scale.detach()),
                                    **({"shape_loss": float(shape_loss.detach())} if head else {})})
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", gnorm=f"{float(norm):.2f}",
                        scale=f"{float(scale.detach()):.1f}", **shown)
    return loss_sum


def save(out: Path, trainable, opt, data: PairData, s: TrainSettings, epoch: int, manifest,
         train_seconds: float) -> None:
    """The model, its optimiser state, (with --label-loss) the training-only shape head, and the
    training time over all invocations so far (what `mindhier pretrain --release` puts in the card)."""
    optim_tensors, optim_info = optimizer_to_tensors(opt)
    model = trainable
    if isinstance(trainable, WithShapeHead):
        model = trainable.model
        optim_tensors.update({f"train.shape_head.{k}": v for k, v in trainable.shape_head.state_dict().items()})
    save_small_clip(out / CHECKPOINT_NAME, model, data.vocab, tensors=optim_tensors, extra={
        "epoch": epoch, "train": to_dict(s), "optimizer": optim_info, "data_manifest": manifest,
        "train_seconds": round(train_seconds, 1),
        "test_images": {"count": int(len(data.test)),
                        "sha256": hashlib.sha256(data.test.astype(np.int64).tobytes()).hexdigest()[:16]},
    })


def evaluate(out: Path, model: SmallClipModel, data: PairData, root: Path) -> dict:
    """Held-out retrieval (and the same on as many training images, to show the gap)."""
    clip = SmallClip(model.eval(), data.vocab)
    store = ImageStore(root)
    n = len(data.test)
    rng = np.random.default_rng(0)
    train_subset = np.sort(rng.choice(data.train, size=min(n, len(data.train)), replace=False))
    report = {"test": retrieval(clip, store, data.captions, data.test),
              "train_subset": retrieval(clip, store, data.captions, train_subset)}
    store.close()
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    t = report["test"]
    print(f"held-out retrieval over {t['n']} test images (chance {t['chance']:.4f}): image→caption top-1 "
          f"{t['image_to_caption_top1']:.3f} (same text {t['image_to_caption_top1_same_text']:.3f}), "
          f"caption→image top-1 {t['caption_to_image_top1']:.3f}; train subset image→caption "
          f"{report['train_subset']['image_to_caption_top1']:.3f}", flush=True)
    return report
