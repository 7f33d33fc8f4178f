"""Write src/patchsae/data/classnames/<name>.txt (one class name per line, in label order) from public wheels.

Class names are facts about the datasets; we copy them from packages that ship them, without depending on those
packages at run time:

  pip download --no-deps -d /tmp/cb clip_benchmark          # clip_benchmark/datasets/en_classnames.json
  pip download --no-deps -d /tmp/cb tensorflow-datasets     # label files of DTD, Food-101, SUN397, UCF101, Cars196
  python scripts/make_classnames.py /tmp/cb/clip_benchmark-*.whl /tmp/cb/tensorflow_datasets-*.whl

Sources per file (versions used: clip_benchmark 1.6.2, tensorflow-datasets 4.9.10):
  imagenet-1k, flowers102, caltech101, eurosat, oxford-pets: clip_benchmark en_classnames.json (the CLIP prompt
      names; ImageNet's two duplicated names are disambiguated below, as CoOp's classnames.txt does)
  dtd: tfds image_classification/dtd_key_attributes.txt
  food101: tfds image_classification/food-101_classes.txt ('_' -> ' ')
  sun397: tfds image_classification/sun397_labels.txt ('/a/apse/indoor' -> 'indoor apse', CoOp's convention)
  ucf101: tfds video/ucf101_labels.txt (CamelCase split into words, CoOp's convention)
  stanford-cars: tfds image_classification/cars196.py (_NAMES)
  fgvc-aircraft: the 100 variants of FGVC-Aircraft 2013b (data/variants.txt; torchvision's FGVCAircraft.classes),
      written out below because no wheel ships them.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "patchsae" / "data" / "classnames"

FGVC_AIRCRAFT_VARIANTS = [
    "707-320", "727-200", "737-200", "737-300", "737-400", "737-500", "737-600", "737-700", "737-800", "737-900",
    "747-100", "747-200", "747-300", "747-400", "757-200", "757-300", "767-200", "767-300", "767-400", "777-200",
    "777-300", "A300B4", "A310", "A318", "A319", "A320", "A321", "A330-200", "A330-300", "A340-200", "A340-300",
    "A340-500", "A340-600", "A380", "ATR-42", "ATR-72", "An-12", "BAE 146-200", "BAE 146-300", "BAE-125",
    "Beechcraft 1900", "Boeing 717", "C-130", "C-47", "CRJ-200", "CRJ-700", "CRJ-900", "Cessna 172", "Cessna 208",
    "Cessna 525", "Cessna 560", "Challenger 600", "DC-10", "DC-3", "DC-6", "DC-8", "DC-9-30", "DH-82", "DHC-1",
    "DHC-6", "DHC-8-100", "DHC-8-300", "DR-400", "Dornier 328", "E-170", "E-190", "E-195", "EMB-120", "ERJ 135",
    "ERJ 145", "Embraer Legacy 600", "Eurofighter Typhoon", "F-16A/B", "F/A-18", "Falcon 2000", "Falcon 900",
    "Fokker 100", "Fokker 50", "Fokker 70", "Global Express", "Gulfstream IV", "Gulfstream V", "Hawk T1", "Il-76",
    "L-1011", "MD-11", "MD-80", "MD-87", "MD-90", "Metroliner", "Model B200", "PA-28", "SR-20", "Saab 2000",
    "Saab 340", "Spitfire", "Tornado", "Tu-134", "Tu-154", "Yak-42",
]

# CLIP's ImageNet names repeat two words; WordNet tells the synsets apart (n04008634 projectile, n04355933 sunglass)
IMAGENET_FIXES = {744: "projectile", 836: "sunglass"}


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _sun397(label: str) -> str:
    """'/a/apse/indoor' -> 'indoor apse': drop the letter folder, put qualifiers first (CoOp)."""
    return " ".join(label.strip("/").split("/")[1:][::-1]).replace("_", " ")


def _camel(label: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply Eye Makeup', 'YoYo' -> 'Yo Yo' (CoOp splits UCF101 names the same way)."""
    return " ".join(re.findall(r"[A-Z][^A-Z]*", label)) or label


def _cars(source: str) -> list[str]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_NAMES":
            return list(ast.literal_eval(node.value))
    raise SystemExit("cars196.py: no _NAMES list")


def build(clip_benchmark_whl: str, tfds_whl: str) -> dict[str, list[str]]:
    with zipfile.ZipFile(clip_benchmark_whl) as z:
        en = json.loads(z.read("clip_benchmark/datasets/en_classnames.json"))
    with zipfile.ZipFile(tfds_whl) as z:
        read = lambda p: z.read("tensorflow_datasets/" + p).decode()  # noqa: E731
        dtd = _lines(read("image_classification/dtd_key_attributes.txt"))
        food = [n.replace("_", " ") for n in _lines(read("image_classification/food-101_classes.txt"))]
        sun = [_sun397(n) for n in _lines(read("image_classification/sun397_labels.txt"))]
        ucf = [_camel(n) for n in _lines(read("video/ucf101_labels.txt"))]
        cars = _cars(read("image_classification/cars196.py"))
    imagenet = list(en["imagenet1k"])
    for i, name in IMAGENET_FIXES.items():
        imagenet[i] = name
    return {"imagenet-1k": imagenet, "flowers102": en["flowers"], "caltech101": en["caltech101"],
            "eurosat": en["eurosat"], "oxford-pets": en["pets"], "dtd": dtd, "food101": food, "sun397": sun,
            "ucf101": ucf, "stanford-cars": cars, "fgvc-aircraft": FGVC_AIRCRAFT_VARIANTS}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(__doc__)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, names in build(*argv).items():
        if len(set(names)) != len(names) or not all(n.strip() for n in names):
            raise SystemExit(f"{name}: empty or duplicate class names")
        (OUT / f"{name}.txt").write_text("\n".join(names) + "\n")
        print(f"{name:<14} {len(names):>5} classes")


if __name__ == "__main__":
    main(sys.argv[1:])
