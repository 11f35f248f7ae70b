"""Reproducible noisy correspondence for a train split, with ground truth.

A protocol turns a clean train split, a nominal rate r and a seed into, for every train row i,
the clean row whose caption row i now carries (``caption_row``) and the image it is paired with
(``assigned_image``). The caption truly describes ``orig_image = img_of[caption_row]``; the row
is clean when the two images agree. Clean flags come from this identity, never from comparing
caption text (protocol.md 4.4). Every protocol draws from its own ``numpy.random.RandomState``
(the legacy stream numpy keeps frozen), never from global RNG state.

Protocols (``rsnc-bench list noise``):
- ``rrsitr``: RRSITR's generator, exactly (protocol.md 4.1). One RandomState(seed) is created
  and RRSITR's rates 0.2, 0.4, 0.6, 0.8 are processed in that order, each drawing
  ``choice(n, int(n*r), replace=False)`` rows and shuffling their captions; the manifest for
  rate r is the one produced when r is reached. A rate outside that list is processed after
  the list's rates below it. With seed 42 and RRSITR's clean row order this reproduces its
  NC-02 ... NC-08 files.
- ``shuffle``: caption-level shuffle of int(n*r) rows among themselves (NCR / RRSITR style).
  The rows are a prefix of one seeded permutation, so for one seed the rows chosen at a lower
  rate are among those chosen at a higher rate: noise curves over r compare like with like.
- ``ncr``: NCR's index-level shuffle (protocol.md 4.2): captions stay, the images of int(n*r)
  rows are shuffled among them.
- ``hard``: realistic pseudo-matched pairs: each of int(n*r) rows receives the caption of a
  random row of another image of the same scene class (falls back to any other image when
  the class is unknown or has one image). Captions are copied, not permuted.
A caption shuffled back onto its own image (same row or another row of that image) is clean,
so the realised rate of the shuffle protocols is slightly below nominal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rsnc_bench import __version__
from rsnc_bench.config import check_seed
from rsnc_bench.data.formats import basename_of_any_path, read_caption_csv
from rsnc_bench.data.split import Split
from rsnc_bench.errors import ConfigError, DataFormatError, ManifestError
from rsnc_bench.paths import atomic_write_text
from rsnc_bench.registry import Registry

FORMAT = "rsnc-bench/noise-manifest@1"
RRSITR_RATES = (0.2, 0.4, 0.6, 0.8)

# A protocol maps (clean train split, rate, seed) to (caption_row, assigned_image).
Protocol = Callable[[Split, float, int], tuple[np.ndarray, np.ndarray]]
PROTOCOLS: Registry = Registry("noise protocol")


def check_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise rate {rate} is outside [0, 1); give a fraction such as 0.2")
    return float(rate)


def _caption_permutation(n: int, rows: np.ndarray, moved: np.ndarray) -> np.ndarray:
    caption_row = np.arange(n, dtype=np.int64)
    caption_row[rows] = moved
    return caption_row


@PROTOCOLS.register("rrsitr")
def rrsitr_protocol(split: Split, rate: float, seed: int = 42):
    """RRSITR's generator: one legacy RandomState, rates 0.2/0.4/0.6/0.8 in order (exact)."""
    n = split.n_rows
    state = np.random.RandomState(seed)
    caption_row = np.arange(n, dtype=np.int64)
    for r in sorted({r for r in RRSITR_RATES if r < rate} | {rate}):
        if r == 0.0:
            continue
        k = int(n * r)  # Python float product, truncated, as in the reference
        rows = state.choice(n, size=k, replace=False)
        moved = rows.copy()  # the captions of the chosen rows, in draw order ...
        state.shuffle(moved)  # ... shuffled in place (same stream use as shuffling the strings)
        caption_row = _caption_permutation(n, rows, moved)  # always from the clean column
    return caption_row, split.img_of.copy()


@PROTOCOLS.register("shuffle")
def shuffle_protocol(split: Split, rate: float, seed: int):
    """Caption-level shuffle of int(n*r) rows among themselves; rows nested across rates."""
    n, k = split.n_rows, int(split.n_rows * rate)
    rows = np.random.RandomState(seed).permutation(n)[:k]
    moved = rows[np.random.RandomState([seed, k]).permutation(k)]
    return _caption_permutation(n, rows, moved), split.img_of.copy()


@PROTOCOLS.register("ncr")
def ncr_protocol(split: Split, rate: float, seed: int):
    """NCR index-level shuffle: the images of int(n*r) rows are shuffled among them."""
    n, k = split.n_rows, int(split.n_rows * rate)
    state = np.random.RandomState(seed)
    slots = state.permutation(n)[:k]
    images = split.img_of[slots].copy()
    state.shuffle(images)
    assigned = split.img_of.copy()
    assigned[slots] = images
    return np.arange(n, dtype=np.int64), assigned


@PROTOCOLS.register("hard")
def hard_protocol(split: Split, rate: float, seed: int):
    """Each of int(n*r) rows gets a caption of another image of its scene class."""
    n, k = split.n_rows, int(split.n_rows * rate)
    if k and split.n_images < 2:
        raise ConfigError("the hard protocol needs at least two train images")
    rows = np.random.RandomState(seed).permutation(n)[:k]
    pick = np.random.RandomState([seed, k, 1])
    classes = np.array(split.classes, dtype=object)
    row_class = classes[split.img_of]
    rows_of_class = {c: np.flatnonzero(row_class == c) for c in set(split.classes) if c}
    images_of_class = {c: len(set(split.img_of[r])) for c, r in rows_of_class.items()}
    all_rows = np.arange(n)
    caption_row = np.arange(n, dtype=np.int64)
    for i in rows:
        own = split.img_of[i]
        c = row_class[i]
        pool = rows_of_class[c] if c and images_of_class[c] > 1 else all_rows
        while True:  # rejection sampling: the pool always holds another image
            j = pool[pick.randint(len(pool))]
            if split.img_of[j] != own:
                caption_row[i] = j
                break
    return caption_row, split.img_of.copy()


@dataclass(frozen=True, eq=False)
class NoiseManifest:
    """Per train row: which clean caption it carries, the image that caption describes, the
    image it is paired with, and whether the two agree (clean). Saved as JSON with a hash."""

    dataset: str
    protocol: str
    seed: int | None
    rate: float | None  # nominal; None for an imported file given without one
    images: tuple[str, ...]
    caption_row: np.ndarray
    orig_image: np.ndarray
    assigned_image: np.ndarray
    train_hash: str
    source: str = ""  # for imports: the file name and its sha256

    @property
    def n_rows(self) -> int:
        return len(self.caption_row)

    @property
    def clean(self) -> np.ndarray:
        return self.orig_image == self.assigned_image

    @property
    def n_noisy(self) -> int:
        return int((~self.clean).sum())

    @property
    def realized_rate(self) -> float:
        return self.n_noisy / self.n_rows if self.n_rows else 0.0

    def _payload(self) -> dict:
        return {
            "format": FORMAT, "dataset": self.dataset, "protocol": self.protocol, "seed": self.seed,
            "rate": self.rate, "source": self.source, "train_hash": self.train_hash, "n_rows": self.n_rows,
            "n_noisy": self.n_noisy, "realized_rate": self.realized_rate, "images": list(self.images),
            "rows": {
                "caption_row": self.caption_row.tolist(), "orig_image": self.orig_image.tolist(),
                "assigned_image": self.assigned_image.tolist(), "clean": self.clean.astype(int).tolist(),
            },
        }

    @property
    def content_hash(self) -> str:
        return _hash_payload(self._payload())

    def to_json(self) -> str:
        payload = self._payload()
        payload["hash"] = _hash_payload(payload)
        payload["rsnc_bench"] = __version__
        return json.dumps(payload)

    def save(self, path: str | Path, force: bool = False) -> str:
        """Write atomically. Returns "written", or "unchanged" when an identical file exists.

        An existing file with other content is never replaced unless ``force``.
        """
        path = Path(path)
        if path.exists() and not force:
            try:
                existing = NoiseManifest.load(path)
            except ManifestError:
                existing = None
            if existing is not None and existing.content_hash == self.content_hash:
                return "unchanged"
            raise ManifestError(f"{path} exists with other content; pass --force to replace it or choose another --out")
        atomic_write_text(path, self.to_json())
        return "written"

    @classmethod
    def load(cls, path: str | Path) -> NoiseManifest:
        """Read and verify a manifest: format, hash, array lengths, index ranges, clean flags."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such manifest; make one with `rsnc-bench noise make`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{path}: not a JSON manifest ({exc}); make it again with `rsnc-bench noise make`") from None
        except OSError as exc:  # a folder, an unreadable file
            raise ManifestError(f"{path}: cannot be read ({exc.strerror}); give the path of a manifest JSON file") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ManifestError(f"{path}: not an rsnc-bench noise manifest (format {FORMAT}); make it with `rsnc-bench noise make`")
        stored = doc.pop("hash", None)
        doc.pop("rsnc_bench", None)
        try:
            rows = doc["rows"]
            manifest = cls(
                dataset=doc["dataset"], protocol=doc["protocol"], seed=doc["seed"], rate=doc["rate"],
                images=tuple(doc["images"]), caption_row=np.asarray(rows["caption_row"], dtype=np.int64),
                orig_image=np.asarray(rows["orig_image"], dtype=np.int64),
                assigned_image=np.asarray(rows["assigned_image"], dtype=np.int64),
                train_hash=doc["train_hash"], source=doc.get("source", ""),
            )
            clean = np.asarray(rows["clean"], dtype=bool)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{path}: incomplete manifest (missing or bad {exc}); make it again") from None
        n, n_images = manifest.n_rows, len(manifest.images)
        problems = []
        if stored != _hash_payload(doc):
            problems.append("its content hash does not match (the file was edited or truncated)")
        if not (len(manifest.orig_image) == len(manifest.assigned_image) == len(clean) == n):
            problems.append("its row arrays differ in length")
        elif n and (manifest.caption_row.min() < 0 or manifest.caption_row.max() >= n
                    or min(manifest.orig_image.min(), manifest.assigned_image.min()) < 0
                    or max(manifest.orig_image.max(), manifest.assigned_image.max()) >= n_images):
            problems.append("it holds row or image indices out of range")
        elif not np.array_equal(clean, manifest.clean):
            problems.append("its clean flags disagree with its image columns")
        if problems:
            raise ManifestError(f"{path}: {problems[0]}; make it again with `rsnc-bench noise make`")
        return manifest

    def check_split(self, split: Split, where: str = "manifest") -> None:
        """Fail unless this manifest was made for exactly this clean train split."""
        if split.content_hash() != self.train_hash or split.n_rows != self.n_rows:
            raise ManifestError(
                f"{where} was made for other train data ({self.dataset}, {self.n_rows} rows, hash "
                f"{self.train_hash[:12]}) than this split ({split.n_rows} rows, hash {split.content_hash()[:12]}); "
                f"make it again for this dataset")

    def apply(self, split: Split) -> Split:
        """The noisy train split: row i pairs caption ``caption_row[i]`` with ``assigned_image[i]``."""
        self.check_split(split)
        return Split(
            name=split.name, image_root=split.image_root, images=split.images, classes=split.classes,
            captions=tuple(split.captions[r] for r in self.caption_row), img_of=self.assigned_image,
            sources=split.sources,
        )


def _hash_payload(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_path(folder: str | Path, protocol: str, rate: float, seed: int) -> Path:
    """Where a manifest lives under a dataset's folder: ``<protocol>-r<rate>-s<seed>.json``."""
    return Path(folder) / f"{protocol}-r{rate:g}-s{seed}.json"


def make_manifest(split: Split, dataset: str, protocol: str, rate: float, seed: int) -> NoiseManifest:
    """Inject noise into a clean train split with a registered protocol."""
    generate: Protocol = PROTOCOLS.get(protocol)
    rate, seed = check_rate(rate), check_seed(seed, "noise seed")
    caption_row, assigned = generate(split, rate, seed)
    return NoiseManifest(
        dataset=dataset, protocol=protocol, seed=int(seed), rate=rate, images=split.images,
        caption_row=caption_row, orig_image=split.img_of[caption_row].copy(), assigned_image=assigned,
        train_hash=split.content_hash(),
    )


def import_noisy_csv(path: str | Path, split: Split, dataset: str, rate: float | None = None) -> NoiseManifest:
    """Recover a manifest from an external noisy ``filename,title`` CSV by row comparison.

    The file must list the clean train rows in the same order with the same image column.
    Each noisy caption is matched to a clean row with that text, each clean row used once:
    first the same row if unchanged, then an unused row of the same image (the row is clean),
    then an unused row of another image (noisy); a text used more often than the clean file
    has it (copied, not shuffled, noise) reuses a row of another image.
    """
    path = Path(path)
    raw = read_caption_csv(path)
    if len(raw.files) != split.n_rows:
        raise DataFormatError(path, f"has {len(raw.files)} rows but the clean train split has {split.n_rows}",
                              "import a file with the same rows as the clean train file (same dataset, layout and val carve)")
    line_of = [s.rsplit(":", 1)[-1] for s in raw.sources]
    for i, name in enumerate(raw.files):
        expected = split.images[split.img_of[i]]
        if basename_of_any_path(name) != basename_of_any_path(expected):
            raise DataFormatError(path, f"row {i} names image {name!r} but clean row {i} is {expected!r}",
                                  "keep the clean file's row order and image column", int(line_of[i]))
    rows_with_text: dict[str, list[int]] = {}
    for r, text in enumerate(split.captions):
        rows_with_text.setdefault(text, []).append(r)
    used = np.zeros(split.n_rows, dtype=bool)
    caption_row = np.full(split.n_rows, -1, dtype=np.int64)
    for i, text in enumerate(raw.captions):  # pass 1: unchanged rows
        if split.captions[i] == text:
            caption_row[i], used[i] = i, True
    for i, text in enumerate(raw.captions):
        if text not in rows_with_text:
            raise DataFormatError(path, f"row {i} caption {text[:60]!r} is not a caption of the clean train split",
                                  "an imported file may only move clean captions between rows", int(line_of[i]))
    # pass 2: captions moved back onto their own image; pass 3: captions of other images
    for own_image_only in (True, False):
        for i, text in enumerate(raw.captions):
            if caption_row[i] >= 0:
                continue
            candidates = rows_with_text[text]
            same = [r for r in candidates if split.img_of[r] == split.img_of[i]]
            other = [r for r in candidates if split.img_of[r] != split.img_of[i]]
            free = [r for r in (same if own_image_only else other) if not used[r]]
            if free:
                caption_row[i], used[free[0]] = free[0], True
            elif not own_image_only:  # more copies than the clean file has: copied noise
                caption_row[i] = (other or same)[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return NoiseManifest(
        dataset=dataset, protocol="import", seed=None, rate=None if rate is None else check_rate(rate),
        images=split.images, caption_row=caption_row, orig_image=split.img_of[caption_row].copy(),
        assigned_image=split.img_of.copy(), train_hash=split.content_hash(), source=f"{path.name} sha256:{digest}",
    )
