"""The built-in pretrained dual encoder: ``rsnc-bench pretrain`` and the ``tiny-clip`` preset.

Every method in the benchmark was built to fine-tune a *pretrained* CLIP. On a CPU the preset
stands in for it: the ``tiny-b32`` architecture (ViT-B/32's geometry: 49 patches, 77 text
positions) trained with CLIP's contrastive loss on a large, clean **source** corpus, the
synthetic generator's ``source`` domain, which differs from the evaluation target partially,
the way web image-text data differs from remote-sensing captions (its own seed, twenty times the
target's training images, other phrasings, another look, classes the target lacks and lacks some
of the target's; see ``rsnc_bench.data.synthetic``).

The result is an ordinary open_clip checkpoint folder (``open_clip_config.json`` and
``open_clip_pytorch_model.bin``, usable as ``--backbone local-dir:FOLDER`` or as
``--backbone tiny-b32 --pretrained FOLDER/open_clip_pytorch_model.bin``) plus ``pretrain.json``:
the recipe, the weights' sha256 and how it was made. It lives in ``$RSNC_BENCH_CACHE/pretrained/``
(default ``~/.cache/rsnc-bench``), is built on first use and reused afterwards; a folder whose
weights do not match their hash, or that another recipe made, is rebuilt with a notice, never
used silently. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rsnc_bench import __version__
from rsnc_bench.errors import ConfigError
from rsnc_bench.paths import remove_stale_temporaries, temporary_path, writable_folder
from rsnc_bench.progress import bar

WEIGHTS_NAME = "open_clip_pytorch_model.bin"
CONFIG_NAME = "open_clip_config.json"
RECORD_NAME = "pretrain.json"


@dataclass(frozen=True)
class PretrainRecipe:
    """How a preset's weights are made: the source corpus and the contrastive training budget."""

    arch: str = "tiny-b32"
    seed: int = 7  # the source corpus and the initialisation; the target's default seed is 0
    n_images: int = 3000  # about 40x the default target's 80 training images (web corpora dwarf RS caption sets)
    draw_size: int = 128  # drawn at the target's size, then resized to the model's input
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50


RECIPES: dict[str, PretrainRecipe] = {"tiny-clip": PretrainRecipe()}


def cache_home() -> Path:
    return Path(os.environ.get("RSNC_BENCH_CACHE") or Path.home() / ".cache" / "rsnc-bench").expanduser()


def checkpoint_dir(name: str) -> Path:
    return cache_home() / "pretrained" / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_corpus(recipe: PretrainRecipe, size: int) -> tuple[torch.Tensor, list[list[str]]]:
    """[N, 3, size, size] uint8 images and five captions each, from the synthetic source domain."""
    from rsnc_bench.data.synthetic import draw_image

    images = np.empty((recipe.n_images, size, size, 3), dtype=np.uint8)
    captions = []
    for index in bar(range(recipe.n_images), desc="drawing the source corpus", unit="img", leave=False):
        _, image, texts = draw_image(recipe.seed, index, recipe.draw_size, 0.0, domain="source")
        images[index] = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))
        captions.append(texts)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def pretrain(recipe: PretrainRecipe, progress: str = "pretraining") -> torch.nn.Module:
    """CLIP's symmetric InfoNCE with a learnable temperature on the source corpus, from seed
    ``recipe.seed``: each epoch shows every image once with one of its captions."""
    from rsnc_bench.backbones import BackboneConfig, build_backbone
    from rsnc_bench.engine.batches import Preprocess
    from rsnc_bench.engine.optim import adamw, cosine_with_warmup, param_groups, set_lr

    torch.manual_seed(recipe.seed)
    encoder = build_backbone(BackboneConfig(recipe.arch))
    images, captions = source_corpus(recipe, encoder.image_size)
    pixels = Preprocess(encoder, augment=False)(images, torch.device("cpu"))
    rng = np.random.RandomState(recipe.seed)
    steps_per_epoch = recipe.n_images // recipe.batch_size
    total = steps_per_epoch * recipe.epochs
    optimizer = adamw(param_groups(encoder.model, recipe.weight_decay), recipe.lr)
    encoder.train()
    with bar(total=total, desc=progress, unit="step") as steps_bar:
        for epoch in range(recipe.epochs):
            order = rng.permutation(recipe.n_images)
            picks = rng.randint(5, size=recipe.n_images)
            for s in range(steps_per_epoch):
                rows = order[s * recipe.batch_size:(s + 1) * recipe.batch_size]
                text = encoder.tokenize([captions[r][picks[r]] for r in rows])
                set_lr(optimizer, recipe.lr, cosine_with_warmup(epoch * steps_per_epoch + s, total, recipe.warmup_steps))
                t = F.normalize(encoder.encode_text(text).embedding, dim=-1)
                v = F.normalize(encoder.encode_image(pixels[rows]).embedding, dim=-1)
                logits = encoder.model.logit_scale.exp() * t @ v.T
                target = torch.arange(len(rows))
                loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    encoder.model.logit_scale.clamp_(0, np.log(100))  # CLIP's clamp
                steps_bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                steps_bar.update()
    return encoder.eval()


def build_checkpoint(name: str, folder: Path) -> None:
    """Pretrain ``name``'s recipe and write its checkpoint folder atomically."""
    from rsnc_bench.backbones.openclip import model_config

    recipe = RECIPES[name]
    started = time.perf_counter()
    encoder = pretrain(recipe, progress=f"pretraining {name}")
    seconds = time.perf_counter() - started
    tmp = temporary_path(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(encoder.model.state_dict(), tmp / WEIGHTS_NAME)
    model_cfg = model_config(recipe.arch)
    (tmp / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {
        "size": model_cfg["vision_cfg"]["image_size"], "mean": list(encoder.mean), "std": list(encoder.std),
        "interpolation": "bicubic", "resize_mode": "shortest"}}, indent=2))
    (tmp / RECORD_NAME).write_text(json.dumps({
        "name": name, "recipe": asdict(recipe), "sha256": sha256_file(tmp / WEIGHTS_NAME), "seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "rsnc_bench": __version__,
    }, indent=2))
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def checkpoint_problem(name: str, folder: Path) -> str | None:
    """Why the cached checkpoint of ``name`` cannot be used, or None when it can."""
    record_path, weights = folder / RECORD_NAME, folder / WEIGHTS_NAME
    if not record_path.is_file() or not weights.is_file() or not (folder / CONFIG_NAME).is_file():
        return "not built yet"
    try:
        record = json.loads(record_path.read_text())
        expected_hash, recipe = record["sha256"], record["recipe"]
    except (ValueError, KeyError, TypeError):
        return f"{record_path} is unreadable"
    if recipe != asdict(RECIPES[name]):
        return "it was made with another recipe"
    if sha256_file(weights) != expected_hash:
        return f"{weights} does not match its sha256 in {RECORD_NAME} (changed or truncated)"
    return None


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One builder at a time per cache (grid workers on several GPUs may ask together)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_checkpoint(name: str, force: bool = False) -> Path:
    """The verified checkpoint folder of preset ``name``, built (with a one-line notice) when it
    is missing, corrupt or stale, or when ``force``."""
    if name not in RECIPES:
        raise ConfigError(f"no pretraining recipe named {name!r}; choose {', '.join(RECIPES)}")
    folder = checkpoint_dir(name)
    writable_folder(folder.parent, "the pretrained-weights cache ($RSNC_BENCH_CACHE)")
    with _build_lock(folder):
        remove_stale_temporaries(folder.parent)
        problem = "rebuild asked (--force)" if force else checkpoint_problem(name, folder)
        if problem is not None:
            print(f"{name}: building the pretrained checkpoint in {folder} ({problem}); "
                  f"this takes a few minutes once, offline", file=sys.stderr)
            build_checkpoint(name, folder)
    return folder


def checkpoint_record(folder: Path) -> dict:
    return json.loads((folder / RECORD_NAME).read_text())
