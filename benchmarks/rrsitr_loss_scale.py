"""RRSITR's per-pair loss at the start of fine-tuning, against its fixed thresholds (gamma 5 / 18).

    python benchmarks/rrsitr_loss_scale.py                         # tiny-clip on the default synthetic train split
    python benchmarks/rrsitr_loss_scale.py --backbone ViT-B-32-quickgelu --pretrained FILE --datasets rsicd --data-root DIR

One pass over the clean training pairs in shuffled batches, no training: the per-pair loss
(methods.md 3.3) split into its global and local (kappa-scaled) parts, the shares below gamma_1
and at or above gamma_2, and the local Frobenius score of each matched pair against its row's
hardest negative. The paper's thresholds presume a backbone whose local score already ranks most
matched pairs first; this prints whether the backbone at hand does.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from rsnc_bench.backbones import BackboneConfig, build_backbone
from rsnc_bench.data.datasets import get_dataset
from rsnc_bench.engine.batches import Preprocess, make_batch, split_tensors, train_batches
from rsnc_builtin_methods.clip_pipeline import cosine_matrix, frobenius_scores, local_tokens
from rsnc_builtin_methods.rrsitr import RrsitrConfig, pair_losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-clip")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--datasets", default="synthetic")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = RrsitrConfig()
    backbone = build_backbone(BackboneConfig(args.backbone, args.pretrained)).eval()
    train = split_tensors(get_dataset(args.datasets).load(args.data_root)["train"], backbone, None, native=True)
    preprocess = Preprocess(backbone, augment=False, generator=torch.Generator().manual_seed(0))
    batches = train_batches(train, np.arange(train.n_rows), args.batch_size, torch.Generator().manual_seed(0))
    totals, local_parts, matched, hardest = [], [], [], []
    with torch.no_grad():
        for rows, image_ids in batches:
            batch = make_batch(train, rows, image_ids, preprocess, torch.device("cpu"))
            texts, images = backbone.encode_text(batch.text, tokens=True), backbone.encode_image(batch.images, tokens=True)
            frobenius = frobenius_scores(local_tokens(texts, cfg.text_padding), local_tokens(images))
            local = cfg.local_scale * frobenius
            totals.append(pair_losses(cosine_matrix(texts, images), local, cfg.logit_scale))
            target = torch.arange(len(local))
            local_parts.append(F.cross_entropy(local, target, reduction="none") + F.cross_entropy(local.T, target, reduction="none"))
            matched.append(frobenius.diagonal())
            hardest.append(frobenius.masked_fill(torch.eye(len(frobenius), dtype=torch.bool), -np.inf).amax(1))
    total, local = torch.cat(totals), torch.cat(local_parts)
    q = [round(float(v), 1) for v in total.quantile(torch.tensor([0.1, 0.5, 0.9]))]
    print(f"{len(total)} pairs, batch {args.batch_size}; per-pair loss 10/50/90 %: {q}; median local part {local.median():.1f}, "
          f"global part {(total - local).median():.1f}")
    print(f"below gamma_1 = {cfg.gamma_clean:g}: {(total < cfg.gamma_clean).float().mean():.1%}; "
          f"at or above gamma_2 = {cfg.gamma_noisy:g}: {(total >= cfg.gamma_noisy).float().mean():.1%}")
    m, h = torch.cat(matched), torch.cat(hardest)
    print(f"Frobenius score: matched median {m.median():.2f}, row's hardest negative median {h.median():.2f}; "
          f"matched pair first in its row: {(m > h).float().mean():.1%}")


if __name__ == "__main__":
    main()
