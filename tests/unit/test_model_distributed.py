"""The global contrastive loss across 2 gloo ranks equals the single-process loss over the whole batch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from flava.model import FlavaForPretraining, preset

BATCH = 8


def full_batch(cfg):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.text.vocab_size, (BATCH, 10), generator=g)
    return {"kind": "pair", "pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": torch.ones_like(ids)}


def contrastive_only():
    return preset("tiny", {"loss": {"mim": 0, "mlm": 0, "mmm_image": 0, "mmm_text": 0, "itm": 0}})


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = contrastive_only()
        torch.manual_seed(0)
        model = FlavaForPretraining(cfg).eval()
        model.process_group_info = (rank, world_size)
        batch = full_batch(cfg)
        share = BATCH // world_size
        local = {k: (v[rank * share : (rank + 1) * share] if torch.is_tensor(v) else v) for k, v in batch.items()}
        out = model(local)
        out.loss.backward()  # gradients flow into this rank's slice
        assert model.image_projection.weight.grad is not None
        loss = out.losses["contrastive"].detach().clone()
        dist.all_reduce(loss)
        save_file({"loss": loss / world_size}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_global_contrastive_over_two_ranks_equals_full_batch(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    cfg = contrastive_only()
    torch.manual_seed(0)
    model = FlavaForPretraining(cfg).eval()
    with torch.no_grad():
        expected = model(full_batch(cfg)).losses["contrastive"]
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))["loss"]
        assert torch.allclose(got, expected, atol=1e-5), (rank, got, expected)
