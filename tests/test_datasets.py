"""Each layout reader on tiny fixtures in the exact real layout, and on the real RSICD subset."""

from __future__ import annotations

import numpy as np
import pytest

from rsnc_bench.data import load_dataset
from rsnc_bench.data.datasets import class_from_prefix
from rsnc_bench.engine.retrieval import t2i_ceiling
from rsnc_bench.errors import DataFormatError, DatasetNotFoundError

from .layouts import five, write_amfmn, write_csv, write_image, write_karpathy, write_nwpu


def test_sydney_json_key_order_tif_numeric_names_and_native_val(tmp_path):
    images = [(f"{i}.tif", s, five(f"Sydney {i}")) for i, s in enumerate(["train"] * 4 + ["val", "test"], start=1)]
    root = write_karpathy(tmp_path, "dataset.json", "imgs", images, indent=4, sydney_order=True, image_format="TIFF")
    ds = load_dataset("sydney", root)
    assert [s.n_images for s in ds.splits.values()] == [4, 1, 1]
    assert ds.val_source.startswith("native") and ds.val_provenance["source"] == "native"
    assert "fraction" not in ds.val_provenance and len(ds.val_provenance["images_sha256"]) == 64
    assert ds["train"].captions[0] == "Sydney 1 caption 0 ."  # case kept
    assert ds["train"].classes == ("", "", "", "")  # numeric names carry no class


def test_ucm_accepts_images_folder_and_numbers_its_classes(tmp_path):
    images = [("1.tif", "train", five("a")), ("100.tif", "train", five("b")), ("101.tif", "train", five("c")),
              ("181.tif", "val", five("v")), ("2100.tif", "test", five("d"))]
    ds = load_dataset("ucm", write_karpathy(tmp_path, "dataset.json", "images", images))
    assert ds["train"].classes == ("class00", "class00", "class01")
    assert ds["val"].classes == ("class01",)
    assert ds["test"].classes == ("class20",)


def test_rsitmd_blank_captions_are_kept_and_reported(tmp_path):
    caps = ["A green baseball field.", "", "   ", "Red track.", "Field."]
    images = [(f"baseballfield_{i}.tif", "train", caps) for i in range(10)] + [("boat_0.tif", "test", five("boat"))]
    ds = load_dataset("rsitmd", write_karpathy(tmp_path, "dataset_RSITMD.json", "images", images, dataset_key="rsitmd"))
    rows = ds["train"].n_rows + ds["val"].n_rows
    assert rows == 50
    assert len(ds["train"].blank_rows()) + len(ds["val"].blank_rows()) == 20
    assert any("blank captions kept" in line for line in ds.summary())
    assert set(ds["train"].classes) == {"baseballfield"}


def test_amfmn_both_filename_conventions_and_val_carve(tmp_path):
    train = [(f"airport_{i}.jpg", [f"airport {i} line {k} ." for k in range(5)]) for i in range(20)]
    test = [("00012.jpg", five("numeric")), ("beach_3.jpg", five("beach"))]
    root = write_amfmn(tmp_path, "rsicd", "RSICD_images", train, test)
    ds = load_dataset("rsicd", root, layout="amfmn")
    assert ds["train"].n_images + ds["val"].n_images == 20
    assert ds["val"].n_images == 2  # round(10 % of 20)
    assert ds.val_source.startswith("carved")
    val = ds.val_provenance
    assert (val["source"], val["fraction"], val["seed"], val["n_images"]) == ("carved", 0.1, 0, 2)
    other = load_dataset("rsicd", root, layout="amfmn", val_seed=1).val_provenance
    assert other["seed"] == 1 and other["images_sha256"] != val["images_sha256"]  # another carve, another hash
    assert not set(ds["train"].images) & set(ds["val"].images)
    assert ds["test"].images == ("00012.jpg", "beach_3.jpg")
    assert ds["test"].img_of.tolist() == [0] * 5 + [1] * 5
    # rows of one image stay together and in file order
    split = ds["train"]
    for image, rows in enumerate(split.rows_of_image()):
        number = split.images[image].split("_")[1].split(".")[0]
        assert [split.captions[r] for r in rows] == [f"airport {number} line {k} ." for k in range(5)]


def test_csv_absolute_author_paths_tabs_and_gb18030(tmp_path):
    rows = [(f"/home/author/data/rsitmd/images/boat_{i}.tif", f"boat {i} caption") for i in range(3)]
    rows += [(r"C:\Users\x\images\plane_7.tif", "a plane 中文")]
    write_csv(tmp_path / "rsitmd_test.csv", rows, delimiter="\t", encoding="gb18030")
    write_csv(tmp_path / "precomp/rsitmd/RSITMD-NC-00.csv", [(f"/abs/boat_{i}.tif", f"train {i}") for i in range(10, 20)])
    for name in [f"boat_{i}.tif" for i in list(range(3)) + list(range(10, 20))] + ["plane_7.tif"]:
        write_image(tmp_path / "images" / name)
    ds = load_dataset("rsitmd", tmp_path, layout="csv")
    assert ds["test"].images == ("boat_0.tif", "boat_1.tif", "boat_2.tif", "plane_7.tif")
    assert ds["test"].captions[-1] == "a plane 中文"
    assert ds["train"].n_images + ds["val"].n_images == 10


def test_nwpu_class_keyed_json_and_class_folders(tmp_path):
    root = write_nwpu(tmp_path, {
        "airplane": [(f"airplane_{i:03d}.jpg", "train", five(f"plane {i}")) for i in range(1, 4)]
        + [("airplane_700.jpg", "test", five("plane test"))],
        "airport": [("airport_001.jpg", "val", five("airport"))],
    })
    ds = load_dataset("nwpu", root)
    assert ds["train"].images == ("airplane/airplane_001.jpg", "airplane/airplane_002.jpg", "airplane/airplane_003.jpg")
    assert ds["val"].classes == ("airport",)
    assert ds["test"].n_rows == 5 and ds["train"].captions[1] == "plane 1 caption 1 ."


def test_class_from_prefix():
    assert class_from_prefix("denseresidential_12.jpg") == "denseresidential"
    assert class_from_prefix("00012.jpg") == ""
    assert class_from_prefix("fmow_stadium_211_3_msrgb.jpg") == ""


def test_not_found_error_names_files_and_suggests_present_layout(tmp_path):
    train = [("airport_1.jpg", five("a")), ("airport_2.jpg", five("b"))]
    write_amfmn(tmp_path, "rsicd", "RSICD_images", train, [("beach_1.jpg", five("c"))])
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("rsicd", tmp_path)
    message = str(info.value)
    assert "dataset_rsicd.json" in message and "--layout amfmn" in message


def test_duplicate_filename_rows_are_grouped_by_name_not_position(tmp_path):
    rows = [("a_1.jpg", "x"), ("b_1.jpg", "y"), ("a_1.jpg", "z")]
    write_csv(tmp_path / "rsicd_test.csv", rows)
    for n in ("a_1.jpg", "b_1.jpg"):
        write_image(tmp_path / "RSICD_images" / n)
    ds = load_dataset("rsicd", tmp_path, layout="csv")
    assert ds["test"].img_of.tolist() == [0, 1, 0]


# --- the real RSICD subset ----------------------------------------------------------------------

def test_rsicd_subset_layouts_agree_row_for_row(rsicd_subset):
    by_json = load_dataset("rsicd", rsicd_subset, layout="karpathy")
    by_txt = load_dataset("rsicd", rsicd_subset, layout="amfmn")
    for name in ("train", "val", "test"):
        a, b = by_json[name], by_txt[name]
        assert a.images == b.images and a.captions == b.captions
        assert np.array_equal(a.img_of, b.img_of)
        assert a.content_hash() == b.content_hash()
    assert (by_json["train"].n_images, by_json["val"].n_images, by_json["test"].n_images) == (1769, 197, 1093)
    assert (by_json["train"].n_rows + by_json["val"].n_rows, by_json["test"].n_rows) == (9830, 5465)
    assert by_json["train"].classes[0] == "airport"


def test_rsicd_subset_test_ceiling_matches_protocol(rsicd_subset):
    test = load_dataset("rsicd", rsicd_subset)["test"]
    ceiling = t2i_ceiling(test.captions, test.img_of)
    assert [round(ceiling[k], 2) for k in ("t2i_r1", "t2i_r5", "t2i_r10")] == [93.12, 99.19, 99.78]


def test_full_amfmn_annotations_without_images_is_a_clear_error(rsicd_subset, tmp_path):
    (tmp_path / "rsicd_precomp").symlink_to(rsicd_subset / "annotations_full_amfmn")
    (tmp_path / "RSICD_images").symlink_to(rsicd_subset / "RSICD_images")
    with pytest.raises(DatasetNotFoundError, match=r"images listed in .* are missing under"):
        load_dataset("rsicd", tmp_path, layout="amfmn")


def test_malformed_karpathy_json_names_the_line(tmp_path):
    (tmp_path / "dataset_rsicd.json").write_text('{"images": [\n {"filename": "a_1.jpg",\n "split": }\n]}')
    (tmp_path / "RSICD_images").mkdir()
    with pytest.raises(DataFormatError, match=r"dataset_rsicd.json:3: malformed JSON"):
        load_dataset("rsicd", tmp_path)


def test_gb18030_is_read_for_csv_only_and_announced(tmp_path, capsys):
    write_csv(tmp_path / "rsicd_test.csv", [("a_1.jpg", "a plane 中文")], encoding="gb18030")
    write_image(tmp_path / "RSICD_images" / "a_1.jpg")
    assert load_dataset("rsicd", tmp_path, layout="csv")["test"].captions == ("a plane 中文",)
    assert "rsicd_test.csv is not UTF-8" in capsys.readouterr().err
    write_karpathy(tmp_path / "json", "dataset_rsicd.json", "RSICD_images", [("a_1.jpg", "test", ["cafe"] * 5)])
    path = tmp_path / "json" / "dataset_rsicd.json"
    path.write_bytes(path.read_bytes().replace(b'"raw": "cafe"', '"raw": "cafés"'.encode("latin-1")))
    with pytest.raises(DataFormatError, match="not UTF-8 text"):  # GB18030 would have read it as mojibake
        load_dataset("rsicd", tmp_path / "json")


def test_quoted_captions_with_commas_and_quotes_still_parse(tmp_path):
    (tmp_path / "rsicd_test.csv").write_text('filename,title\na_1.jpg,"a ""big"", wide river"\nb_1.jpg,two\n')
    for name in ("a_1.jpg", "b_1.jpg"):
        write_image(tmp_path / "RSICD_images" / name)
    assert load_dataset("rsicd", tmp_path, layout="csv")["test"].captions == ('a "big", wide river', "two")


def test_symlinks_inside_the_image_folder_and_a_linked_folder_are_followed(tmp_path):
    real = write_karpathy(tmp_path / "real", "dataset_rsicd.json", "RSICD_images",
                          [("a_1.jpg", "train", five("a")), ("c_1.jpg", "val", five("c")), ("b_1.jpg", "test", five("b"))])
    (real / "RSICD_images" / "b_1.jpg").rename(real / "RSICD_images" / "b_1-original.jpg")
    (real / "RSICD_images" / "b_1.jpg").symlink_to("b_1-original.jpg")  # inside the folder: allowed
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "dataset_rsicd.json").symlink_to(real / "dataset_rsicd.json")
    (linked / "RSICD_images").symlink_to(real / "RSICD_images")  # the whole image folder elsewhere: allowed
    assert load_dataset("rsicd", linked)["test"].images == ("b_1.jpg",)
