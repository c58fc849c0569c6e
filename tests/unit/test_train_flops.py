"""FLOPs per batch kind (MFU numerator) follow the model benchmark's convention; peaks only for known GPUs."""
import pytest
import torch

from flava.model.config import preset
from flava.train.flops import peak_flops, step_flops


def _pair(cfg, b=4, t=10):
    g = torch.Generator().manual_seed(0)
    labels = torch.full((b, t), -100)
    labels[:, 3] = 7
    return {"kind": "pair", "input_ids": torch.ones(b, t, dtype=torch.long), "mlm_labels": labels,
            "image_mask": torch.rand(b, cfg.image.num_patches, generator=g) < 0.4,
            "itm_labels": torch.ones(b, dtype=torch.long), "pixel_values": torch.zeros(b, 3, 1, 1)}


def test_pair_flops_match_the_model_benchmark():
    train_step = pytest.importorskip("benchmarks.train_step")
    cfg = preset("small")
    batch = _pair(cfg)
    # every position of every block counted (the benchmark's needed_only=False): an upper bound of the work done
    assert step_flops(cfg, batch) == pytest.approx(train_step.pair_step_flops(cfg, batch, needed_only=False),
                                                   rel=1e-9)


def test_flops_scale_with_batch_and_kind():
    cfg = preset("tiny")
    text = {"kind": "text", "input_ids": torch.ones(4, 8, dtype=torch.long), "mlm_labels": torch.full((4, 8), -100)}
    double = {"kind": "text", "input_ids": torch.ones(8, 8, dtype=torch.long), "mlm_labels": torch.full((8, 8), -100)}
    assert step_flops(cfg, double) == pytest.approx(2 * step_flops(cfg, text))
    image = {"kind": "image", "pixel_values": torch.zeros(4, 3, 32, 32),
             "image_mask": torch.zeros(4, cfg.image.num_patches, dtype=torch.bool)}
    assert step_flops(cfg, _pair(cfg)) > step_flops(cfg, image) > 0
    with pytest.raises(ValueError, match="kind"):
        step_flops(cfg, {"kind": "audio"})


def test_peak_only_on_gpu_or_when_given():
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=100.0) == 100e12
