from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rsnc_bench.data import load_dataset

SHARED_RSICD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "rsicd-subset"


@pytest.fixture(scope="session")
def rsicd_subset() -> Path:
    if not (SHARED_RSICD / "dataset_rsicd.json").exists():
        pytest.skip(f"real RSICD subset not found at {SHARED_RSICD}")
    return SHARED_RSICD


TINY_SYNTHETIC = dict(n_train=48, n_val=12, n_test=24, image_size=48)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic") / "tiny"


@pytest.fixture(scope="session")
def synthetic(synthetic_root):
    return load_dataset("synthetic", synthetic_root, options=TINY_SYNTHETIC)


# Pretraining recipes small enough for tests, standing in for the tiny-clip preset's: one of
# seconds for the cache's mechanics, one that learns enough for a zero-shot check.
from rsnc_bench.pretrain import PretrainRecipe  # noqa: E402

TINY_RECIPE = PretrainRecipe(n_images=96, epochs=2, batch_size=48, warmup_steps=2)
LEARNING_RECIPE = PretrainRecipe(n_images=384, epochs=8, batch_size=64, lr=2e-3, warmup_steps=6)


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test: RSNC_BENCH_CACHE in a folder of the session (never the user's cache), with the
    tiny recipe as tiny-clip's, so a test that reaches the default preset builds it in seconds."""
    from rsnc_bench import pretrain

    home = tmp_path_factory.getbasetemp() / "rsnc-cache"
    monkeypatch.setenv("RSNC_BENCH_CACHE", str(home))
    monkeypatch.setitem(pretrain.RECIPES, "tiny-clip", TINY_RECIPE)
    return home


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) and a WordPiece tokenizer, saved like a hub folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    words = "a the plane planes airport river green trees many buildings near is are of with in two".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
