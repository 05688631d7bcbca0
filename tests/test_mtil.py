"""MTIL: each loader on a miniature copy of its dataset in the real on-disk format, and the whole
command on a three-dataset sequence with a tiny random open_clip model (CPU), including resume."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from helpers import assert_same_checkpoint, crash_during
from kplora_kernels.cli import main
from kplora_kernels.data import mtil

rng = np.random.default_rng(0)


def jpg(path, size=12):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def idx(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fabricate(root):
    """Miniature copies of the eleven datasets: 2–3 classes, a few images each."""
    from scipy.io import savemat

    base = os.path.join(root, "fgvc-aircraft-2013b", "data")
    write(os.path.join(base, "variants.txt"), ["707-320", "Cessna 172", "DHC-1"])
    trainval, test = [], []
    for k, variant in enumerate(["707-320", "Cessna 172", "DHC-1"]):
        for i in range(3):
            image_id = f"{k}{i:06d}"
            jpg(os.path.join(base, "images", f"{image_id}.jpg"))
            (test if i == 2 else trainval).append(f"{image_id} {variant}")
    write(os.path.join(base, "images_variant_trainval.txt"), trainval)
    write(os.path.join(base, "images_variant_test.txt"), test)

    for cls in ("accordion", "airplanes", "BACKGROUND_Google"):
        for i in range(5):
            jpg(os.path.join(root, "caltech101", "101_ObjectCategories", cls, f"image_{i + 1:04d}.jpg"))

    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base)
    for name, n in (("train", 6), ("test", 3)):
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "fine_labels": [i % 3 for i in range(n)]}, f)
    with open(os.path.join(base, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "aquarium_fish", "baby"]}, f)

    base = os.path.join(root, "dtd", "dtd")
    for cls in ("banded", "blotchy"):
        for i in range(3):
            jpg(os.path.join(base, "images", cls, f"{cls}_{i:04d}.jpg"))
    write(os.path.join(base, "labels", "train1.txt"), ["banded/banded_0000.jpg", "blotchy/blotchy_0000.jpg"])
    write(os.path.join(base, "labels", "val1.txt"), ["banded/banded_0001.jpg", "blotchy/blotchy_0001.jpg"])
    write(os.path.join(base, "labels", "test1.txt"), ["banded/banded_0002.jpg", "blotchy/blotchy_0002.jpg"])

    for cls in ("AnnualCrop", "Forest", "SeaLake"):
        for i in range(5):
            jpg(os.path.join(root, "eurosat", "2750", cls, f"{cls}_{i + 1}.jpg"))

    base = os.path.join(root, "flowers-102")
    for i in range(1, 7):
        jpg(os.path.join(base, "jpg", f"image_{i:05d}.jpg"))
    savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([[1, 1, 2, 2, 3, 3]])})
    savemat(os.path.join(base, "setid.mat"), {"trnid": np.array([[1, 3]]), "valid": np.array([[5]]),
                                              "tstid": np.array([[2, 4, 6]])})

    base = os.path.join(root, "food-101")
    write(os.path.join(base, "meta", "classes.txt"), ["apple_pie", "baby_back_ribs"])
    for cls in ("apple_pie", "baby_back_ribs"):
        for i in range(3):
            jpg(os.path.join(base, "images", cls, f"{100 + i}.jpg"))
    write(os.path.join(base, "meta", "train.txt"), ["apple_pie/100", "apple_pie/101", "baby_back_ribs/100", "baby_back_ribs/101"])
    write(os.path.join(base, "meta", "test.txt"), ["apple_pie/102", "baby_back_ribs/102"])

    base = os.path.join(root, "MNIST", "raw")
    idx(os.path.join(base, "train-images-idx3-ubyte"), rng.integers(0, 255, (8, 28, 28)))
    idx(os.path.join(base, "train-labels-idx1-ubyte"), np.array([0, 1, 2, 3, 0, 1, 2, 3]))
    idx(os.path.join(base, "t10k-images-idx3-ubyte"), rng.integers(0, 255, (4, 28, 28)))
    idx(os.path.join(base, "t10k-labels-idx1-ubyte"), np.array([3, 2, 1, 0]))

    base = os.path.join(root, "oxford-iiit-pet")
    for image in ("Abyssinian_1", "Abyssinian_2", "american_bulldog_1", "american_bulldog_2"):
        jpg(os.path.join(base, "images", f"{image}.jpg"))
    write(os.path.join(base, "annotations", "trainval.txt"), ["Abyssinian_1 1 1 1", "american_bulldog_1 2 2 1"])
    write(os.path.join(base, "annotations", "test.txt"), ["Abyssinian_2 1 1 1", "american_bulldog_2 2 2 1"])

    base = os.path.join(root, "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"))
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "AM General Hummer SUV 2000", "Acura RL Sedan 2012"
    savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": names})
    for split, folder, labels in (("devkit/cars_train_annos.mat", "cars_train", [1, 2, 2]),
                                  ("cars_test_annos_withlabels.mat", "cars_test", [2, 1])):
        records = np.zeros((1, len(labels)), dtype=[("fname", "O"), ("class", "O")])
        for i, label in enumerate(labels):
            records[0, i] = (f"{i + 1:05d}.jpg", np.array([[label]], dtype=np.uint8))
            jpg(os.path.join(base, folder, f"{i + 1:05d}.jpg"))
        savemat(os.path.join(base, split), {"annotations": records})

    base = os.path.join(root, "SUN397")
    write(os.path.join(base, "ClassName.txt"), ["/a/abbey", "/a/apartment_building/outdoor", "/b/bus_interior"])
    train, test = [], []
    for cls in ("/a/abbey", "/a/apartment_building/outdoor", "/b/bus_interior"):
        for i in range(2):
            rel = f"{cls}/sun_{i}.jpg"
            jpg(os.path.join(base, rel.lstrip("/")))
            (test if i else train).append(rel)
    write(os.path.join(base, "Training_01.txt"), train)
    write(os.path.join(base, "Testing_01.txt"), test)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mtil"))
    fabricate(root)
    return root


EXPECTED = {  # name: (class names, train size, test size)
    "Aircraft": (["707-320", "Cessna 172", "DHC-1"], 6, 3),
    "Caltech101": (["accordion", "airplanes"], 8, 2),
    "CIFAR100": (["apple", "aquarium fish", "baby"], 6, 3),
    "DTD": (["banded", "blotchy"], 4, 2),
    "EuroSAT": (["annual crop land", "forest", "lake or sea"], 12, 3),
    "Flowers": (mtil.FLOWER_NAMES, 3, 3),
    "Food": (["apple pie", "baby back ribs"], 4, 2),
    "MNIST": ([str(d) for d in range(10)], 8, 4),
    "OxfordPet": (["abyssinian", "american bulldog"], 2, 2),
    "StanfordCars": (["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], 3, 2),
    "SUN397": (["abbey", "apartment building outdoor", "bus interior"], 3, 3),
}


@pytest.mark.parametrize("name", mtil.ORDER_I)
def test_loader_classes_splits_and_labels(data_root, name):
    split = mtil.load(name, data_root)
    names, n_train, n_test = EXPECTED[name]
    assert split.classnames == names
    assert (len(split.train), len(split.test)) == (n_train, n_test)
    for item, label in split.train + split.test:
        assert 0 <= label < len(names)
        assert isinstance(item, np.ndarray) or os.path.isfile(item)
    assert "{}" in split.template
    assert len(mtil.FLOWER_NAMES) == 102 and len(set(mtil.ORDER_I)) == len(mtil.ORDER_II) == 11


def test_loader_labels_follow_the_files(data_root):
    assert ("fgvc-aircraft-2013b/data/images/1000002.jpg" in mtil.load("Aircraft", data_root).test[1][0])
    assert mtil.load("Aircraft", data_root).test[1][1] == 1
    flowers = mtil.load("Flowers", data_root)
    assert [y for _, y in flowers.test] == [0, 1, 2]  # images 2, 4, 6 carry labels 1, 2, 3
    cars = mtil.load("StanfordCars", data_root)
    assert [y for _, y in cars.train] == [0, 1, 1] and cars.test[0][0].endswith("cars_test/00001.jpg")
    sun = mtil.load("SUN397", data_root)
    assert sun.train[1] == (os.path.join(data_root, "SUN397", "a/apartment_building/outdoor/sun_0.jpg"), 1)
    assert [y for _, y in mtil.load("MNIST", data_root).test] == [3, 2, 1, 0]


def test_missing_dataset_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="food-101"):
        mtil.load("Food", str(tmp_path))
    (tmp_path / "food-101").mkdir()
    with pytest.raises(FileNotFoundError, match=r"classes.txt.*found in .*food-101"):
        mtil.load("Food", str(tmp_path))


TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
SMALL = {"iterations": 3, "batch_size": 4, "workers": 0, "gradient_batches": 1, "subspace_batches": 1,
         "eval_batch_size": 8, "rank": 2, "eps_w_visual": 0.5}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("model")
    config = folder / "tiny-mtil-clip.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(str(config))
    torch.manual_seed(0)
    weights = folder / "weights.pt"
    torch.save(open_clip.create_model("tiny-mtil-clip").state_dict(), weights)
    return str(config), str(weights)


def mtil_args(data_root, tiny_model, out, config_path, *extra):
    config, weights = tiny_model
    return ["mtil", "--data-root", data_root, "--model", "tiny-mtil-clip", "--model-config", config,
            "--pretrained", weights, "--datasets", "MNIST,DTD,EuroSAT", "--config", config_path,
            "--output", str(out), "--device", "cpu", *extra]


def test_mtil_command_runs_and_resumes(data_root, tiny_model, tmp_path, monkeypatch, capsys):
    from kplora_kernels.commands import mtil as command

    config_path = tmp_path / "small.json"
    config_path.write_text(json.dumps(SMALL))
    full = tmp_path / "full"
    assert main(mtil_args(data_root, tiny_model, full, str(config_path))) == 0
    results = json.loads((full / "results.json").read_text())
    assert results["tasks"] == ["DTD", "EuroSAT", "MNIST"]  # Order I keeps its sequence
    assert len(results["accuracy"]) == 3 and all(len(r) == 3 for r in results["accuracy"])
    assert set(results["per_task"]) == {"DTD", "EuroSAT", "MNIST"}
    assert all(v > 0 for v in results["images_per_second"])
    assert (full / "heatmap.png").read_bytes()[:4] == b"\x89PNG"

    # a crash during the second task's evaluation, then a rerun that resumes after the first task
    crashed = tmp_path / "crashed"
    args = mtil_args(data_root, tiny_model, crashed, str(config_path))
    crash_during(monkeypatch, command.Benchmark, "evaluate", 3, lambda: main(args))  # 3 = one task's
    capsys.readouterr()
    assert main(args) == 0
    assert "resuming after task 1 (DTD)" in capsys.readouterr().out
    resumed = json.loads((crashed / "results.json").read_text())
    assert resumed["accuracy"] == results["accuracy"]
    assert_same_checkpoint(full / "controller.safetensors", crashed / "controller.safetensors")

    # what cannot change the results may change: the weights' path written relatively, the
    # evaluation batch size; a finished run says so instead of training again
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({**SMALL, "eval_batch_size": 3}))
    args = mtil_args(data_root, tiny_model, full, str(changed))
    args[args.index("--pretrained") + 1] = os.path.relpath(tiny_model[1])
    export = tmp_path / "merged.safetensors"
    assert main(args + ["--export", str(export)]) == 0
    assert "already complete: " in capsys.readouterr().out
    assert json.loads((full / "results.json").read_text())["accuracy"] == results["accuracy"]
    assert_export_loads_into_stock_open_clip(export, full / "controller.safetensors", tiny_model)
    assert main(args + ["--export", str(tmp_path / "nowhere" / "m.pt")]) == 2
    assert "--export" in capsys.readouterr().err
    # what changes the results is refused, naming each difference
    changed.write_text(json.dumps({**SMALL, "lr": 0.5, "amp": False}))
    assert main(mtil_args(data_root, tiny_model, full, str(changed))) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings: config.amp (true there, false now); config.lr (0.001 there, 0.5 now)" in err


def assert_export_loads_into_stock_open_clip(export, checkpoint, tiny_model):
    """``--export`` wrote a state dict that a stock open_clip model loads strictly, with the wrapped
    model's embeddings."""
    import open_clip
    from safetensors.torch import load_file

    from kplora_kernels.continual import KeepLoRA

    stock = open_clip.create_model("tiny-mtil-clip").eval()
    stock.load_state_dict(load_file(str(export)), strict=True)
    wrapped = open_clip.create_model("tiny-mtil-clip", pretrained=tiny_model[1]).eval()
    KeepLoRA.from_checkpoint(wrapped, str(checkpoint), progress=False)
    gen = torch.Generator().manual_seed(0)
    images, texts = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(1, 400, (2, 16), generator=gen)
    with torch.no_grad():
        # merged weights against the wrapped layers (B = 0 after the last task): equal to fp32 rounding
        torch.testing.assert_close(stock.encode_image(images), wrapped.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stock.encode_text(texts), wrapped.encode_text(texts), atol=1e-5, rtol=1e-5)


def test_mtil_log_dir_writes_tensorboard_scalars(data_root, tiny_model, tmp_path):
    pytest.importorskip("tensorboard", reason="--log-dir needs tensorboard (requirements-dev.txt installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config_path = tmp_path / "one.json"
    config_path.write_text(json.dumps({**SMALL, "gradient_accumulation": 2}))
    args = mtil_args(data_root, tiny_model, tmp_path / "o", str(config_path), "--log-dir", str(tmp_path / "tb"),
                     "--bases-cache", str(tmp_path / "bases"))
    args[args.index("--datasets") + 1] = "MNIST,DTD"
    assert main(args) == 0
    # the principal subspaces were cached: q, k, v, out of 2 blocks in each of the 2 towers
    assert len(list((tmp_path / "bases").glob("*.safetensors"))) == 4 * 2 * 2
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "accuracy/DTD", "accuracy/MNIST", "metrics/last"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(2 * SMALL["iterations"]))
    assert [e.step for e in events.Scalars("accuracy/MNIST")] == [0, 1]


def test_training_settings_are_checked_before_anything_loads(data_root, tiny_model, tmp_path, capsys, monkeypatch):
    from kplora_kernels.commands import mtil as command

    def must_not_load(*args, **kwargs):
        raise AssertionError("data or model loaded before the settings were checked")
    monkeypatch.setattr(command.datasets, "load", must_not_load)
    for bad, fragment in (({"iterations": -5}, "iterations must be an integer ≥ 1, got -5"),
                          ({"batch_size": "64"}, "batch_size must be an integer ≥ 1, got '64'"),
                          ({"workers": -1}, "workers must be an integer ≥ 0, got -1"),
                          ({"lr_schedule": "linear"}, "lr_schedule must be one of 'constant', 'cosine', 'onecycle'"),
                          ({"warmup_fraction": 1.0}, "warmup_fraction must be a number ≥ 0 and < 1, got 1.0"),
                          ({"amp": 1}, "amp must be true or false, got 1"),
                          ({"gradient_accumulation": 0}, "gradient_accumulation must be an integer ≥ 1, got 0"),
                          ({"method": "ewc"}, "method must be one of"),
                          ({"max_eval_samples": -1}, "max_eval_samples must be an integer ≥ 1 or null")):
        config_path = tmp_path / "bad.json"
        config_path.write_text(json.dumps({**SMALL, **bad}))
        assert main(mtil_args(data_root, tiny_model, tmp_path / "o", str(config_path), "--dry-run")) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    config_path.write_text(json.dumps(SMALL))
    import importlib.util

    real_find_spec = importlib.util.find_spec
    for missing, fragment in (("tensorboard", "--log-dir needs the tensorboard package"),
                              ("matplotlib", "kplora mtil needs matplotlib")):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, m=missing: None if name == m else real_find_spec(name, *a))
        args = mtil_args(data_root, tiny_model, tmp_path / "o", str(config_path), "--log-dir", str(tmp_path / "tb"))
        assert main(args) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)


def test_mtil_dry_run_and_user_errors(data_root, tiny_model, tmp_path, capsys):
    config_path = tmp_path / "small.json"
    config_path.write_text(json.dumps(SMALL))
    assert main(mtil_args(data_root, tiny_model, tmp_path / "o", str(config_path), "--dry-run")) == 0
    assert "dry run" in capsys.readouterr().out and not (tmp_path / "o").exists()
    args = mtil_args(str(tmp_path / "nowhere"), tiny_model, tmp_path / "o", str(config_path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "nowhere is not a folder" in err and "found in" not in err
    (tmp_path / "empty").mkdir()
    args = mtil_args(str(tmp_path / "empty"), tiny_model, tmp_path / "o", str(config_path))
    assert main(args) == 2
    err = capsys.readouterr().err  # every missing dataset, each with the path expected
    assert "3 of 3 datasets missing" in err and len(err.strip().splitlines()) == 1
    for fragment in ("DTD: expected", "dtd/dtd", "EuroSAT: expected", "eurosat/2750", "MNIST: expected", "MNIST/raw"):
        assert fragment in err
    args = mtil_args(data_root, tiny_model, tmp_path / "o", str(config_path))
    args[args.index("--pretrained") + 1] = str(tmp_path / "missing.pt")
    assert main(args) == 2
    assert "weights not found" in capsys.readouterr().err
    args = mtil_args(data_root, tiny_model, tmp_path / "o", str(config_path))
    args[args.index("--datasets") + 1] = "MNIST,ImageNet"
    assert main(args) == 2
    assert "unknown datasets" in capsys.readouterr().err


def test_idx_reader_plain_gzip_and_bad_files(tmp_path):
    """One IDX reader serves MNIST (plain or .gz) and the demo's Fashion-MNIST; a damaged file is named."""
    import gzip

    from kplora_kernels.data.idx import read_idx

    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    idx(str(tmp_path / "plain" / "images-idx3-ubyte"), images)
    raw = (tmp_path / "plain" / "images-idx3-ubyte").read_bytes()
    (tmp_path / "images.gz").write_bytes(gzip.compress(raw))
    for path in (tmp_path / "plain" / "images-idx3-ubyte", tmp_path / "images.gz"):
        got = read_idx(str(path))
        assert got.dtype == np.uint8 and np.array_equal(got, images)
    wide = np.array([-5, 70000], dtype=">i4")  # type code 0x0C: big-endian int32
    (tmp_path / "wide").write_bytes(bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + wide.tobytes())
    assert read_idx(str(tmp_path / "wide")).tolist() == [-5, 70000]
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"short: the IDX header announces shape \(2, 3, 4\)"):
        read_idx(str(tmp_path / "short"))
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="png is not an IDX file"):
        read_idx(str(tmp_path / "png"))
    with pytest.raises(FileNotFoundError):
        read_idx(str(tmp_path / "absent"))
    (tmp_path / "foreign.gz").write_bytes(raw)  # not compressed
    with pytest.raises(ValueError, match="foreign.gz is not a readable gzip file"):
        read_idx(str(tmp_path / "foreign.gz"))
    (tmp_path / "cut.gz").write_bytes(gzip.compress(raw)[:-6])
    with pytest.raises(ValueError, match="cut.gz is not a readable gzip file"):
        read_idx(str(tmp_path / "cut.gz"))
