"""KER building blocks (methods.md 4.2): keyword vocabulary, keyword masking, KER head, MLM loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from rsnc_bench.errors import ConfigError
from rsnc_builtin_methods.keywords import (
    MASK_ID,
    KerHead,
    QuickGELU,
    attend,
    head_count,
    ker_loss,
    ker_vocab_size,
    keyword_statistics,
    keyword_vocabulary,
    mask_keywords,
    mlm_loss,
    query_slots,
)
from rsnc_builtin_methods.linear_ce import LogitWorkspace, vocab_cross_entropy

open_clip = pytest.importorskip("open_clip")

SOT, EOT = 49406, 49407
CAPTIONS = [
    "many planes are parked near the airport terminal .",
    "Two  storagetanks, near a 3-lane road!!",
    "it's the airport's runway next to a photovoltaic plant",
    "A RED roof and   red cars in the parking lot .",
    "caf\u00e9 &amp; park with green trees",
    "Some   photovoltaic panels\tare on the roof of the storagetanks building.",
    " ".join(["several planes near the airport runway"] * 20),  # longer than 77 tokens
    "",
]
KEYWORDS = {"airport", "planes", "storagetanks", "photovoltaic", "red", "park", "runway", "roof"}


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-32")


def ids_of(tok, word: str) -> list[int]:
    return tok.encode(word)


# ----------------------------------------------------------------------------- vocabulary

def test_keyword_vocabulary_counts_and_tie_order():
    captions = ["The plane, the AIRPORT.", "a plane near the airport", "b2b zebra; apple"]
    # raw counts: the 3; airport, b ("b2b": digits split words), plane 2 each; then the count-1 words alphabetically
    assert keyword_vocabulary(captions, source="frequency") == ["the", "airport", "b", "plane", "a", "apple", "near", "zebra"]
    assert keyword_vocabulary(captions, size=3, source="frequency") == ["the", "airport", "b"]
    # content (default): the function words "the" and "a" go, the relation word "near" stays
    assert keyword_vocabulary(captions) == ["airport", "b", "plane", "apple", "near", "zebra"]
    assert keyword_vocabulary(iter(captions), size=0) == []
    with pytest.raises(ConfigError):
        keyword_vocabulary(captions, size=-1)
    with pytest.raises(ConfigError, match="keyword source"):
        keyword_vocabulary(captions, source="tfidf")


def test_content_vocabulary_has_the_released_lists_statistics_on_real_rsicd(rsicd_subset):
    """The released iEBAKER lists are content words: on these captions they mask 56.8 % of words,
    6.8 % of the masked ones function (relation) words; a raw top-512 list masks 98 %, 46 % function words."""
    images = json.loads((rsicd_subset / "dataset_rsicd.json").read_text())["images"]
    train = [s["raw"] for image in images if image["split"] == "train" for s in image["sentences"]]
    vocab = keyword_vocabulary(train, 512)
    masked, function = keyword_statistics(train, vocab)
    assert 0.50 < masked < 0.62 and function < 0.08
    assert not {"a", "the", "is", "of", "in", "and", "are"} & set(vocab)
    assert {"near", "beside", "next"} <= set(vocab) and vocab[:3] == ["green", "many", "trees"]
    raw_masked, raw_function = keyword_statistics(train, keyword_vocabulary(train, 512, "frequency"))
    assert raw_masked > 0.9 and raw_function > 0.4


# ----------------------------------------------------------------------------- corrected masking

def test_probe_words_split_into_several_bpe_tokens(tok):
    assert len(ids_of(tok, "storagetanks")) > 2 and len(ids_of(tok, "photovoltaic")) > 1
    assert len(ids_of(tok, "airport")) == 1


def test_corrected_masks_every_subtoken_and_round_trips(tok):
    masked, labels = mask_keywords(CAPTIONS, KEYWORDS, tok)
    reference = tok(CAPTIONS)
    assert masked.shape == labels.shape == reference.shape == (len(CAPTIONS), 77)
    assert masked.dtype == labels.dtype == torch.long
    hit = labels != 0
    # masked exactly where labelled, labels are the original ids there, and 0 elsewhere
    assert torch.equal(masked == MASK_ID, hit)
    assert torch.equal(labels[hit], reference[hit])
    assert torch.equal(torch.where(hit, labels, masked), reference)
    assert hit[0].sum() == 2 and hit[1].sum() == len(ids_of(tok, "storagetanks")) * 1
    assert not hit[-1].any()


def test_corrected_round_trips_on_real_rsicd_captions(tok, rsicd_subset):
    images = json.loads((rsicd_subset / "dataset_rsicd.json").read_text())["images"]
    captions = [s["raw"] for image in images for s in image["sentences"]][:3000]
    train = [s["raw"] for image in images if image["split"] == "train" for s in image["sentences"]]
    masked, labels = mask_keywords(captions, keyword_vocabulary(train, size=512), tok)
    hit = labels != 0
    assert hit.any(dim=1).float().mean() > 0.9  # most captions have a frequent word
    assert torch.equal(masked == MASK_ID, hit)
    assert torch.equal(torch.where(hit, labels, masked), tok(captions))


def test_corrected_masks_all_pieces_of_a_multi_token_keyword(tok):
    caption = "many planes are parked near the photovoltaic airport terminal ."
    masked, labels = mask_keywords([caption], ["photovoltaic", "airport", "planes"], tok)
    row = tok([caption])[0].tolist()
    pv = ids_of(tok, "photovoltaic")
    start = 1 + len(ids_of(tok, "many planes are parked near the"))
    assert row[start: start + len(pv)] == pv
    expected = {2} | set(range(start, start + len(pv))) | {start + len(pv)}
    assert {int(i) for i in torch.nonzero(labels[0]).flatten()} == expected
    for i in range(77):
        assert labels[0, i].item() == (row[i] if i in expected else 0)
        assert masked[0, i].item() == (MASK_ID if i in expected else row[i])


def test_corrected_is_case_insensitive_and_word_level(tok):
    # "Airport." is cleaned to "airport" + "." (a keyword); "airports" and "parked" are other words
    masked, labels = mask_keywords(["Airport. airports parked"], ["airport", "park"], tok)
    assert labels[0].nonzero().flatten().tolist() == [1]
    assert labels[0, 1].item() == ids_of(tok, "airport")[0]


def test_corrected_truncation_keeps_eot_and_labels_nothing_past_it(tok):
    caption = "a photovoltaic plant"  # SOT a photo volta ic plant EOT
    masked, labels = mask_keywords([caption], ["photovoltaic"], tok, context_length=4)
    reference = tok([caption], context_length=4)[0]
    assert masked.shape == (1, 4)
    assert masked[0, 3].item() == EOT and labels[0, 3].item() == 0
    assert labels[0].tolist() == [0, 0, ids_of(tok, "photovoltaic")[0], 0]
    assert torch.equal(torch.where(labels[0] != 0, labels[0], masked[0]), reference)


# ----------------------------------------------------------------------------- faithful masking

def test_faithful_masks_the_position_of_the_word_index(tok):
    caption = "airport with many planes"
    masked, labels = mask_keywords([caption], {"airport", "planes"}, tok, faithful_offset=True)
    row = tok([caption])[0]
    # word 0 -> position 0 (SOT), word 3 -> position 3 ("many", the token before "planes")
    assert labels[0].nonzero().flatten().tolist() == [0, 3]
    assert labels[0, 0].item() == SOT and labels[0, 3].item() == ids_of(tok, "many")[0]
    assert masked[0, 0].item() == MASK_ID and masked[0, 3].item() == MASK_ID
    keep = labels[0] == 0
    assert torch.equal(masked[0][keep], row[keep])


def test_faithful_compares_raw_whitespace_words(tok):
    for caption in ("airport. with many planes", "Airport with many planes"):
        _, labels = mask_keywords([caption], {"airport", "planes"}, tok, faithful_offset=True)
        assert labels[0].nonzero().flatten().tolist() == [3]


def test_faithful_truncation_never_masks_eot_or_beyond(tok):
    caption = "planes planes planes planes planes"
    masked, labels = mask_keywords([caption], ["planes"], tok, context_length=4, faithful_offset=True)
    assert masked[0].tolist() == [MASK_ID, MASK_ID, MASK_ID, EOT]
    assert labels[0].tolist() == [SOT] + ids_of(tok, "planes") * 2 + [0]


# ----------------------------------------------------------------------------- WordPiece masking (non-paper)

@pytest.fixture(scope="module")
def wordpiece():
    """A tiny uncased BERT WordPiece tokenizer whose vocabulary splits planes and airport into pieces."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "plane", "##s", "air", "##port", "near", ".", "many"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def test_wordpiece_masks_every_piece_of_a_keyword_and_no_special_token(wordpiece):
    ids = lambda *words: [wordpiece.convert_tokens_to_ids(w) for w in words]  # noqa: E731
    masked, labels = mask_keywords(["Many planes near the Airport."], {"planes", "Airport"}, wordpiece, context_length=12)
    row = ids("[CLS]", "many", "plane", "##s", "near", "the", "air", "##port", ".", "[SEP]") + [0, 0]
    hit = [False, False, True, True, False, False, True, True, False, False, False, False]
    mask_id = wordpiece.mask_token_id
    assert masked[0].tolist() == [mask_id if h else t for t, h in zip(row, hit)]
    assert labels[0].tolist() == [t if h else 0 for t, h in zip(row, hit)]
    assert ker_vocab_size(wordpiece) == 14


def test_wordpiece_truncation_keeps_sep_last_and_unmasked(wordpiece):
    masked, labels = mask_keywords(["many planes near the airport"], ["planes", "airport"], wordpiece, context_length=5)
    sep, mask_id = wordpiece.sep_token_id, wordpiece.mask_token_id
    assert masked[0].tolist() == [wordpiece.cls_token_id, wordpiece.convert_tokens_to_ids("many"), mask_id, mask_id, sep]
    assert labels[0, -1].item() == 0 and (labels[0] != 0).sum().item() == 2


def test_wordpiece_faithful_masks_the_position_of_the_word_index(wordpiece):
    masked, labels = mask_keywords(["Many planes near the Airport."], {"planes", "airport"}, wordpiece, context_length=12, faithful_offset=True)
    # word 1 ("planes") -> position 1 ("many"); "Airport." is not the raw keyword "airport"
    assert labels[0].nonzero().flatten().tolist() == [1] and labels[0, 1].item() == wordpiece.convert_tokens_to_ids("many")
    assert masked[0, 1].item() == wordpiece.mask_token_id


# ----------------------------------------------------------------------------- errors

def test_non_clip_tokenizer_is_a_config_error():
    class HfLike:
        vocab_size = 32000

        def __call__(self, texts):
            return texts

    with pytest.raises(ConfigError, match="ker_weight=0"):
        mask_keywords(["a plane"], ["plane"], HfLike())


def test_bad_context_length_is_a_config_error(tok):
    with pytest.raises(ConfigError, match="context_length"):
        mask_keywords(["a plane"], ["plane"], tok, context_length=1)


# ----------------------------------------------------------------------------- head and loss

def test_head_count_falls_back_to_a_divisor():
    assert head_count(24, 8) == 8
    assert head_count(20, 8) == 5
    assert head_count(24, 16) == 12
    assert head_count(7, 8) == 7


def test_ker_head_shape_and_gradients():
    torch.manual_seed(0)
    head = KerHead(dim=20, vocab_size=50, heads=8)
    assert head.heads == 5 and head.cross_attn.num_heads == 5
    assert all(block.attn.num_heads == 5 for block in head.blocks) and len(head.blocks) == 2
    text = torch.randn(3, 7, 20, requires_grad=True)
    image = torch.randn(3, 11, 20, requires_grad=True)
    logits = head(text, image)
    assert logits.shape == (3, 7, 50)
    (logits * torch.randn_like(logits)).sum().backward()
    assert text.grad.abs().sum() > 0 and image.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.parameters())


def test_ker_head_defaults_and_init():
    head = KerHead(dim=24)
    assert head.mlm.fc.out_features == 49408 and head.heads == 1  # width // 64, at least 1
    assert KerHead(dim=512, vocab_size=10).heads == 8  # the reference's 8 heads at 512
    assert head.cross_attn.in_proj_bias.abs().sum() == 0


def test_ker_head_has_the_reference_structure():
    """No residual around the cross-attention: with the attention's output projection zeroed, the
    text tokens no longer reach the logits; QuickGELU in every MLP."""
    torch.manual_seed(0)
    head = KerHead(dim=16, vocab_size=30, heads=2)
    assert [type(block.mlp.gelu) for block in head.blocks] == [QuickGELU, QuickGELU] and type(head.mlm.gelu) is QuickGELU
    with torch.no_grad():
        head.cross_attn.out_proj.weight.zero_()
        head.cross_attn.out_proj.bias.zero_()
    text_a, text_b, image = torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    torch.testing.assert_close(head(text_a, image), head(text_b, image))


def test_ker_head_initial_standard_deviations_match_the_reference():
    torch.manual_seed(0)
    width, layers = 512, 2
    head = KerHead(dim=width, vocab_size=4096, layers=layers)
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    expected = {
        "cross_attn.in_proj_weight": attn_std, "cross_attn.out_proj.weight": proj_std,
        "blocks.0.attn.in_proj_weight": attn_std, "blocks.1.attn.out_proj.weight": proj_std,
        "blocks.0.mlp.c_fc.weight": fc_std, "blocks.1.mlp.c_proj.weight": proj_std,
        "mlm.dense.weight": fc_std, "mlm.fc.weight": proj_std,
    }
    params = dict(head.named_parameters())
    for name, std in expected.items():
        assert params[name].std().item() == pytest.approx(std, rel=0.03), name
    bound = width**-0.5  # Linear biases keep PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0 < params["mlm.dense.bias"].abs().max() <= bound


def test_mlm_loss_matches_cross_entropy_on_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 30, requires_grad=True)
    labels = torch.tensor([[0, 4, 0, 29, 0], [7, 0, 0, 0, 1]])
    expected = (
        F.cross_entropy(logits[0, 1], torch.tensor(4)) + F.cross_entropy(logits[0, 3], torch.tensor(29))
        + F.cross_entropy(logits[1, 0], torch.tensor(7)) + F.cross_entropy(logits[1, 4], torch.tensor(1))
    ) / 4
    loss = mlm_loss(logits, labels)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0


def test_mlm_loss_without_labels_is_zero_with_a_grad_path():
    logits = torch.randn(2, 5, 30, requires_grad=True)
    loss = mlm_loss(logits, torch.zeros(2, 5, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ker_loss_projects_only_labelled_positions_and_equals_the_full_mlm_loss():
    torch.manual_seed(0)
    head = KerHead(16, vocab_size=50, heads=4)
    text, image = torch.randn(3, 6, 16), torch.randn(3, 4, 16)
    labels = torch.zeros(3, 6, dtype=torch.long)
    labels[0, 2], labels[2, 1], labels[2, 4] = 7, 11, 3
    assert head(text, image, labels != 0).shape == (3, 50)
    assert ker_loss(head, text, image, labels).item() == pytest.approx(mlm_loss(head(text, image), labels).item(), rel=1e-6)
    empty = ker_loss(head, text, image, torch.zeros_like(labels))
    empty.backward()
    assert empty.item() == 0.0


# ----------------------------------------------------------------------------- the optimised KER computation
# Each rewritten piece against the straightforward computation it replaces, loss and gradients.

def grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors, allow_unused=True))


def assert_grads_close(got, want, rtol=1e-5, atol=1e-6):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


FUSED_CE = pytest.mark.parametrize("fused", [vocab_cross_entropy], ids=["vocab"])


@FUSED_CE
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_cross_entropy_equals_linear_then_cross_entropy(with_bias, fused):
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 40, (9,))
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    want_loss = F.cross_entropy(F.linear(hidden, weight, bias), labels)
    want = grads(3 * want_loss, inputs)
    workspace = LogitWorkspace()
    for _ in range(3):  # the buffer is taken, given back by the backward and taken again
        loss = fused(hidden, weight, bias, labels, workspace)
        torch.testing.assert_close(loss, want_loss)
        assert_grads_close(grads(3 * loss, inputs), want)
    assert workspace.free is not None
    loss = fused(hidden, weight, bias, labels)  # no workspace: a fresh buffer
    assert_grads_close(grads(3 * loss, inputs), want)


@FUSED_CE
def test_linear_cross_entropy_keeps_a_loss_whose_probability_underflows(fused):
    """A target logit ~1000 below the row maximum: its probability is 0 in fp32, the loss is recomputed from the logits."""
    hidden = torch.tensor([[10.0, 0.0], [0.1, 0.2]], requires_grad=True)
    weight = torch.tensor([[100.0, 0.0], [0.0, 1.0], [-1.0, 0.5]], requires_grad=True)
    labels = torch.tensor([2, 1])
    want = F.cross_entropy(hidden @ weight.T, labels)
    got = fused(hidden, weight, None, labels, LogitWorkspace())
    assert want.item() > 500 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert_grads_close(grads(got, [hidden, weight]), grads(want, [hidden, weight]))


@FUSED_CE
def test_linear_cross_entropy_under_autocast_matches_the_half_precision_linear(fused):
    torch.manual_seed(1)
    hidden, weight, bias = torch.randn(6, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True), torch.randn(30, requires_grad=True)
    labels = torch.randint(0, 30, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)
        got = fused(hidden, weight, bias, labels, LogitWorkspace())
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-5)
    assert_grads_close(grads(got, [hidden, weight, bias]), grads(want, [hidden, weight, bias]), rtol=1e-2, atol=1e-3)


@FUSED_CE
def test_linear_cross_entropy_buffer_is_not_reused_under_a_live_graph(fused):
    torch.manual_seed(2)
    hidden, weight = torch.randn(4, 5, requires_grad=True), torch.randn(12, 5, requires_grad=True)
    labels = torch.randint(0, 12, (4,))
    workspace = LogitWorkspace()
    with torch.no_grad():  # no graph: the buffer goes straight back
        fused(hidden, weight, None, labels, workspace)
    assert workspace.free is not None
    first = fused(hidden, weight, None, labels, workspace)
    second = fused(2 * hidden, weight, None, labels, workspace)  # first still holds its buffer
    want = grads(F.cross_entropy(hidden @ weight.T, labels), [hidden, weight])
    assert_grads_close(grads(first, [hidden, weight]), want)
    second.backward(retain_graph=True)
    second.backward()  # no forward in between: its buffer is intact
    third = fused(hidden, weight, None, labels, workspace)
    third.backward(retain_graph=True)
    fused(hidden, weight, None, labels, workspace)  # takes the buffer third gave back
    with pytest.raises(RuntimeError, match="second backward"):
        third.backward()


def test_vocab_cross_entropy_computes_only_the_gradients_asked_for():
    """A frozen weight (or bias) gets no product in the backward; the others are still exact."""
    torch.manual_seed(6)
    hidden, weight, bias = torch.randn(7, 6, requires_grad=True), torch.randn(25, 6), torch.randn(25, requires_grad=True)
    labels = torch.randint(0, 25, (7,))
    want = grads(F.cross_entropy(F.linear(hidden, weight, bias), labels), [hidden, bias])
    loss = vocab_cross_entropy(hidden, weight, bias, labels, LogitWorkspace())
    assert loss.grad_fn is not None
    assert_grads_close(grads(loss, [hidden, bias]), want)


@pytest.mark.parametrize("cross", [False, True])
def test_attend_equals_the_multihead_attention_module(cross):
    torch.manual_seed(3)
    attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    query = torch.randn(3, 7, 16, requires_grad=True)
    key_value = torch.randn(3, 5, 16, requires_grad=True) if cross else query
    want = attn(query, key_value, key_value, need_weights=False)[0]
    got = attend(attn, query, key_value)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(want)
    inputs = [query, *list(attn.parameters())] + ([key_value] if cross else [])
    assert_grads_close(grads((got * weights).sum(), inputs), grads((want * weights).sum(), inputs))


def test_query_slots_list_positions_in_row_major_order():
    positions = torch.tensor([[False, True, False, True], [False, False, False, False], [True, True, True, False]])
    index, valid = query_slots(positions)
    values = torch.arange(12).view(3, 4)
    assert index.shape == (3, 3)
    assert values.gather(1, index)[valid].tolist() == values[positions].tolist() == [1, 3, 8, 9, 10]


def reference_logits(head: KerHead, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The KER head the straightforward way: nn.MultiheadAttention modules, every position."""
    image = head.ln_pre_i(image)
    x = head.cross_attn(head.ln_pre_t(text), image, image, need_weights=False)[0]
    for block in head.blocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False)[0]
        x = x + block.mlp(block.ln_2(x))
    return head.mlm(head.ln_post(x))


@pytest.mark.parametrize("layers", [1, 2])
def test_ker_loss_equals_the_full_head_and_cross_entropy(layers):
    """The pruned last block, the batch-first attention and the fused vocabulary cross-entropy
    against the head run at every position and F.cross_entropy on its full logits."""
    torch.manual_seed(4)
    head = KerHead(16, vocab_size=300, heads=4, layers=layers)
    text, image = torch.randn(4, 9, 16, requires_grad=True), torch.randn(4, 5, 16, requires_grad=True)
    labels = torch.zeros(4, 9, dtype=torch.long)
    labels[0, 2], labels[0, 7], labels[2, 0], labels[2, 1], labels[2, 8], labels[3, 4] = 7, 299, 11, 3, 5, 7  # row 1: none
    inputs = [text, image, *head.parameters()]
    want = mlm_loss(reference_logits(head, text, image), labels)
    got = ker_loss(head, text, image, labels)
    torch.testing.assert_close(got, want)
    assert_grads_close(grads(got, inputs), grads(want, inputs))
    torch.testing.assert_close(head(text, image, labels != 0), reference_logits(head, text, image)[labels != 0])


def test_ker_loss_restricted_vocabulary_is_the_softmax_over_those_ids():
    """NON-PAPER ker_vocab="labels": the softmax over the given ids only; with every id, the full loss."""
    torch.manual_seed(5)
    head = KerHead(16, vocab_size=50, heads=4)
    text, image = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    labels = torch.zeros(2, 6, dtype=torch.long)
    labels[0, 1], labels[1, 3], labels[1, 4] = 7, 30, 7
    vocab = torch.tensor([3, 7, 30])
    logits = reference_logits(head, text, image)[labels != 0][:, vocab]
    want = F.cross_entropy(logits, torch.tensor([1, 2, 1]))
    torch.testing.assert_close(ker_loss(head, text, image, labels, vocab), want)
    torch.testing.assert_close(ker_loss(head, text, image, labels, torch.arange(50)), ker_loss(head, text, image, labels))
    with pytest.raises(ConfigError, match="not among the vocabulary ids"):
        ker_loss(head, text, image, labels, torch.tensor([3, 7]))
