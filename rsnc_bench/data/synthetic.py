"""The built-in ``synthetic`` dataset: procedurally drawn overhead scenes with grounded captions.

Each image is one of twelve RS-like scene classes (airport, harbor, residential, farmland,
river, storage tanks, forest, parking, playground, beach, pond, bare land) with objects whose
count, colour, position and orientation vary. Five captions per image state facts about what
was drawn (counts, colours, positions, relations), so a small model can learn them, while
images of one class differ only in those details, so retrieval is not solved by the class
alone and wrong captions (noise) visibly hurt. A share of images carries one or two distinct
captions padded to five by duplication, as RSICD does.

Everything is drawn from ``RandomState([seed, image index])`` (numpy's frozen legacy stream),
so a given seed always yields the same scenes and captions, and growing the dataset keeps the
earlier images. The files are written in the Karpathy JSON layout and read back through the
same reader as RSICD.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rsnc_bench import __version__
from rsnc_bench.data.datasets import DATASETS, DatasetSpec, data_home
from rsnc_bench.data.formats import Layout
from rsnc_bench.errors import ConfigError
from rsnc_bench.paths import temporary_path, writable_folder
from rsnc_bench.progress import bar

JSON_NAME = "dataset_synthetic.json"
STAMP_NAME = "synthetic_options.json"

COLORS = {
    "red": (196, 52, 44), "blue": (46, 86, 196), "white": (236, 236, 230), "gray": (100, 100, 106),
    "yellow": (222, 198, 64), "orange": (228, 128, 44), "green": (70, 150, 62), "brown": (124, 84, 46),
}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# 3 x 3 regions: name -> (column, row)
REGIONS = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
SIDES = ("left", "right", "top", "bottom")


def count_words(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else "many"


def counted(n: int, noun: str) -> str:
    """'no boats', 'one boat', 'three boats'."""
    return f"{count_words(n)} {noun}{'' if n == 1 else 's'}"


def where(region: str) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the center'."""
    if region == "center":
        return "in the center"
    if " " in region:
        return f"in the {region}"
    return f"at the {region}" if region in ("top", "bottom") else f"on the {region}"


@dataclass(frozen=True)
class SyntheticOptions:
    """Size and look of the synthetic dataset (``--dataset-opt name=value``)."""

    seed: int = 0
    # Small, so that the default grid (72 cells fine-tuned from tiny-clip) takes about 6 minutes on 2
    # CPU cores; PMPGuard scores every image against every caption of val and test, so its evaluation grows with their squares.
    n_train: int = 80
    n_val: int = 50
    n_test: int = 150
    image_size: int = 128
    dup_fraction: float = 0.3  # share of images whose captions are padded by duplication
    domain: str = "target"  # "target" (the benchmark's data) or "source" (the pretraining corpus, shifted)

    def __post_init__(self) -> None:
        if min(self.n_train, self.n_val, self.n_test) < 1 or self.image_size < 32:
            raise ConfigError("synthetic needs n_train, n_val, n_test >= 1 and image_size >= 32")
        if not 0.0 <= self.dup_fraction <= 1.0:
            raise ConfigError(f"synthetic dup_fraction {self.dup_fraction} is outside [0, 1]")
        if self.domain not in DOMAINS:
            raise ConfigError(f"synthetic domain {self.domain!r} is unknown; choose {' or '.join(DOMAINS)}")

    def slug(self) -> str:
        return (f"s{self.seed}-{self.n_train}-{self.n_val}-{self.n_test}-{self.image_size}px"
                f"-dup{round(self.dup_fraction * 100)}" + ("" if self.domain == "target" else f"-{self.domain}"))


class Canvas:
    """A square drawing surface in unit coordinates, with a random generator for layout."""

    def __init__(self, size: int, rng: np.random.RandomState, ground: tuple[int, int, int]):
        self.size, self.rng = size, rng
        jitter = rng.randint(-12, 13, size=3)
        self.image = Image.new("RGB", (size, size), tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(ground, jitter)))
        self.draw = ImageDraw.Draw(self.image)

    def px(self, *coords: float) -> list[float]:
        return [c * self.size for c in coords]

    def rect(self, x0, y0, x1, y1, color) -> None:
        self.draw.rectangle(self.px(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=color)

    def ellipse(self, cx, cy, rx, ry, color, outline=None) -> None:
        self.draw.ellipse(self.px(cx - rx, cy - ry, cx + rx, cy + ry), fill=color, outline=outline)

    def line(self, points: list[tuple[float, float]], color, width: float) -> None:
        self.draw.line([tuple(self.px(x, y)) for x, y in points], fill=color, width=max(1, int(width * self.size)))

    def speckle(self, color, n: int, r: float) -> None:
        """Texture: many small blobs (trees, shrubs, dunes)."""
        for x, y in self.rng.rand(n, 2):
            self.ellipse(x, y, r, r, color)

    def spots(self, n: int, region: str | None, min_gap: float, margin: float = 0.08) -> list[tuple[float, float]]:
        """Up to ``n`` points with a minimum gap, inside a 3 x 3 region (or anywhere)."""
        if region is None:
            x0, y0, span = margin, margin, 1 - 2 * margin
        else:
            col, row = REGIONS[region]
            x0, y0, span = col / 3 + 0.03, row / 3 + 0.03, 1 / 3 - 0.06
        points: list[tuple[float, float]] = []
        for _ in range(60 * n):
            if len(points) == n:
                break
            p = (x0 + span * self.rng.rand(), y0 + span * self.rng.rand())
            if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_gap ** 2 for q in points):
                points.append(p)
        return points

    def choice(self, options):
        return options[self.rng.randint(len(options))]


def plane(c: Canvas, x: float, y: float, s: float, color) -> None:
    c.line([(x - s, y), (x + s, y)], color, s / 3)  # fuselage
    c.line([(x - s * 0.1, y - s * 0.8), (x - s * 0.1, y + s * 0.8)], color, s / 4)  # wings
    c.line([(x + s * 0.8, y - s * 0.35), (x + s * 0.8, y + s * 0.35)], color, s / 6)  # tail


# Each scene function draws one class and returns (noun phrase, facts). A fact is a short
# clause that is true of the drawn image; captions combine the noun phrase with facts.
Scene = Callable[[Canvas], tuple[str, list[str]]]
SCENES: dict[str, Scene] = {}


def scene(name: str):
    def register(fn: Scene) -> Scene:
        SCENES[name] = fn
        return fn
    return register


@scene("airport")
def airport(c: Canvas):
    vertical = c.rng.rand() < 0.5
    pos = 0.3 + 0.4 * c.rng.rand()
    if vertical:
        c.rect(pos - 0.07, 0.0, pos + 0.07, 1.0, (176, 176, 170))
        c.line([(pos, 0.05), (pos, 0.95)], COLORS["white"], 0.008)
    else:
        c.rect(0.0, pos - 0.07, 1.0, pos + 0.07, (176, 176, 170))
        c.line([(0.05, pos), (0.95, pos)], COLORS["white"], 0.008)
    region = c.choice([r for r in REGIONS if r != "center"])
    spots = c.spots(1 + c.rng.randint(6), region, 0.09)
    for x, y in spots:
        plane(c, x, y, 0.045, COLORS["white"])
    n = len(spots)
    facts = [f"{counted(n, 'plane')} parked {where(region)}",
             f"a runway running {'vertically' if vertical else 'horizontally'}"]
    return "an airport", facts


@scene("harbor")
def harbor(c: Canvas):
    side = c.choice(SIDES)
    water = (40, 84, 140)
    box = {"left": (0, 0, 0.45, 1), "right": (0.55, 0, 1, 1), "top": (0, 0, 1, 0.45), "bottom": (0, 0.55, 1, 1)}[side]
    c.rect(*box, water)
    color = c.choice(["white", "red", "yellow"])
    n = 2 + c.rng.randint(6)
    x0, y0, x1, y1 = box
    for _ in range(2):  # piers
        if side in ("left", "right"):
            y = y0 + 0.2 + 0.6 * c.rng.rand()
            c.rect(x0 + 0.1 * (side == "right"), y, x1 - 0.1 * (side == "left"), y + 0.025, (150, 140, 120))
        else:
            x = x0 + 0.2 + 0.6 * c.rng.rand()
            c.rect(x, y0 + 0.1 * (side == "bottom"), x + 0.025, y1 - 0.1 * (side == "top"), (150, 140, 120))
    for _ in range(n):
        x, y = x0 + 0.06 + (x1 - x0 - 0.12) * c.rng.rand(), y0 + 0.06 + (y1 - y0 - 0.12) * c.rng.rand()
        c.ellipse(x, y, 0.035, 0.015, COLORS[color])
    return "a harbor", [f"{counted(n, color + ' boat')} on the water", f"the water on the {side} side",
                        "piers reaching into the water"]


@scene("residential")
def residential(c: Canvas):
    roof = c.choice(["red", "blue", "white", "orange"])
    road = 0.3 + 0.4 * c.rng.rand()
    c.rect(0, road - 0.025, 1, road + 0.025, (96, 96, 100))
    houses = [(x, y) for x, y in c.spots(3 + c.rng.randint(10), None, 0.13) if abs(y - road) > 0.08]
    for x, y in houses:
        c.rect(x - 0.04, y - 0.03, x + 0.04, y + 0.03, COLORS[roof])
    n = len(houses)
    density = "dense" if n >= 9 else "sparse"
    return f"a {density} residential area", [f"houses with {roof} roofs", "a road crossing the houses",
                                             f"{'many' if n >= 9 else 'a few'} buildings"]


@scene("farmland")
def farmland(c: Canvas):
    n = 2 + c.rng.randint(5)
    vertical = c.rng.rand() < 0.5
    tones = ["green", "yellow", "brown"]
    edges = np.sort(c.rng.rand(n - 1)) * 0.8 + 0.1
    bounds = [0.0, *edges, 1.0]
    used = []
    for i in range(n):
        tone = tones[(i + c.rng.randint(3)) % 3]
        used.append(tone)
        a, b = bounds[i], bounds[i + 1]
        c.rect(a, 0, b, 1, COLORS[tone]) if vertical else c.rect(0, a, 1, b, COLORS[tone])
    for e in edges:  # dark field boundaries keep the count visible when neighbours share a colour
        c.line([(e, 0), (e, 1)] if vertical else [(0, e), (1, e)], (70, 56, 36), 0.012)
    main = max(used, key=used.count)  # first of the most common: no set order, which varies with PYTHONHASHSEED
    return "farmland", [f"{count_words(n)} fields in {'vertical' if vertical else 'horizontal'} strips",
                        f"mostly {main} fields"]


@scene("river")
def river(c: Canvas):
    vertical = c.rng.rand() < 0.5
    c.speckle((40, 104, 44), 40, 0.025)
    phase, amp, mid = c.rng.rand() * 6.3, 0.05 + 0.08 * c.rng.rand(), 0.35 + 0.3 * c.rng.rand()
    t = np.linspace(0, 1, 40)
    wave = mid + amp * np.sin(phase + 6 * t)
    points = list(zip(wave, t)) if vertical else list(zip(t, wave))
    c.line(points, (44, 92, 156), 0.09)
    facts = [f"water flowing {'from top to bottom' if vertical else 'from left to right'}",
             "green trees on both banks"]
    if c.rng.rand() < 0.5:
        k = 10 + c.rng.randint(20)
        x, y = points[k]
        if vertical:
            c.rect(x - 0.12, y - 0.02, x + 0.12, y + 0.02, (150, 150, 150))
        else:
            c.rect(x - 0.02, y - 0.12, x + 0.02, y + 0.12, (150, 150, 150))
        facts.append("a bridge crossing the river")
    return "a river", facts


@scene("storagetanks")
def storage_tanks(c: Canvas):
    region = c.choice(list(REGIONS))
    color = c.choice(["white", "gray"])
    tanks = c.spots(2 + c.rng.randint(7), region, 0.075)
    for x, y in tanks:
        c.ellipse(x, y, 0.032, 0.032, COLORS[color], outline=(60, 60, 60))
    n = len(tanks)
    for x, y in c.spots(2, None, 0.2):
        if min(abs(x - REGIONS[region][0] / 3 - 1 / 6), abs(y - REGIONS[region][1] / 3 - 1 / 6)) > 0.2:
            c.rect(x - 0.08, y - 0.05, x + 0.08, y + 0.05, (104, 100, 96))
    return "an industrial area", [f"{counted(n, color + ' storage tank')} {where(region)}",
                                  "round tanks next to factory buildings"]


@scene("forest")
def forest(c: Canvas):
    c.speckle((22, 70, 30), 260, 0.035)
    facts = ["dense green trees"]
    if c.rng.rand() < 0.5:
        vertical = c.rng.rand() < 0.5
        p = 0.25 + 0.5 * c.rng.rand()
        c.line([(p, 0), (p, 1)] if vertical else [(0, p), (1, p)], (150, 124, 90), 0.03)
        facts.append(f"a dirt road running {'vertically' if vertical else 'horizontally'} through the trees")
    else:
        region = c.choice([r for r in REGIONS if r != "center"])
        col, row = REGIONS[region]
        c.ellipse(col / 3 + 1 / 6, row / 3 + 1 / 6, 0.13, 0.11, (120, 150, 70))
        facts.append(f"a clearing {where(region)}")
    return "a forest", facts


@scene("parking")
def parking(c: Canvas):
    rows = 2 + c.rng.randint(4)
    full = c.rng.rand() < 0.5
    car_colors = list(COLORS.values())
    for r in range(rows):
        y = 0.12 + r * (0.76 / max(rows - 1, 1))
        c.line([(0.05, y + 0.035), (0.95, y + 0.035)], COLORS["white"], 0.005)
        for k in range(12):
            if c.rng.rand() < (0.9 if full else 0.35):
                x = 0.08 + k * 0.07
                c.rect(x, y - 0.02, x + 0.045, y + 0.02, car_colors[c.rng.randint(len(car_colors))])
    return "a parking lot", [f"{count_words(rows)} rows of cars", f"{'many' if full else 'a few'} parked cars"]


@scene("playground")
def playground(c: Canvas):
    region = c.choice(["left", "center", "right", "top", "bottom"])
    col, row = REGIONS[region]
    cx, cy = 0.2 + col * 0.3, 0.2 + row * 0.3
    c.ellipse(cx, cy, 0.2, 0.13, (184, 72, 56))
    c.ellipse(cx, cy, 0.15, 0.085, (72, 150, 64))
    buildings = [(x, y) for x, y in c.spots(c.rng.randint(4), None, 0.25) if abs(x - cx) > 0.25 or abs(y - cy) > 0.18]
    for x, y in buildings:
        c.rect(x - 0.05, y - 0.04, x + 0.05, y + 0.04, (210, 210, 204))
    n = len(buildings)
    facts = [f"a red running track around a green field {where(region)}"]
    facts.append(f"{counted(n, 'building')} around the playground")
    return "a playground", facts


@scene("beach")
def beach(c: Canvas):
    side = c.choice(SIDES)
    cut = 0.35 + 0.3 * c.rng.rand()
    sea = {"left": (0, 0, cut, 1), "right": (cut, 0, 1, 1), "top": (0, 0, 1, cut), "bottom": (0, cut, 1, 1)}[side]
    c.rect(*sea, (52, 120, 176))
    edge = [(cut, 0), (cut, 1)] if side in ("left", "right") else [(0, cut), (1, cut)]
    c.line(edge, COLORS["white"], 0.02)
    n = c.rng.randint(6)
    color = c.choice(["red", "orange", "blue"])
    sand = {"left": (cut, 0, 1, 1), "right": (0, 0, cut, 1), "top": (0, cut, 1, 1), "bottom": (0, 0, 1, cut)}[side]
    for _ in range(n):
        x = sand[0] + 0.06 + (sand[2] - sand[0] - 0.12) * c.rng.rand()
        y = sand[1] + 0.06 + (sand[3] - sand[1] - 0.12) * c.rng.rand()
        c.ellipse(x, y, 0.025, 0.025, COLORS[color])
    facts = [f"the sea on the {side} side", "white waves along the sand"]
    facts.append(f"{counted(n, color + ' umbrella')} on the sand")
    return "a beach", facts


@scene("pond")
def pond(c: Canvas):
    c.speckle((52, 118, 48), 30, 0.03)
    region = c.choice(list(REGIONS))
    large = c.rng.rand() < 0.5
    col, row = REGIONS[region]
    r = 0.2 if large else 0.1
    cx, cy = 0.18 + col * 0.32, 0.18 + row * 0.32
    c.ellipse(cx, cy, r, r * 0.8, (40, 90, 140))
    return "a green meadow", [f"a {'large' if large else 'small'} pond {where(region)}", "grass around the water"]


@scene("bareland")
def bareland(c: Canvas):
    c.speckle((196, 170, 120), 80, 0.04)
    facts = ["yellow sand and no buildings"]
    if c.rng.rand() < 0.5:
        a, b = c.rng.rand(2)
        c.line([(0, a), (1, b)], (90, 84, 80), 0.02)
        facts.append("a thin road crossing the land")
    return "bare land", facts


# Classes the target lacks: drawn only in the source domain.
@scene("roundabout")
def roundabout(c: Canvas):
    cx, cy = 0.35 + 0.3 * c.rng.rand(), 0.35 + 0.3 * c.rng.rand()
    roads = 2 + c.rng.randint(3)
    angles = c.rng.rand() * 6.3 + np.arange(roads) * 6.283 / roads
    for a in angles:
        c.line([(cx, cy), (cx + 1.2 * np.cos(a), cy + 1.2 * np.sin(a))], (96, 96, 100), 0.05)
    c.ellipse(cx, cy, 0.17, 0.17, (96, 96, 100))
    island = c.choice(["green", "white"])
    c.ellipse(cx, cy, 0.09, 0.09, COLORS[island])
    return "a roundabout", [f"{count_words(roads)} roads meeting at a circle", f"a {island} island in the middle"]


@scene("solarfarm")
def solar_farm(c: Canvas):
    rows = 2 + c.rng.randint(5)
    side = c.choice(["left", "right", "top", "bottom"])
    x0, y0, x1, y1 = {"left": (0.05, 0.05, 0.5, 0.95), "right": (0.5, 0.05, 0.95, 0.95),
                      "top": (0.05, 0.05, 0.95, 0.5), "bottom": (0.05, 0.5, 0.95, 0.95)}[side]
    step = (y1 - y0) / rows
    for r in range(rows):
        c.rect(x0, y0 + r * step + 0.01, x1, y0 + (r + 0.6) * step, (30, 40, 96))
    return "a solar farm", [f"{count_words(rows)} rows of solar panels", f"dark blue panels on the {side} side"]


@scene("greenhouses")
def greenhouses(c: Canvas):
    n = 2 + c.rng.randint(7)
    vertical = c.rng.rand() < 0.5
    for k in range(n):
        a = 0.06 + k * 0.88 / n
        b = a + 0.6 * 0.88 / n
        c.rect(a, 0.1, b, 0.9, COLORS["white"]) if vertical else c.rect(0.1, a, 0.9, b, COLORS["white"])
    return "greenhouses", [f"{counted(n, 'white greenhouse')} in a row",
                           f"long roofs running {'vertically' if vertical else 'horizontally'}"]


GROUNDS = {
    "airport": (150, 144, 126), "harbor": (150, 146, 138), "residential": (96, 136, 72),
    "farmland": (120, 130, 70), "river": (78, 124, 60), "storagetanks": (150, 128, 96),
    "forest": (34, 90, 40), "parking": (92, 92, 96), "playground": (110, 140, 90),
    "beach": (214, 196, 142), "pond": (86, 140, 70), "bareland": (204, 178, 128),
    "roundabout": (118, 132, 92), "solarfarm": (168, 150, 112), "greenhouses": (132, 140, 84),
}
CLASSES = ("airport", "harbor", "residential", "farmland", "river", "storagetanks", "forest", "parking",
           "playground", "beach", "pond", "bareland")  # the target's classes, in draw order


def captions_for(noun: str, facts: list[str], rng: np.random.RandomState) -> list[str]:
    """Five captions built from the noun phrase and facts (lower case, space before ' .')."""
    templates = [
        lambda f: f"this is {noun} with {f} .",
        lambda f: f"{noun} with {f} .",
        lambda f: f"there are {f} in {noun} ." if f.split()[0] in NUMBER_WORDS + ["many"] else f"we can see {f} in {noun} .",
        lambda f: f"{f} can be seen in {noun} .",
    ]
    out = []
    for k in range(5):
        if k == 4 and len(facts) > 1:
            a, b = rng.choice(len(facts), size=2, replace=False)
            out.append(f"{noun} with {facts[a]} and {facts[b]} .")
        else:
            out.append(templates[rng.randint(len(templates))](facts[rng.randint(len(facts))]))
    return out


# The pretraining source (domain "source") differs from the target partially, the way web
# image-text data differs from RS captions: 8 of the target's 12 classes plus 3 it lacks; other
# phrasings (its own templates, and half its captions with synonyms); another look (a per-image
# colour cast, no blur, stronger grain). Counts, colours, positions and relations stay the
# shared language that transfers.
SOURCE_CLASSES = ("airport", "harbor", "residential", "river", "forest", "bareland",
                  "roundabout", "solarfarm", "greenhouses")
SOURCE_SYNONYMS = {
    "airport": "airfield", "planes": "aircraft", "plane": "aircraft", "harbor": "port", "boats": "ships", "boat": "ship",
    "houses": "homes", "buildings": "structures", "road": "street", "parking lot": "car park", "cars": "vehicles",
    "fields": "plots", "trees": "woods", "forest": "woodland", "river": "stream", "bare land": "barren ground",
}
_SYNONYM_PATTERN = re.compile(r"\b(" + "|".join(sorted(SOURCE_SYNONYMS, key=len, reverse=True)) + r")\b")
SYNONYM_RATE = 0.8


def source_captions(noun: str, facts: list[str], rng: np.random.RandomState) -> list[str]:
    """Five source-domain captions: other templates than the target's, half of them with synonyms."""
    templates = [
        lambda f: f"an aerial image of {noun} showing {f} .",
        lambda f: f"overhead view of {noun} : {f} .",
        lambda f: f"in this picture of {noun} , {f} .",
        lambda f: f"{f} , photographed from above in {noun} .",
    ]
    out = []
    for k in range(5):
        if k == 4 and len(facts) > 1:
            a, b = rng.choice(len(facts), size=2, replace=False)
            caption = f"{noun} ; {facts[a]} , {facts[b]} ."
        else:
            caption = templates[rng.randint(len(templates))](facts[rng.randint(len(facts))])
        if rng.rand() < SYNONYM_RATE:
            caption = _SYNONYM_PATTERN.sub(lambda m: SOURCE_SYNONYMS[m.group(1)], caption)
        out.append(caption)
    return out


@dataclass(frozen=True)
class Domain:
    classes: tuple[str, ...]
    captions: Callable[[str, list[str], np.random.RandomState], list[str]]
    blur: float  # Gaussian blur radius in px
    grain: float  # pixel noise std
    colour_cast: float  # per-channel gain drawn from 1 +- this


DOMAINS = {
    "target": Domain(CLASSES, captions_for, blur=0.6, grain=6.0, colour_cast=0.0),
    "source": Domain(SOURCE_CLASSES, source_captions, blur=0.0, grain=10.0, colour_cast=0.35),
}


def draw_image(seed: int, index: int, size: int, dup_fraction: float, domain: str = "target") -> tuple[str, Image.Image, list[str]]:
    """Scene class, image and five captions of image ``index``; fixed by (seed, index, domain)."""
    look = DOMAINS[domain]
    rng = np.random.RandomState([seed, index])
    cls = look.classes[rng.randint(len(look.classes))]
    canvas = Canvas(size, rng, GROUNDS[cls])
    noun, facts = SCENES[cls](canvas)
    captions = look.captions(noun, facts, rng)
    if rng.rand() < dup_fraction:  # RSICD-style padding: 1 or 2 distinct captions repeated to 5
        distinct = captions[: 1 + rng.randint(2)]
        captions = [distinct[k % len(distinct)] for k in range(5)]
    image = canvas.image.filter(ImageFilter.GaussianBlur(look.blur)) if look.blur else canvas.image
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels * (0.85 + 0.3 * rng.rand()) + rng.normal(0, look.grain, pixels.shape)
    if look.colour_cast:
        pixels = pixels * (1 + look.colour_cast * (2 * rng.rand(3) - 1))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return cls, image, captions


def write_dataset(root: Path, options: SyntheticOptions) -> None:
    """Draw the dataset into ``root`` (Karpathy JSON + images/), atomically."""
    tmp = temporary_path(root)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    plan = [("train", options.n_train), ("val", options.n_val), ("test", options.n_test)]
    total = sum(n for _, n in plan)
    entries, index = [], 0
    with bar(total=total, desc=f"drawing synthetic dataset ({options.slug()})", unit="img", leave=False) as progress:
        for split, n in plan:
            for _ in range(n):
                cls, image, captions = draw_image(options.seed, index, options.image_size, options.dup_fraction, options.domain)
                filename = f"{cls}_{index:05d}.png"
                image.save(tmp / "images" / filename)
                sentids = list(range(5 * index, 5 * index + 5))
                entries.append({
                    "filename": filename, "imgid": index, "split": split, "sentids": sentids,
                    "sentences": [{"tokens": [t for t in cap.split() if t.isalnum()], "raw": cap, "imgid": index, "sentid": s}
                                  for cap, s in zip(captions, sentids)],
                })
                index += 1
                progress.update()
    (tmp / JSON_NAME).write_text(json.dumps({"images": entries, "dataset": "synthetic"}))
    (tmp / STAMP_NAME).write_text(json.dumps({"options": asdict(options), "rsnc_bench": __version__}, indent=2))
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)


@DATASETS.register("synthetic")
class Synthetic(DatasetSpec):
    """Built-in synthetic RS-like scenes: 12 scene classes, 5 grounded captions per image.

    Generated on first use under ``$RSNC_BENCH_DATA/synthetic/<options>`` (default
    ./data/...), in the Karpathy JSON layout. Default size 80 / 50 / 150 images
    (train / val / test), 128 px, 30 % of images with duplicated captions. Options:
    seed, n_train, n_val, n_test, image_size, dup_fraction.
    """

    name = "synthetic"
    default_layout = "karpathy"
    layouts = {"karpathy": Layout("karpathy", {"json": (JSON_NAME,)}, ("images",))}
    Options = SyntheticOptions

    def default_root(self) -> Path:
        return data_home() / "synthetic" / self.options.slug()

    def label(self, layout: str | None = None) -> str:
        return f"synthetic-{self.options.slug()}"

    def prepare(self, root: Path) -> None:
        stamp = root / STAMP_NAME
        if stamp.exists():
            made_with = json.loads(stamp.read_text())["options"]
            if made_with != asdict(self.options):
                raise ConfigError(f"{root} holds synthetic data made with {made_with}; choose another --data-root or delete it")
            return
        writable_folder(root, "the synthetic data folder (--data-root or $RSNC_BENCH_DATA)")
        if root.exists() and any(root.iterdir()):
            raise ConfigError(f"{root} exists and is not a synthetic dataset folder; choose an empty or new --data-root")
        write_dataset(root, self.options)
