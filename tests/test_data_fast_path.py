"""The fast training path (trainer/data/fast_transform.py, trainer/data/device_augment.py) against
the reference transform (timm's create_transform, build_train_transform) on real JPEGs."""

import io
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_auto_augment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import functional as F

import trainer.data as data_module
import trainer.data.device_augment as device_augment
from tests.test_data import batches, make_recipe
from tools.benchmark_data import build_image_folder, make_jpeg
from trainer.data import build_data, sample_seed, seed_rngs
from trainer.data.device_augment import (
    _OP_ARGS,
    _pil_rotation_matrix,
    _RecordedImage,
    apply_device_augment,
    recording_rand_augment,
)
from trainer.data.fast_transform import (
    FastPathOptions,
    FastTrainTransform,
    build_fast_train_transform,
    crop_box,
    draft_scale,
)
from trainer.data.sources import EncodedImage, decode_to_tensor, load_split
from trainer.data.transforms import _allow_zero_bit_posterize, build_train_transform

pytestmark = pytest.mark.usefixtures("single_thread")

VIT_B_AUGMENT = {"auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "remode": "pixel", "hflip": 0.5,
                 "train_interpolation": "random", "mean": [0.5] * 3, "std": [0.5] * 3, "repeated_aug": 1}


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """ImageNet-like JPEGs (tools/benchmark_data.py's set, 60 of them: some large enough for draft decoding)."""
    return build_image_folder(tmp_path_factory.mktemp("jpegs"), images=60, classes=3, eval_images=3, seed=1)


def jpeg_recipe(root, img_size=224, num_workers=0, **augment):
    return make_recipe(model={"img_size": img_size, "num_classes": 3},
                       data={"source": "imagefolder", "root": str(root), "num_workers": num_workers},
                       augment={**VIT_B_AUGMENT, **augment}, train={"batch_size": 6})


def outputs(recipe, options, epochs=(0, 1)):
    """(reference float images, fast-path float images) for every training JPEG, same per-sample seeds;
    the fast path's samples collated and finished (TrainBatch.to) as batches."""
    reference, fast = build_train_transform(recipe), build_fast_train_transform(recipe, options)
    raw = load_split(recipe, "train").dataset
    ref_out, samples = [], []
    for epoch in epochs:
        for i in range(len(raw)):
            seed = sample_seed(0, epoch, i)
            seed_rngs(seed)
            ref_out.append(reference(raw[i][0]))
            seed_rngs(seed)
            samples.append((fast(raw.encoded(i)[0]), 0))
    fast_out = [fast.collate(samples[i:i + 32])[0].to("cpu") for i in range(0, len(samples), 32)]
    return torch.stack(ref_out), torch.cat(fast_out)


def levels(x):  # normalised with mean = std = 0.5 -> grey levels 0..255
    return (x * 0.5 + 0.5) * 255


# --- crop boxes, draft scale, decoding -------------------------------------------------------------

def test_crop_boxes_are_exactly_the_reference_random_resized_crop_draws():
    """timm's RandomResizedCropAndInterpolation (torchvision's box algorithm with Python's random) is what
    build_train_transform samples; crop_box draws the same boxes from the same seed, fallbacks included."""
    rng = np.random.default_rng(0)
    for k in range(2000):
        width, height = (int(v) for v in rng.integers(1, 1500, 2))
        if k % 10 == 0:  # extreme aspect ratios take the centre-crop fallback
            width, height = width * 20, max(1, height // 20)
        for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.9, 1.1))]:
            random.seed(k)
            expected = RandomResizedCropAndInterpolation.get_params(Image.new("L", (width, height)), scale, ratio)
            random.seed(k)
            assert crop_box(width, height, scale, ratio) == tuple(expected)


def test_draft_scale_never_decodes_smaller_than_the_output_needs():
    for h in range(1, 2000, 7):
        for w in range(1, 2000, 11):
            s = draft_scale(h, w, 224, 224)
            assert s in (1, 2, 4, 8)
            assert s == 1 or (h / s >= 224 and w / s >= 224)
            assert s == 8 or not (h / (2 * s) >= 224 and w / (2 * s) >= 224)  # the largest allowed


def test_tensor_decode_is_pillows_decode_pixel_for_pixel(jpegs, tmp_path):
    files = sorted((jpegs / "train").rglob("*.JPEG"))
    grey = tmp_path / "grey.jpg"
    Image.open(files[0]).convert("L").save(grey, quality=90)
    png = tmp_path / "image.png"
    Image.open(files[1]).save(png)
    for path in [*files[:20], grey, png]:
        encoded = EncodedImage(str(path), "RGB", str(path))
        tensor, scale, _ = decode_to_tensor(encoded)
        assert scale == 1 and tensor.dtype == torch.uint8
        assert torch.equal(tensor, F.pil_to_tensor(encoded.decode())), path


def test_draft_decode_reduces_in_the_dct_domain_and_says_by_how_much(jpegs):
    big = max((jpegs / "train").rglob("*.JPEG"), key=lambda p: Image.open(p).size[0] * Image.open(p).size[1])
    encoded = EncodedImage(big.read_bytes(), "RGB", str(big))
    width, height = Image.open(big).size
    image, scale, extra = decode_to_tensor(encoded, lambda w, h: (2, "box"))
    assert scale == 2 and extra == "box" and image.size == ((width + 1) // 2, (height + 1) // 2)


# --- the fast path against the reference ------------------------------------------------------------

def test_normalisation_and_erasing_on_the_device_equal_the_cpu_path_exactly(jpegs):
    """Without RandAugment and with Pillow's resize, the fast path gives the reference's floats bit for bit:
    the erasing boxes and noise are drawn in the worker exactly as timm's RandomErasing draws them."""
    for mode in ("pixel", "rand", "const"):
        recipe = jpeg_recipe(jpegs, img_size=64, auto_augment=None, color_jitter=0.0, reprob=0.7, remode=mode,
                             recount=2)
        ref, fast = outputs(recipe, FastPathOptions(draft=False, tensor_resize=False), epochs=(0,))
        assert torch.equal(ref, fast), mode


def test_device_rand_augment_equals_timms_per_image_ops_on_the_pipeline(jpegs):
    """RandAugment m9 on the device, everything else as the reference: bit-identical but for rare
    1-level rounding differences of the geometric ops."""
    ref, fast = outputs(jpeg_recipe(jpegs), FastPathOptions(draft=False, tensor_resize=False))
    diff = (levels(ref) - levels(fast)).abs()
    identical = sum(torch.equal(a, b) for a, b in zip(ref, fast, strict=True))
    assert identical >= 0.9 * len(ref)
    assert diff.mean() < 0.01
    assert (diff > 0.5).float().mean() < 1e-3  # pixels off by a grey level or more


def test_fast_path_stays_within_tolerance_of_the_full_decode_path(jpegs):
    """Every lever together (tensor decode, draft decode, torch's antialiased resize, device RandAugment
    and erasing) against the reference on real JPEGs: mean |difference| < 0.25 grey levels, per-channel
    mean and std within 0.25 levels."""
    ref, fast = outputs(jpeg_recipe(jpegs), FastPathOptions(), epochs=(0, 1, 2))
    ref, fast = levels(ref), levels(fast)
    assert (ref - fast).abs().mean() < 0.25
    assert (ref.mean((0, 2, 3)) - fast.mean((0, 2, 3))).abs().max() < 0.25
    assert (ref.std((0, 2, 3)) - fast.std((0, 2, 3))).abs().max() < 0.25


def test_draft_decoded_crops_match_full_decodes_in_distribution(jpegs):
    recipe = jpeg_recipe(jpegs, auto_augment=None, reprob=0.0, hflip=0.0)
    full, drafted = outputs(recipe, FastPathOptions(draft=False), epochs=range(6))
    changed = [i for i in range(len(full)) if not torch.equal(full[i], drafted[i])]
    assert len(changed) >= 5  # the set has large images whose crops allow a reduced decode
    a, b = levels(full[changed]), levels(drafted[changed])
    assert (a - b).abs().mean((1, 2, 3)).max() < 3.0
    assert (a.mean((0, 2, 3)) - b.mean((0, 2, 3))).abs().max() < 0.5
    assert (a.std((0, 2, 3)) - b.std((0, 2, 3))).abs().max() < 0.5


# --- device RandAugment, op by op --------------------------------------------------------------------

def photographs():
    rng = np.random.default_rng(0)
    images = [Image.open(io.BytesIO(make_jpeg(rng, *_photos()))).convert("RGB").resize((96, 80)) for _ in range(5)]
    return [*images, Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)),
            Image.fromarray(np.full((80, 96, 3), 77, dtype=np.uint8))]


def _photos():
    from tools.benchmark_data import _photographs
    return _photographs()


@pytest.mark.parametrize("interpolation", ["random", "bilinear", "bicubic"])
def test_each_device_op_matches_timms_pillow_op(interpolation):
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    if interpolation != "random":
        hparams["interpolation"] = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[
            interpolation]
    augment = timm_auto_augment.rand_augment_transform("rand-m9-mstd0.5-inc1", hparams)
    _allow_zero_bit_posterize(type("Steps", (), {"transforms": [augment]})())
    recording = recording_rand_augment(augment)
    images = photographs()
    for op, recorder in zip(augment.ops, recording.ops, strict=True):
        op.prob = recorder.prob = 1.0
        off, total = 0, 0
        for k in range(28):
            image = images[k % len(images)]
            random.seed(k)
            expected = F.pil_to_tensor(op(image)).int()
            random.seed(k)
            ops = recorder(_RecordedImage(image.size)).ops
            codes = torch.zeros(1, 1, dtype=torch.int64)
            args = torch.zeros(1, 1, _OP_ARGS, dtype=torch.float64)
            if ops:
                codes[0, 0] = ops[0][0]
                args[0, 0, :len(ops[0][1])] = torch.tensor(ops[0][1], dtype=torch.float64)
            got = apply_device_augment(F.pil_to_tensor(image)[None], codes, args)[0].int()
            assert (expected - got).abs().max() <= 1, op.name
            off += int((expected != got).sum())
            total += expected.numel()
        assert off / total < 2e-3, op.name  # geometric ops: float rounding at truncation boundaries


def test_posterize_to_zero_bits_and_quarter_turns():
    image = photographs()[0].resize((64, 64))
    x = F.pil_to_tensor(image)[None]
    codes = torch.tensor([[device_augment._POSTERIZE]])
    args = torch.zeros(1, 1, _OP_ARGS, dtype=torch.float64)
    assert apply_device_augment(x, codes, args).max() == 0  # depthlab's 0-bit posterize: black
    for degrees in (90, 180, 270, -90):
        quarter = _pil_rotation_matrix(degrees, image.size)
        assert isinstance(quarter, int)
        args[0, 0, 0] = quarter
        got = apply_device_augment(x, torch.tensor([[device_augment._ROT90]]), args)[0]
        assert torch.equal(got, F.pil_to_tensor(image.rotate(degrees))), degrees


def test_unsupported_transforms_fall_back_to_the_reference():
    aa = make_recipe(augment={"auto_augment": "v0"})  # AutoAugment: Pillow ops in the worker
    fast = build_fast_train_transform(aa)
    assert fast is not None and fast.recording is None and fast.secondary is not None
    nearest = build_fast_train_transform(make_recipe(augment={"auto_augment": "rand-m9", "train_interpolation": "nearest"}))
    assert nearest.recording is None  # Pillow's nearest transform is fixed-point code: stays on the CPU
    grey = build_fast_train_transform(make_recipe(model={"in_chans": 1}, augment={
        "auto_augment": "rand-m9", "mean": [0.5], "std": [0.5]}))
    assert grey.recording is None
    assert FastTrainTransform.of(object(), FastPathOptions(), 3) is None
    pickle.loads(pickle.dumps(build_fast_train_transform(jpeg_recipe("/nowhere"))))  # spawned workers get it


# --- the loaders: order, workers, resume ---------------------------------------------------------------

def test_label_and_epoch_order_are_those_of_the_reference_path(jpegs, monkeypatch):
    recipe = jpeg_recipe(jpegs)
    fast = build_data(recipe)
    monkeypatch.setattr(data_module, "build_fast_train_transform", lambda recipe: None)
    slow = build_data(recipe)
    for epoch in (0, 1):
        fast.train_sampler.set_epoch(epoch)
        slow.train_sampler.set_epoch(epoch)
        got, expected = batches(fast.train_loader), batches(slow.train_loader)
        assert len(got) == len(expected) == fast.steps_per_epoch
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(y, ey) and x.shape == ex.shape and x.dtype == ex.dtype == torch.float32
            assert (levels(x) - levels(ex)).abs().mean() < 0.5


def test_fast_path_is_independent_of_workers_and_resume_point(jpegs):
    recipe = jpeg_recipe(jpegs, img_size=32)
    bundle = build_data(recipe)
    bundle.train_sampler.set_epoch(2)
    full = batches(bundle.train_loader)
    bundle.train_sampler.set_epoch(2, skip_batches=3)
    for (x, y), (rx, ry) in zip(full[3:], batches(bundle.train_loader), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    workers = build_data(jpeg_recipe(jpegs, img_size=32, num_workers=2))
    workers.train_sampler.set_epoch(2)
    for (x, y), (wx, wy) in zip(full, batches(workers.train_loader), strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)


def test_train_batch_pins_and_moves_like_a_tensor(jpegs):
    bundle = build_data(jpeg_recipe(jpegs, img_size=32))
    batch, targets = next(iter(bundle.train_loader))
    assert batch.images.dtype == torch.uint8 and batch.shape == (6, 3, 32, 32) and len(batch) == 6
    if torch.cuda.is_available():
        pinned = batch.pin_memory()
        assert pinned.images.is_pinned()
        assert torch.allclose(pinned.to("cuda", non_blocking=True).cpu(), batch.to("cpu"))
