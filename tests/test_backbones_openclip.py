"""open_clip backbones: the tiny preset's shapes, token features, offline weight loading."""

from __future__ import annotations

import warnings

import pytest
import torch

from rsnc_bench.backbones import BackboneConfig, WeightsNotFoundError, build_backbone, describe_backbones
from rsnc_bench.errors import UnknownNameError


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_backbone(BackboneConfig("tiny-vit")).eval()


def test_tiny_preset_global_and_token_shapes(tiny):
    images = torch.randn(3, 3, tiny.image_size, tiny.image_size)
    text = tiny.tokenize(["a red roof", "two planes parked near a long runway", "sea"])
    img = tiny.encode_image(images, tokens=True)
    txt = tiny.encode_text(text, tokens=True)
    d = tiny.embed_dim
    grid = (tiny.image_size // 12) ** 2  # patch size 12
    assert img.embedding.shape == (3, d) and img.tokens.shape == (3, grid, d) and img.mask.all()
    assert txt.embedding.shape == (3, d) and txt.tokens.shape == (3, text.shape[1], d)
    # mask covers SOT .. EOT: 3 words + 2 markers for "a red roof"
    assert txt.mask[0].sum() == 5 and not txt.mask[0, 5:].any()
    # asking for tokens does not change the global embedding
    assert torch.allclose(txt.embedding, tiny.encode_text(text).embedding, atol=1e-5)
    assert torch.allclose(img.embedding, tiny.encode_image(images).embedding, atol=1e-5)
    # the EOT token's projected feature is the global text embedding (methods.md 2.2)
    eot = text.argmax(dim=1)
    assert torch.allclose(txt.tokens[torch.arange(3), eot], txt.embedding, atol=1e-5)


def test_freezing_one_tower(tiny):
    model = build_backbone(BackboneConfig("tiny-vit", freeze_image=True))
    assert not any(p.requires_grad for p in model.image_parameters())
    assert all(p.requires_grad for p in model.text_parameters())
    image_ids = {id(p) for p in model.image_parameters()}
    assert image_ids.isdisjoint(id(p) for p in model.text_parameters())


def test_weights_file_round_trip_through_pretrained(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny.model.state_dict().items()}}, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = build_backbone(BackboneConfig("tiny-vit", pretrained=str(path))).eval()
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    assert torch.equal(loaded.encode_image(images).embedding, tiny.encode_image(images).embedding)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, tiny):
    with pytest.raises(WeightsNotFoundError, match="nope.pt"):
        build_backbone(BackboneConfig("tiny-vit", pretrained=str(tmp_path / "nope.pt")))
    partial = tmp_path / "partial.pt"
    torch.save({k: v for k, v in tiny.model.state_dict().items() if not k.startswith("visual.")}, partial)
    with pytest.raises(WeightsNotFoundError, match="missing from the file"):
        build_backbone(BackboneConfig("tiny-vit", pretrained=str(partial)))
    with pytest.raises(WeightsNotFoundError, match="not in the local Hugging Face cache|nothing is downloaded"):
        build_backbone(BackboneConfig("RN50", pretrained="openai"))
    with pytest.raises(WeightsNotFoundError, match="open_clip_config.json"):
        build_backbone(BackboneConfig(f"local-dir:{tmp_path}"))
    with pytest.raises(UnknownNameError, match="ViT-B-32"):
        build_backbone(BackboneConfig("ViT-B-23"))


def test_quickgelu_flag_and_warning(tmp_path, tiny):
    path = tmp_path / "RemoteCLIP-tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    with pytest.warns(UserWarning, match="quickgelu"):
        gelu = build_backbone(BackboneConfig("tiny-vit", pretrained=str(path)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quick = build_backbone(BackboneConfig("tiny-vit", pretrained=str(path), quick_gelu=True))
    activation = lambda m: type(m.model.visual.transformer.resblocks[0].mlp.gelu).__name__  # noqa: E731
    assert activation(gelu) == "GELU" and activation(quick) == "QuickGELU"
    images = torch.randn(2, 3, tiny.image_size, tiny.image_size)
    # same weights, other activation: the features differ (protocol.md 7.2)
    assert not torch.allclose(gelu.eval().encode_image(images).embedding, quick.eval().encode_image(images).embedding)


def test_listing_has_presets_families_and_open_clip_architectures():
    names = dict(describe_backbones())
    assert {"tiny-vit", "timm-hf", "swin-bert", "minilm", "ViT-B-32", "ViT-B-32-quickgelu"} <= set(names)
    assert [n for n, _ in describe_backbones("ViT-B-32*")] == [n for n in names if n.startswith("ViT-B-32")]


def test_global_text_embedding_skips_the_padding_tail_exactly():
    """The pooled text embedding is computed without the all-padding columns (a causal mask lets no
    position see them): it equals open_clip's full-context encode_text, and the gradient flows."""
    torch.manual_seed(0)
    model = build_backbone(BackboneConfig("tiny-b32"))
    text = model.tokenize(["a red roof", "two planes parked near a long runway in the top left of an airport"])
    assert text.shape[1] == 77 and (text[:, 20:] == 0).all()
    fast = model.encode_text(text).embedding
    torch.testing.assert_close(fast, model.model.encode_text(text), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, model.encode_text(text, tokens=True).embedding, rtol=1e-5, atol=1e-5)
    fast.sum().backward()
    assert model.model.token_embedding.weight.grad.abs().sum() > 0


def test_a_preset_is_one_folder_holding_its_architecture_and_its_budget(tmp_path):
    """presets/<name>/open_clip_config.json: open_clip's local-dir format plus the preset's budget.
    Built through it, the model is the one open_clip builds from the same architecture registered
    by name (same init, same tokenizer), so moving the presets changed no number."""
    import json

    import open_clip

    from rsnc_bench.backbones import TRAIN_HINTS
    from rsnc_bench.backbones.openclip import PRESET_DIR, PRESETS

    assert set(PRESETS) >= {"tiny-vit", "tiny-b32"}
    preset = json.loads((PRESET_DIR / "tiny-vit" / "open_clip_config.json").read_text())
    assert TRAIN_HINTS["tiny-vit"] == preset["train"] and "train" not in PRESETS["tiny-b32"]
    (tmp_path / "tiny-vit-by-name.json").write_text(json.dumps(preset["model_cfg"]))
    open_clip.add_model_config(tmp_path / "tiny-vit-by-name.json")
    torch.manual_seed(3)
    by_name = open_clip.create_model("tiny-vit-by-name")
    torch.manual_seed(3)
    ours = build_backbone(BackboneConfig("tiny-vit"))
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), ours.model.state_dict().values()))
    captions = ["two planes near the terminal", "a river"]
    assert torch.equal(open_clip.get_tokenizer("tiny-vit-by-name")(captions), ours.tokenize(captions))


def test_each_caption_is_tokenised_once_per_process_with_the_same_ids(monkeypatch):
    import open_clip

    from rsnc_bench.backbones import openclip as family

    real = open_clip.get_tokenizer("ViT-B-32")
    seen = []

    class Counting:
        def __call__(self, texts):
            seen.extend(texts)
            return real(texts)

    tokenizer = Counting()
    texts = ("many planes at an airport", "a green field", "many planes at an airport")
    assert torch.equal(family._tokenized(tokenizer, texts), real(list(texts)).long())
    assert seen == ["many planes at an airport", "a green field"]  # each distinct caption once
    again = family._tokenized(tokenizer, texts[::-1])  # a noise rate permutes the same captions
    assert torch.equal(again, real(list(texts[::-1])).long()) and len(seen) == 2
    monkeypatch.setattr(family, "TOKEN_CACHE_SIZE", 2)  # past the cap: tokenised each time, same ids
    more = ("a river", "a bridge over a river")
    assert torch.equal(family._tokenized(tokenizer, more), real(list(more)).long()) and seen[-2:] == list(more)
