"""Joint-stage training throughput (samples/s, MFU on GPU) and 1 -> 2 rank scaling efficiency (gloo, CPU).

What runs is the joint stage's training machinery itself -- ``FlavaForPretraining`` from a model preset, the
per-kind unused-parameter probe, ``parallelize`` (DDP across ranks), AdamW with decay groups, the warm-up schedule
and ``flava.train.loop.Trainer`` -- fed by ``CorpusMixer`` over in-memory synthetic batches of the three kinds
(``data.mixing.ratios`` defaults), so decoding and disk are left out and only training compute and communication
are measured. MIM targets come as ``mim_labels``, so no codebook runs. Batches follow the embedded pipeline's
masking (40 % of patches, 15 % of tokens); pair batches carry no ``itm_labels`` (in-batch negatives, as in training).

Throughput = global samples / wall time of the measured steps (after ``--warmup`` steps), every step synchronised
by the trainer's non-finite check. MFU (GPU only) uses the FLOP convention of ``benchmarks/train_step.py``
(matmul FLOPs, train = 3 x forward, via ``flava.train.flops.step_flops``) against the bf16 dense peak.

Scaling: weak scaling, each rank keeps the same per-rank batch and one intra-op thread; the 2-rank run is
``torchrun --standalone --nproc_per_node 2`` (gloo). Efficiency = samples/s(2 ranks) / (2 x samples/s(1 rank)).
On a shared 2-core machine the ratio also measures contention for the cores, not only gradient all-reduce.
Each measurement runs in a fresh child process, ``--rounds`` times in alternating order; medians are reported.

    python benchmarks/joint.py                                  # small, CPU: 1-rank throughput + 1->2 scaling
    python benchmarks/joint.py --preset base --device cuda --precision bf16 --batch-size 64 --no-scaling
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import table

# Per-preset defaults: (per-rank batch, text length). ``small`` = the embedded pipeline's joint batch and
# data.tokenizer.max_length; ``base`` = a GPU-sized batch with CLIP's 77 tokens (as benchmarks/train_step.py).
PRESET_DEFAULTS: dict[str, tuple[int, int]] = {"tiny": (8, 16), "small": (32, 32), "base": (64, 77)}
IMAGE_MASK_RATIO = 0.4  # data.masking.image_mask_ratio
TEXT_MASK_PROB = 0.15  # data.masking.text_mask_prob
NUM_SPECIAL = 5  # [PAD] [UNK] [CLS] [SEP] [MASK]
DISTINCT_BATCHES = 4  # per kind, cycled


class CycleStream:
    """Endless stream over a few prepared batches (resumable state, like the real streams)."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches, self.i = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = int(state["i"])


def make_batch(cfg, kind: str, batch: int, length: int, gen: torch.Generator) -> dict[str, Any]:
    img, txt = cfg.image, cfg.text
    out: dict[str, Any] = {"kind": kind}
    if kind in ("image", "pair"):
        out["pixel_values"] = torch.randn(batch, img.num_channels, img.image_size, img.image_size, generator=gen)
        out["image_mask"] = torch.rand(batch, img.num_patches, generator=gen) < IMAGE_MASK_RATIO
        out["mim_labels"] = torch.randint(0, cfg.codebook_size, (batch, img.num_patches), generator=gen)
    if kind in ("text", "pair"):
        ids = torch.randint(NUM_SPECIAL, txt.vocab_size, (batch, length), generator=gen)
        chosen = torch.rand(batch, length, generator=gen) < TEXT_MASK_PROB
        chosen[:, 1] = True  # at least one masked token per row
        out["input_ids"] = ids
        out["input_ids_masked"] = ids.masked_fill(chosen, 4)
        out["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        out["mlm_labels"] = ids.masked_fill(~chosen, -100)
    return out


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One rank of a measurement (run directly, or by torchrun for several ranks)."""
    from flava.distributed import init_process, shutdown

    torch.set_num_threads(args.threads)
    info = init_process()
    try:
        return _measure(args, info)
    finally:  # after _measure returned: its DDP wrapper is gone before the group (see flava.distributed.shutdown)
        shutdown()


def _measure(args: argparse.Namespace, info) -> dict[str, Any]:
    from flava.data.mixing import CorpusMixer
    from flava.data.stream_config import MixingConfig
    from flava.model import FlavaForPretraining
    from flava.model.config import preset
    from flava.train.config import TrainConfig
    from flava.train.flops import peak_flops, step_flops
    from flava.train.loop import LoopSettings, Trainer
    from flava.train.optim import build_optimizer, build_scheduler
    from flava.train.parallel import grad_scaler, parallelize, resolve_device
    from flava.train.unused import UnusedParameters

    batch, length = args.batch_size, args.text_length
    tc = TrainConfig.model_validate({
        "device": args.device, "precision": args.precision, "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "joint": {"steps": args.warmup + args.steps, "batch_size": batch * info.world_size},
        "log_every": args.warmup + args.steps, "checkpoint_every": 10**9, "eval_every": 10**9,
        "schedule": {"warmup_steps": args.warmup},
    })
    device = resolve_device(tc.device, info)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = FlavaForPretraining(cfg).to(device)
    gen = torch.Generator().manual_seed(1 + info.rank)
    ratios = MixingConfig().ratios
    streams = {k: CycleStream([make_batch(cfg, k, batch, length, gen) for _ in range(DISTINCT_BATCHES)])
               for k in ratios}
    guard = UnusedParameters.setup(model, {k: s.batches[0] for k, s in streams.items()}, device,
                                   distributed=info.distributed)
    wrapped = parallelize(model, tc, info, device)
    opt = build_optimizer(model, tc.optimizer, tc.optimizer.lr, device)
    sched = build_scheduler(opt, tc.schedule, total_steps=tc.joint.steps, warmup_steps=args.warmup)
    peak = peak_flops(device)

    # Two windows: warm-up (compilation, allocator, caches), then the measured steps.
    settings = LoopSettings.from_config(tc, "joint")
    trainer = Trainer(model=wrapped, optimizer=opt, scheduler=sched,
                      stream=CorpusMixer(streams, ratios, seed=0), settings=settings, device=device, info=info,
                      scaler=grad_scaler(device, tc.precision), unused=guard,
                      flops_per_batch=(lambda b: step_flops(cfg, b)) if peak else None, peak_flops=peak)
    if args.warmup:
        trainer.settings = LoopSettings(**{**settings.__dict__, "steps": args.warmup, "log_every": 10**9})
        trainer.fit()  # logs one window at its last step
    trainer.settings = LoopSettings(**{**settings.__dict__, "log_every": 10**9})
    trainer.fit()  # the measured window: every step after the warm-up
    measured = trainer.history[-1]
    result = {
        "preset": args.preset, "device": str(device), "precision": args.precision, "world_size": info.world_size,
        "per_rank_batch": batch, "steps": args.steps, "threads": args.threads,
        "samples_per_s": measured["samples_per_s"], "mfu": measured.get("mfu"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return result


def _child(args: argparse.Namespace, ranks: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [__file__, "--worker", "--out", str(out), "--preset", args.preset, "--device", args.device,
               "--precision", args.precision, "--batch-size", str(args.batch_size), "--text-length",
               str(args.text_length), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
               str(threads)]
        if ranks > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *cmd]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESET_DEFAULTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=None, help="per-rank batch (default: per preset)")
    parser.add_argument("--text-length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of the 1-rank throughput run")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1 -> 2 rank gloo comparison")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    default_batch, default_length = PRESET_DEFAULTS[args.preset]
    args.batch_size = args.batch_size or default_batch
    args.text_length = args.text_length or default_length

    if args.worker:
        result = worker(args)
        if result["world_size"] == 1 or int(os.environ.get("RANK", 0)) == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0

    threads = args.threads or torch.get_num_threads()
    rows, results = [], {}
    # Rounds alternate the order of the contenders so slow drifts of a shared machine hit all of them alike;
    # the median over rounds is reported.
    runs: dict[str, list[dict[str, Any]]] = {"throughput": [], "one": [], "two": []}
    plan = [("throughput", 1, threads)]
    if not args.no_scaling:
        if args.device == "cuda":
            raise SystemExit("the scaling comparison runs on CPU with gloo: pass --no-scaling with --device cuda")
        plan += [("one", 1, 1), ("two", 2, 1)]
    for r in range(args.rounds):
        for name, ranks, n_threads in (plan if r % 2 == 0 else plan[::-1]):
            runs[name].append(_child(args, ranks, n_threads))

    def med(name: str) -> dict[str, Any]:
        ordered = sorted(runs[name], key=lambda res: res["samples_per_s"])
        return {**ordered[len(ordered) // 2], "rounds": [res["samples_per_s"] for res in runs[name]]}

    results["throughput"] = r = med("throughput")
    rows.append([f"{args.preset} {args.precision}", r["device"], 1, threads, args.batch_size,
                 f"{r['samples_per_s']:.1f}", f"{r['mfu']:.1%}" if r["mfu"] else "-"])
    if not args.no_scaling:
        one, two = med("one"), med("two")
        results["scaling"] = {"one": one, "two": two,
                              "efficiency": two["samples_per_s"] / (2 * one["samples_per_s"])}
        for res in (one, two):
            rows.append([f"{args.preset} {args.precision}", res["device"], res["world_size"], 1, args.batch_size,
                         f"{res['samples_per_s']:.1f}", "-"])
    print(table(["model", "device", "ranks", "threads/rank", "batch/rank", "samples/s", "MFU"], rows))
    if "scaling" in results:
        print(f"\nscaling efficiency 1 -> 2 ranks (gloo, weak scaling): {results['scaling']['efficiency']:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
