"""The real remote-sensing caption datasets (no images ship with rsnc-bench).

Layouts and sizes follow protocol.md sections 2-3. Each ``--data-root`` holds one dataset in
one of its layouts; ``--layout`` picks it, ``--image-dir`` overrides the image folder.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from rsnc_bench.data.datasets import DATASETS, DatasetSpec, class_from_prefix
from rsnc_bench.data.formats import Layout


def _karpathy(json_name: str, *image_dirs: str) -> Layout:
    return Layout("karpathy", {"json": (json_name,)}, image_dirs)


def _amfmn(prefix: str, *image_dirs: str) -> Layout:
    return Layout("amfmn", {"dir": (f"{prefix}_precomp",)}, image_dirs + (f"{prefix}_precomp/images",))


def _csv(prefix: str, upper: str, *image_dirs: str) -> Layout:
    """``<prefix>_{train,val,test}.csv`` (RemoteCLIP / GeoRSCLIP names) or RRSITR's precomp files."""
    rrsitr = f"precomp/{prefix}"
    return Layout(
        "csv",
        {
            "train": (f"{prefix}_train.csv", f"{upper}-NC-00.csv", f"{rrsitr}/{upper}-NC-00.csv"),
            "val": (f"{prefix}_val.csv", f"{rrsitr}/{prefix}_val.csv"),
            "test": (f"{prefix}_test.csv", f"{rrsitr}/{prefix}_test.csv"),
        },
        image_dirs,
        required=("test",),
    )


@DATASETS.register("rsicd")
class RSICD(DatasetSpec):
    """RSICD: 10,921 images x 5 captions, 224 px JPEG (Lu et al., IEEE TGRS 2017).

    Citation: Lu, Wang, Zheng, Li, "Exploring Models and Data for Remote Sensing Image Caption
    Generation", IEEE TGRS 56(4), 2017.

    Splits (images / captions): Karpathy JSON 8,734 / 1,094 / 1,093 (train / val / test);
    AMFMN lists 9,828 / 49,140 train (official train + val) and 1,093 / 5,465 test, no val:
    10 % of train images are carved into val. Quirks: captions padded to 5 by duplication;
    some test captions shared across images (t2i R@1 ceiling 93.12); 921 numeric file names.

    Layouts under the root: ``karpathy`` dataset_rsicd.json + RSICD_images/ (default);
    ``amfmn`` rsicd_precomp/{train,test}_{caps,filename}.txt + RSICD_images/;
    ``csv`` rsicd_{train,val,test}.csv (filename,title) + RSICD_images/.
    """

    name = "rsicd"
    default_layout = "karpathy"
    layouts = {
        "karpathy": _karpathy("dataset_rsicd.json", "RSICD_images", "images"),
        "amfmn": _amfmn("rsicd", "RSICD_images", "images"),
        "csv": _csv("rsicd", "RSICD", "RSICD_images", "images"),
    }


@DATASETS.register("rsitmd")
class RSITMD(DatasetSpec):
    """RSITMD: 4,743 images, 23,715 captions, 256 px TIF (Yuan et al., IEEE TGRS 2022).

    Citation: Yuan et al., "Exploring a Fine-Grained Multiscale Method for Cross-Modal Remote
    Sensing Image Retrieval", IEEE TGRS 60, 2022.

    Splits: AMFMN standard 4,291 / 21,455 train and 452 / 2,260 test, no val (10 % of train
    images carved); RRSITR CSVs 3,861 / 430 / 452 images train / val / test. Quirks: 20 blank
    train captions in AMFMN copies (kept and reported); duplicated captions within images.

    Layouts: ``karpathy`` dataset_RSITMD.json + images/ (default); ``amfmn``
    rsitmd_precomp/ + images/; ``csv`` rsitmd_{train,val,test}.csv or RRSITR's
    precomp/rsitmd/RSITMD-NC-00.csv, rsitmd_val.csv, rsitmd_test.csv + images/.
    """

    name = "rsitmd"
    default_layout = "karpathy"
    layouts = {
        "karpathy": _karpathy("dataset_RSITMD.json", "images"),
        "amfmn": _amfmn("rsitmd", "images"),
        "csv": _csv("rsitmd", "RSITMD", "images"),
    }


def _numeric_id(image_name: str) -> int | None:
    stem = PurePosixPath(image_name).stem
    return int(stem) if stem.isdigit() else None


@DATASETS.register("ucm")
class UCMCaptions(DatasetSpec):
    """UCM-Captions: 2,100 images (21 classes x 100), 10,500 captions, 256 px TIF (Qu et al., CITS 2016).

    Citation: Qu, Ning, Zhao, Zhang, Lu, "Deep Semantic Understanding of High Resolution Remote
    Sensing Image", CITS 2016.

    Splits: Karpathy JSON 1,680 / 210 / 210; AMFMN 1,680 train / 210 "test". AMFMN's test is
    the JSON *val* split (ids x91-x100), so "test" differs between layouts: results record the
    layout. Scene class: images 1-100 are class 0, 101-200 class 1, and so on.

    Layouts: ``karpathy`` dataset.json + imgs/ or images/ (default); ``amfmn`` ucm_precomp/.
    """

    name = "ucm"
    default_layout = "karpathy"
    layouts = {
        "karpathy": _karpathy("dataset.json", "imgs", "images"),
        "amfmn": _amfmn("ucm", "imgs", "images"),
    }

    def scene_class(self, image_name: str) -> str:
        number = _numeric_id(image_name)
        return f"class{(number - 1) // 100:02d}" if number else class_from_prefix(image_name)


@DATASETS.register("sydney")
class SydneyCaptions(DatasetSpec):
    """Sydney-Captions: 613 images, 3,065 captions, 500 px TIF, 7 classes (Qu et al., CITS 2016).

    Citation: as UCM-Captions (Qu et al., CITS 2016).

    Splits: Karpathy JSON 497 / 58 / 58; AMFMN 497 train / 58 "test" (= the JSON val split).
    File names are numeric (1.tif ... 613.tif) and carry no class, so the ``hard`` noise
    protocol falls back to captions of any other image.

    Layouts: ``karpathy`` dataset.json + imgs/ or images/ (default); ``amfmn`` sydney_precomp/.
    """

    name = "sydney"
    default_layout = "karpathy"
    layouts = {
        "karpathy": _karpathy("dataset.json", "imgs", "images"),
        "amfmn": _amfmn("sydney", "imgs", "images"),
    }


@DATASETS.register("nwpu")
class NWPUCaptions(DatasetSpec):
    """NWPU-Captions: 31,500 images (45 classes x 700), 157,500 captions, 256 px JPG (Cheng et al., TGRS 2022).

    Citation: Cheng et al., "NWPU-Captions Dataset and MLCA-Net for Remote Sensing Image
    Captioning", IEEE TGRS 60, 2022.

    Splits: JSON about 25,200 / 3,150 / 3,150; RRSITR lists 2,835 val and 3,150 test images.
    Quirk: 2,381 test caption texts are shared across images.

    Layouts: ``nwpu`` dataset_nwpu.json (keyed by class) + NWPU_images/<class>/ (default);
    ``csv`` nwpu_{train,val,test}.csv whose base names are found in their class folder.
    """

    name = "nwpu"
    default_layout = "nwpu"
    layouts = {
        "nwpu": Layout("nwpu", {"json": ("dataset_nwpu.json",)}, ("NWPU_images",)),
        "csv": _csv("nwpu", "NWPU", "NWPU_images"),
    }

    def image_name(self, layout: str, name: str) -> str:
        # CSV rows give base names; the images sit in per-class folders.
        return f"{class_from_prefix(name)}/{name}" if "/" not in name else name

    def scene_class(self, image_name: str) -> str:
        parts = PurePosixPath(image_name).parts
        return parts[0] if len(parts) > 1 else class_from_prefix(image_name)
