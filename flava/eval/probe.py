"""Linear probe on frozen image features (FLAVA paper, Sec. 5 / CLIP protocol).

Features are the image encoder's CLS hidden states (``model.image_features``) of the zero-shot set's train, val and
test splits. A multinomial logistic regression is fitted with L-BFGS for every inverse-regularisation strength C of
``eval.probe.c_grid``; the C with the best validation accuracy is kept (optionally refitted on train+val) and its
test accuracy reported. The model is only read, under no_grad.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

from flava.eval.config import ProbeConfig
from flava.eval.datasets import ZeroShotSet, load_zeroshot
from flava.eval.features import encode_images


def _fit(x: np.ndarray, y: np.ndarray, c: float, pcfg: ProbeConfig, seed: int):
    # sklearn takes ~1.3 s to import; only the linear probe needs it, and eval.probe can be switched off
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()] if pcfg.standardize else []
    clf = make_pipeline(*steps, LogisticRegression(C=c, solver="lbfgs", max_iter=pcfg.max_iter, random_state=seed))
    with warnings.catch_warnings(), threadpool_limits(limits=pcfg.blas_threads):
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported via n_iter instead
        clf.fit(x, y)
    return clf


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    pcfg: ProbeConfig,
    *,
    seed: int = 0,
) -> dict[str, float | dict[str, float]]:
    """Sweep C on val, report test accuracy. Each argument is (features (N, D), integer labels (N,))."""
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] == 0:
            raise ValueError(f"linear probe {name} split: features (N, D) and labels (N,) expected, "
                             f"got {x.shape} and {y.shape}")
        if not np.isfinite(x).all():
            raise ValueError(f"linear probe {name} split: features contain NaN or inf")
    if len(np.unique(train[1])) < 2:
        raise ValueError("linear probe: the train split needs at least two classes")
    val_acc: dict[str, float] = {}
    best_c, best_acc = None, -1.0
    for c in pcfg.c_grid:
        acc = float((_fit(*train, c, pcfg, seed).predict(val[0]) == val[1]).mean())
        val_acc[f"{c:g}"] = acc
        if acc > best_acc:  # ties keep the stronger regularisation (grid order is the user's)
            best_c, best_acc = c, acc
    if pcfg.refit_on_train_val:
        x, y = np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]])
    else:
        x, y = train
    final = _fit(x, y, best_c, pcfg, seed)
    test_acc = float((final.predict(test[0]) == test[1]).mean())  # predict is one small matmul
    n_iter = int(np.max(final[-1].n_iter_))
    return {
        "accuracy": test_acc,
        "best_c": float(best_c),
        "val_accuracy": best_acc,
        "sweep": val_acc,
        "converged": float(n_iter < pcfg.max_iter),
    }


def evaluate_linear_probe(
    model: torch.nn.Module,
    eval_root,
    pcfg: ProbeConfig,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    splits: Sequence[str] = ("train", "val", "test"),
) -> dict[str, float | dict[str, float]]:
    """Frozen ``model.image_features`` on the zero-shot set's splits -> :func:`linear_probe`."""
    train, val, test = (load_zeroshot(eval_root, split) for split in splits)
    return probe_sets(model, train, val, test, pcfg, transform=transform, batch_size=batch_size, device=device,
                      seed=seed)


def probe_sets(
    model: torch.nn.Module,
    train: ZeroShotSet,
    val: ZeroShotSet,
    test: ZeroShotSet,
    pcfg: ProbeConfig,
    *,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
) -> dict[str, float | dict[str, float]]:
    """The probe on sets already in memory (train fits, val picks C, test is reported)."""
    data = []
    for ds in (train, val, test):
        x = encode_images(model, ds.images, transform, batch_size=batch_size, device=device, method="image_features")
        data.append((x.numpy().astype(np.float64), np.asarray(ds.labels)))
    return linear_probe(*data, pcfg, seed=seed)
