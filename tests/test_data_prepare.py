"""tools/prepare_dataset.py: a resized, sharded copy of an ImageFolder that data.source=hf reads."""

import io

import pytest
import torch
from PIL import Image

from tests.test_data import batches, make_recipe
from tools.benchmark_data import build_image_folder
from tools.prepare_dataset import main as prepare_main
from trainer.data import build_data
from trainer.data.sources import load_split

pytestmark = pytest.mark.usefixtures("single_thread")


def test_prepared_copy_keeps_classes_labels_and_order_and_shrinks_only_large_images(tmp_path, capsys):
    root = build_image_folder(tmp_path / "folder", images=12, classes=3, eval_images=3, seed=2)
    out = tmp_path / "prepared"
    prepare_main([str(root), str(out), "--max-short-side", "200", "--shard-size-mb", "1"])
    assert "train: 12 images" in capsys.readouterr().out
    folder = make_recipe(model={"num_classes": 3, "img_size": 32}, data={"source": "imagefolder", "root": str(root)})
    hf = make_recipe(model={"num_classes": 3, "img_size": 32}, data={"source": "hf", "root": str(out)})
    a, b = load_split(folder, "train"), load_split(hf, "train")
    assert a.class_names == b.class_names and len(a.dataset) == len(b.dataset) == 12
    for i in range(12):
        (original, label), (copy, copy_label) = a.dataset.encoded(i), b.dataset.encoded(i)
        assert label == copy_label
        size, new = Image.open(original.source).size, Image.open(io.BytesIO(copy.source)).size
        if min(size) <= 200:
            assert copy.source == open(original.source, "rb").read()  # untouched
        else:
            assert min(new) == 200 and abs(new[0] / new[1] - size[0] / size[1]) < 0.02
    bundle = build_data(make_recipe(model={"num_classes": 3, "img_size": 32}, train={"batch_size": 4},
                                    data={"source": "hf", "root": str(out)}))
    images, targets = batches(bundle.train_loader, 1)[0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.max() < 3
