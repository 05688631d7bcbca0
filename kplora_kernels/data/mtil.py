"""The eleven MTIL datasets in the on-disk layouts of the MTIL literature, with their standard
splits, class names and a prompt template each.

Every loader takes the data root and returns a :class:`Split`; items are image file paths or,
for CIFAR-100 and MNIST, in-memory ``uint8`` arrays. A missing file raises ``FileNotFoundError``
naming the path expected and what was found next to it. Datasets without an official split
(Caltech101, EuroSAT) use a fixed one: per class, in file-name order, every fifth image is test.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np

from .idx import read_idx

ORDER_I = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food", "MNIST", "OxfordPet",
           "StanfordCars", "SUN397"]
ORDER_II = ["StanfordCars", "Food", "MNIST", "OxfordPet", "Flowers", "SUN397", "Aircraft", "Caltech101", "DTD",
            "EuroSAT", "CIFAR100"]

TEMPLATES = {
    "Aircraft": "a photo of a {}, a type of aircraft.", "Caltech101": "a photo of a {}.",
    "CIFAR100": "a photo of a {}.", "DTD": "a photo of a {} texture.", "EuroSAT": "a centered satellite photo of {}.",
    "Flowers": "a photo of a {}, a type of flower.", "Food": "a photo of {}, a type of food.",
    "MNIST": 'a photo of the number: "{}".', "OxfordPet": "a photo of a {}, a type of pet.",
    "StanfordCars": "a photo of a {}.", "SUN397": "a photo of a {}.",
}

EUROSAT_NAMES = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}

FLOWER_NAMES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily",
    "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower",
    "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]


@dataclass
class Split:
    """``train``/``test``: lists of ``(item, label)``; ``item`` is a path or an ``H×W(×3)`` uint8 array."""

    name: str
    classnames: list
    train: list
    test: list

    @property
    def template(self) -> str:
        return TEMPLATES[self.name]


def _need(path: str) -> str:
    if not os.path.exists(path):
        parent = os.path.dirname(path.rstrip("/"))
        while parent and not os.path.isdir(parent):
            parent = os.path.dirname(parent)
        found = sorted(os.listdir(parent))[:10] if parent else []
        raise FileNotFoundError(f"expected {path}; found in {parent or '/'}: {found or 'nothing'}")
    return path


def _lines(path: str) -> list[str]:
    with open(_need(path)) as f:
        return [line.strip() for line in f if line.strip()]


def _class_folders(root: str, classes: list, names: list, every: int = 5):
    """Fixed split of ``root/<class>/*`` folders: every ``every``-th file (sorted) is test."""
    train, test = [], []
    for label, cls in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, cls)) if not f.startswith("."))
        for i, f in enumerate(files):
            (test if i % every == every - 1 else train).append((os.path.join(root, cls, f), label))
    return names, train, test


def aircraft(root):
    base = _need(os.path.join(root, "fgvc-aircraft-2013b", "data"))
    classes = _lines(os.path.join(base, "variants.txt"))
    index = {c: i for i, c in enumerate(classes)}

    def read(split):
        items = []
        for line in _lines(os.path.join(base, f"images_variant_{split}.txt")):
            image_id, variant = line.split(" ", 1)
            items.append((os.path.join(base, "images", f"{image_id}.jpg"), index[variant]))
        return items
    train_split = "trainval" if os.path.exists(os.path.join(base, "images_variant_trainval.txt")) else "train"
    return Split("Aircraft", classes, read(train_split), read("test"))


def caltech101(root):
    base = _need(os.path.join(root, "caltech101", "101_ObjectCategories"))
    classes = sorted(c for c in os.listdir(base) if c != "BACKGROUND_Google" and os.path.isdir(os.path.join(base, c)))
    names, train, test = _class_folders(base, classes, [c.replace("_", " ").lower() for c in classes])
    return Split("Caltech101", names, train, test)


def cifar100(root):
    base = _need(os.path.join(root, "cifar-100-python"))

    def unpickle(name):
        with open(_need(os.path.join(base, name)), "rb") as f:
            return pickle.load(f, encoding="latin1")
    names = [n.replace("_", " ") for n in unpickle("meta")["fine_label_names"]]

    def read(name):
        data = unpickle(name)
        images = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return list(zip(images, data["fine_labels"]))
    return Split("CIFAR100", names, read("train"), read("test"))


def dtd(root):
    base = _need(os.path.join(root, "dtd", "dtd"))
    classes = sorted(d for d in os.listdir(_need(os.path.join(base, "images"))) if not d.startswith("."))
    index = {c: i for i, c in enumerate(classes)}

    def read(*files):
        return [(os.path.join(base, "images", rel), index[rel.split("/")[0]])
                for f in files for rel in _lines(os.path.join(base, "labels", f))]
    return Split("DTD", classes, read("train1.txt", "val1.txt"), read("test1.txt"))


def eurosat(root):
    base = _need(os.path.join(root, "eurosat", "2750"))
    classes = sorted(c for c in os.listdir(base) if os.path.isdir(os.path.join(base, c)))
    names, train, test = _class_folders(base, classes, [EUROSAT_NAMES.get(c, c) for c in classes])
    return Split("EuroSAT", names, train, test)


def flowers(root):
    from scipy.io import loadmat

    base = _need(os.path.join(root, "flowers-102"))
    labels = loadmat(_need(os.path.join(base, "imagelabels.mat")))["labels"].reshape(-1)
    setid = loadmat(_need(os.path.join(base, "setid.mat")))

    def read(*keys):
        ids = np.concatenate([setid[k].reshape(-1) for k in keys])
        return [(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in sorted(ids)]
    return Split("Flowers", list(FLOWER_NAMES), read("trnid", "valid"), read("tstid"))


def food101(root):
    base = _need(os.path.join(root, "food-101"))
    classes = _lines(os.path.join(base, "meta", "classes.txt"))
    index = {c: i for i, c in enumerate(classes)}

    def read(split):
        return [(os.path.join(base, "images", f"{rel}.jpg"), index[rel.split("/")[0]])
                for rel in _lines(os.path.join(base, "meta", f"{split}.txt"))]
    return Split("Food", [c.replace("_", " ") for c in classes], read("train"), read("test"))


def mnist(root):
    base = _need(os.path.join(root, "MNIST", "raw"))

    def read(prefix):
        def find(kind):
            plain = os.path.join(base, f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte")
            return plain if os.path.exists(plain) else _need(plain + ".gz")
        return list(zip(read_idx(find("images")), (int(v) for v in read_idx(find("labels")))))
    return Split("MNIST", [str(d) for d in range(10)], read("train"), read("t10k"))


def oxford_pet(root):
    base = _need(os.path.join(root, "oxford-iiit-pet"))

    def read(split):
        items = []
        for line in _lines(os.path.join(base, "annotations", f"{split}.txt")):
            image, class_id = line.split()[:2]
            items.append((os.path.join(base, "images", f"{image}.jpg"), int(class_id) - 1, image.rsplit("_", 1)[0]))
        return items
    train, test = read("trainval"), read("test")
    names = {label: breed.replace("_", " ").lower() for _, label, breed in train + test}
    return Split("OxfordPet", [names[i] for i in range(max(names) + 1)],
                 [(p, y) for p, y, _ in train], [(p, y) for p, y, _ in test])


def stanford_cars(root):
    from scipy.io import loadmat

    base = _need(os.path.join(root, "stanford_cars"))
    devkit = os.path.join(base, "devkit")
    names = [str(n[0]) for n in loadmat(_need(os.path.join(devkit, "cars_meta.mat")))["class_names"][0]]

    def read(annotations, folder):
        records = loadmat(_need(annotations))["annotations"][0]
        return [(os.path.join(base, folder, str(r["fname"][0])), int(r["class"][0][0]) - 1) for r in records]
    return Split("StanfordCars", names, read(os.path.join(devkit, "cars_train_annos.mat"), "cars_train"),
                 read(os.path.join(base, "cars_test_annos_withlabels.mat"), "cars_test"))


def sun397(root):
    base = _need(os.path.join(root, "SUN397"))
    classes = _lines(os.path.join(base, "ClassName.txt"))  # "/a/abbey", "/a/apartment_building/outdoor"
    index = {c: i for i, c in enumerate(classes)}
    names = [" ".join(c.strip("/").split("/")[1:]).replace("_", " ") for c in classes]

    def read(split_file):
        return [(os.path.join(base, rel.lstrip("/")), index[rel.rsplit("/", 1)[0]])
                for rel in _lines(os.path.join(base, split_file))]
    return Split("SUN397", names, read("Training_01.txt"), read("Testing_01.txt"))


LOADERS = {"Aircraft": aircraft, "Caltech101": caltech101, "CIFAR100": cifar100, "DTD": dtd, "EuroSAT": eurosat,
           "Flowers": flowers, "Food": food101, "MNIST": mnist, "OxfordPet": oxford_pet,
           "StanfordCars": stanford_cars, "SUN397": sun397}


def load(name: str, root: str) -> Split:
    """The dataset ``name`` under ``root``; ``FileNotFoundError`` names the first path missing."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; MTIL datasets: {', '.join(ORDER_I)}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the data root {root} is not a folder")
    return LOADERS[name](root)


class ImageDataset:
    """A torch-style dataset over a split's items with a PIL transform (e.g. open_clip's)."""

    def __init__(self, items: list, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        item, label = self.items[i]
        image = Image.fromarray(item).convert("RGB") if isinstance(item, np.ndarray) else Image.open(item).convert("RGB")
        return self.transform(image), label
