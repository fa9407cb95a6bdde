"""Neural-collapse geometry against textbook formulas on the full feature matrix (numpy, pinv).

The 2-process all-reduce check of this metric runs in tests/test_isi.py (one spawn for all part-B metrics).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics.capture import NORM, capture
from diagnostics.neural_collapse import NeuralCollapse, collapse_geometry, nearest_mean_mismatch
from diagnostics.streaming import run_probe
from tests import conftest

pytestmark = pytest.mark.usefixtures("single_thread")


tiny_vit = partial(conftest.tiny_vit, num_classes=6)


# ---- textbook formulas on the full matrix ------------------------------------------------------------

def textbook_geometry(features: np.ndarray, labels: np.ndarray, head: np.ndarray | None) -> dict:
    classes = np.unique(labels)
    count = len(classes)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    global_mean = means.mean(0)
    m = (means - global_mean).T  # D × C
    within = sum(np.outer(x - means[np.searchsorted(classes, y)], x - means[np.searchsorted(classes, y)])
                 for x, y in zip(features, labels)) / len(features)
    between = m @ m.T / count
    eps = np.finfo(np.float64).eps
    pinv = np.linalg.pinv(between, rtol=max(between.shape) * eps, hermitian=True)
    result = {"nc1": np.trace(within @ pinv) / count}
    gram = m.T @ m
    etf = (np.eye(count) - np.ones((count, count)) / count) / math.sqrt(count - 1)
    result["nc2_etf_gap"] = np.linalg.norm(gram / np.linalg.norm(gram) - etf)
    lengths = np.linalg.norm(m, axis=0)
    result["nc2_equinorm_cv"] = lengths.std() / lengths.mean()
    if head is not None:
        w = head[classes]
        result["nc3_self_duality"] = np.linalg.norm(w / np.linalg.norm(w) - m.T / np.linalg.norm(m))
    return result


def textbook_nc4(features, logits, labels):
    classes = np.unique(labels)
    means = np.stack([features[labels == c].mean(0) for c in classes])
    mismatches, margins = 0, []
    for x, z, y in zip(features, logits, labels):
        nearest = classes[np.argmin([np.linalg.norm(x - mu) for mu in means])]
        mismatches += int(nearest != classes[np.argmax(z[classes])])
        margins.append(z[y] - max(z[c] for c in classes if c != y))
    return mismatches / len(labels), float(np.mean(margins))


def sums_of(features: np.ndarray, labels: np.ndarray, num_classes: int):
    x = torch.tensor(features)
    y = torch.tensor(labels)
    class_sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    return class_sums, torch.bincount(y, minlength=num_classes).double(), x.T @ x


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), dim=st.integers(2, 12), num_classes=st.integers(2, 7),
       offset=st.floats(-20, 20))
def test_geometry_matches_textbook_formulas(seed, dim, num_classes, offset):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, 30)])
    features = rng.normal(size=(len(labels), dim)) + rng.normal(size=(num_classes, dim))[labels] * 2 + offset
    head = rng.normal(size=(num_classes, dim))
    got = collapse_geometry(*sums_of(features, labels, num_classes), torch.tensor(head))
    expected = textbook_geometry(features, labels, head)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert got["num_classes_present"] == num_classes and got["num_samples"] == len(labels)


def test_absent_classes_are_dropped_everywhere():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 2, 5], size=40)
    features, head, logits = rng.normal(size=(40, 6)), rng.normal(size=(8, 6)), rng.normal(size=(40, 8))
    logits[:, 7] += 100.0  # an absent class wins every argmax over all classes: must not count
    got = collapse_geometry(*sums_of(features, labels, 8), torch.tensor(head))
    expected = textbook_geometry(features, labels, head)
    assert got["num_classes_present"] == 3
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    class_sums, counts, _ = sums_of(features, labels, 8)
    means = class_sums / counts.clamp_min(1).unsqueeze(1)
    mismatches, margins = nearest_mean_mismatch(torch.tensor(features), torch.tensor(logits),
                                                torch.tensor(labels), means, counts > 0)
    rate, margin = textbook_nc4(features, logits, labels)
    assert float(mismatches) / 40 == pytest.approx(rate) and float(margins) / 40 == pytest.approx(margin)


def simplex_features(num_classes: int, dim: int, per_class: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, num_classes)))[0]  # D × C orthonormal
    shift = rng.normal(size=dim)
    vertices = (np.eye(num_classes) - 1.0 / num_classes) @ basis.T * 3.0 + shift  # a shifted simplex
    labels = np.repeat(np.arange(num_classes), per_class)
    return vertices[labels] + noise * rng.normal(size=(len(labels), dim)), labels, vertices


def test_perfect_collapse_gives_zero_and_random_features_do_not():
    features, labels, vertices = simplex_features(5, 12, per_class=10, noise=0.0)
    head = vertices - vertices.mean(0)  # self-dual classifier
    collapsed = collapse_geometry(*sums_of(features, labels, 5), torch.tensor(head))
    assert abs(collapsed["nc1"]) < 1e-9 and collapsed["nc2_etf_gap"] < 1e-9
    assert collapsed["nc2_equinorm_cv"] < 1e-9 and collapsed["nc3_self_duality"] < 1e-9
    random_features = np.random.default_rng(1).normal(size=(50, 12))
    random = collapse_geometry(*sums_of(random_features, labels, 5), torch.tensor(head))
    assert random["nc1"] > 0.5 and random["nc2_etf_gap"] > 0.1 and random["nc3_self_duality"] > 0.5


def brute_force_metric(model, images, labels):
    """Textbook geometry of every stage's pooled features and NC4 at `norm`, from the captured forward."""
    captured = capture(model, images)
    expected = {}
    for stage, tokens in captured.stages.items():
        if stage in ("embed", "pe"):  # no CLS yet / the same CLS for every image
            continue
        pooled = model.forward_head(tokens, pre_logits=True) if stage == NORM else tokens[:, 0]
        head = model.head.weight.detach().double().numpy() if stage == NORM else None
        expected[stage] = textbook_geometry(pooled.double().numpy(), labels.numpy(), head)
    expected[NORM]["nc4_ncc_mismatch"], expected[NORM]["logit_margin"] = textbook_nc4(
        model.forward_head(captured.stages[NORM], pre_logits=True).double().numpy(),
        captured.logits.double().numpy(), labels.numpy())
    return expected


def test_streaming_metric_matches_brute_force_and_one_shot():
    model = tiny_vit()
    images = torch.randn(90, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(90) % 5  # class 5 absent from the probe set
    streamed = run_probe(model, list(zip(images.split(17), labels.split(17))), [NeuralCollapse(model)])
    one_shot = run_probe(model, [(images, labels)], [NeuralCollapse(model)])
    results = streamed["neural_collapse"]
    for stage, values in one_shot["neural_collapse"].items():
        for key, value in values.items():
            expected = value if value is None else pytest.approx(value, rel=1e-9)
            assert results[stage][key] == expected, (stage, key)
    assert results["pe"]["nc1"] is None  # the CLS token at `pe` is the same for every image
    expected = brute_force_metric(model, images, labels)
    for stage in ("block_1", "block_2", NORM):
        assert results[stage]["num_classes_present"] == 5
        for key, value in expected[stage].items():
            assert results[stage][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (stage, key)
        if stage != NORM:
            assert results[stage]["nc3_self_duality"] is None and results[stage]["nc4_ncc_mismatch"] is None


def test_final_stage_only_and_missing_labels():
    model = tiny_vit()
    images, labels = torch.randn(12, 3, 16, 16), torch.arange(12) % 3
    final_only = NeuralCollapse(model, all_stages=False)
    results = run_probe(model, [(images, labels)], [final_only])["neural_collapse"]
    assert list(results) == [NORM]
    with pytest.raises(ValueError, match="needs the probe labels"):
        run_probe(model, [images], [NeuralCollapse(model)])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 6\)"):
        run_probe(model, [(images, labels + 6)], [NeuralCollapse(model)])
