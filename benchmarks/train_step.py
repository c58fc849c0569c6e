"""Full pretraining steps of our FLAVA against transformers' ``FlavaForPreTraining``, side by side.

One step = forward on a paired batch (all five pair objectives: global contrastive, ITM, MMM-image, MMM-text,
with masks and labels), backward, and an AdamW step (the same for both: torch's fused AdamW where the device has
it, as our trainer uses). Both models get the same config (converted with
``flava.model.hf``), the same weights (ours, converted) and the same batch tensors; MIM targets are given as
``mim_labels`` to both, so no codebook runs in either. Throughput is measured in one process with the two
implementations alternating (warm-up, then interleaved rounds); peak memory is measured in one fresh child
process per implementation with identical imports: max RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/train_step.py --threads 1                       # small preset, CPU, fp32
    python benchmarks/train_step.py --preset base --device cuda --dtype bf16 --batch-size 64

On a CPU shared with other jobs, wall times absorb their load, and with more torch threads than idle cores the
OpenMP threads spin at barriers and CPU time per step grows several-fold (figures: benchmarks/README.md, "Figures
cited by the code"). The table therefore also gives this process's CPU seconds per step and their ratio, which
other processes barely affect; prefer ``--threads 1`` there.

FLOP count (for MFU and GFLOP/s): matmul FLOPs only, 2 per multiply-accumulate, counted analytically per layer,
training = 3 x forward (backward = 2 x forward; no recomputation counted). Per pair sample, the paper's algorithm
runs the image and text encoders twice (unmasked for the contrastive loss, masked for the fusion) and the
multimodal encoder once (transformers also skips the unmasked fusion pass). One pre-norm block over ``n`` tokens
of width ``d`` and MLP width ``f`` whose output is needed at ``r`` positions costs
``4 n d^2 + 2 r (2 d^2 + 2 d f) + 4 r n d`` (k/v projections of all tokens; q/out projections and the MLP of
the needed rows; the QK^T and AV matmuls, over padded lengths). ``r = n`` except in the last block of a stack,
where only the positions a loss reads count: the CLS of the unmasked passes (contrastive only), and in the
multimodal encoder its CLS (ITM) plus the masked patches and tokens of matched pairs (MMM). Added: the
patch-embedding conv, the projections into the fusion width, the contrastive projections and logits, the ITM head,
and the MMM heads on the masked positions of matched pairs. Embedding lookups, norms, softmax and activations are
not counted. The count with every position of every block (what transformers executes, checked against
``torch.utils.flop_counter`` to 0.1 %) is printed too. Both implementations are credited with the same (needed)
FLOPs, so their MFU ratio equals their throughput ratio.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    interleaved,
    max_rss_bytes,
    median,
    median_interval,
    mib,
    peak_bf16_flops,
    reset_peak,
    rss_bytes,
    run_child,
    sync,
    table,
)

# Per-preset benchmark defaults: (batch size, padded text length, (min, max) real caption tokens incl. [CLS]/[SEP]).
# ``small`` is the embedded pipeline: joint batch 32, captions padded to data.tokenizer.max_length = 32
# (data.loader.pad_to_max_length), and the synthetic world's captions are 5-13 tokens long (mean 9).
# ``base`` uses a GPU-sized batch, CLIP's 77 tokens and captions filling half to all of them.
PRESET_DEFAULTS: dict[str, tuple[int, int, tuple[int, int]]] = {
    "tiny": (8, 16, (5, 16)),
    "small": (32, 32, (5, 13)),
    "base": (64, 77, (38, 77)),
}
IMAGE_MASK_RATIO = 0.4  # FLAVA / BEiT: 40 % of patches masked (data.masking.image_mask_ratio)
TEXT_MASK_PROB = 0.15  # BERT (data.masking.text_mask_prob)
ITM_NEGATIVE_FRACTION = 0.1  # share of pairs given itm_labels = 0 (reference implementation: about 10 %)
NUM_SPECIAL = 5  # ids 0..4 = [PAD], [UNK], [CLS], [SEP], [MASK] in the synthetic vocabulary
IMPLS = ("ours", "transformers")


# ------------------------------------------------------------------------------------------- models & batch
def build_config(preset: str, text_length: int, attention: str | None = None):
    from flava.model.config import preset as model_preset

    cfg = model_preset(preset, {"attention": attention} if attention else None)
    if text_length > cfg.text.max_position_embeddings:
        raise ValueError(
            f"--text-length {text_length} exceeds the {preset} preset's max_position_embeddings "
            f"{cfg.text.max_position_embeddings}"
        )
    return cfg


def build_ours(cfg, seed: int) -> torch.nn.Module:
    from flava.model import FlavaForPretraining

    torch.manual_seed(seed)
    return FlavaForPretraining(cfg)


def hf_config_and_weights(ours: torch.nn.Module) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' ``FlavaConfig`` and state dict for our model (``flava.model.hf``)."""
    from flava.model import hf

    return hf.to_transformers_config(ours.config), hf.to_transformers_state_dict(ours)


def build_transformers(hf_config, hf_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import FlavaForPreTraining

    from flava.model.hf import HF_ONLY_PREFIXES

    model = FlavaForPreTraining(hf_config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    # Only transformers' tower poolers (unused by the losses; ours has none) keep their initialisation.
    missing = [k for k in missing if not k.startswith(HF_ONLY_PREFIXES)]
    if missing or unexpected:
        raise RuntimeError(
            f"converted weights do not fit transformers' model: missing={missing} unexpected={unexpected}"
        )
    return model


def make_batch(
    cfg, batch_size: int, text_length: int, seed: int, caption_tokens: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """A paired batch as ``flava.data`` produces it (+ ``mim_labels``): captions of ``caption_tokens`` (min, max)
    real tokens padded to ``text_length``, 40 % of patches masked per image, 15 % BERT masking of real
    non-special tokens (at least one), ~10 % ITM negatives."""
    g = torch.Generator().manual_seed(seed)
    img, txt = cfg.image, cfg.text
    b, p, t = batch_size, img.num_patches, text_length
    pixel_values = torch.randn(b, img.num_channels, img.image_size, img.image_size, generator=g)
    k = max(1, round(IMAGE_MASK_RATIO * p))
    order = torch.rand(b, p, generator=g).argsort(dim=1)
    image_mask = torch.zeros(b, p, dtype=torch.bool).scatter_(1, order[:, :k], True)
    lo, hi = caption_tokens or (max(3, t // 2), t)
    if not 3 <= lo <= hi <= t:
        raise ValueError(f"caption tokens {lo}..{hi} must satisfy 3 <= min <= max <= text length {t}")
    lengths = torch.randint(lo, hi + 1, (b,), generator=g)
    positions = torch.arange(t)[None, :]
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = torch.randint(NUM_SPECIAL, txt.vocab_size, (b, t), generator=g)
    input_ids[:, 0] = 2  # [CLS]
    input_ids[torch.arange(b), lengths - 1] = 3  # [SEP]
    input_ids[attention_mask == 0] = txt.pad_token_id
    candidates = (attention_mask == 1) & (input_ids >= NUM_SPECIAL)
    chosen = candidates & (torch.rand(b, t, generator=g) < TEXT_MASK_PROB)
    first = candidates.float().argmax(dim=1)  # guarantee one masked token per caption
    chosen[torch.arange(b), first] = True
    mlm_labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    input_ids_masked = torch.where(chosen, torch.full_like(input_ids, 4), input_ids)  # [MASK]
    itm_labels = (torch.rand(b, generator=g) >= ITM_NEGATIVE_FRACTION).long()
    mim_labels = torch.randint(0, cfg.codebook_size, (b, p), generator=g)
    return {
        "pixel_values": pixel_values,
        "image_mask": image_mask,
        "input_ids": input_ids,
        "input_ids_masked": input_ids_masked,
        "attention_mask": attention_mask,
        "mlm_labels": mlm_labels,
        "itm_labels": itm_labels,
        "mim_labels": mim_labels,
    }


def ours_loss(model, batch) -> torch.Tensor:
    return model({"kind": "pair", **batch}).loss


def transformers_loss(model, batch) -> torch.Tensor:
    out = model(
        input_ids=batch["input_ids"],
        input_ids_masked=batch["input_ids_masked"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        bool_masked_pos=batch["image_mask"],
        mlm_labels=batch["mlm_labels"],
        mim_labels=batch["mim_labels"].clone(),  # transformers writes -100 into it in place
        itm_labels=batch["itm_labels"],
        return_loss=True,
    )
    return out.loss


LOSSES: dict[str, Callable[[Any, dict], torch.Tensor]] = {"ours": ours_loss, "transformers": transformers_loss}


def make_step(model, impl: str, batch, device: torch.device, dtype: str) -> Callable[[], None]:
    """A closure running one training step (zero_grad, forward under autocast if bf16, backward, AdamW)."""
    from flava.train.optim import fused_supported

    model.train()
    # Both implementations get the same optimizer: torch's fused AdamW where the device has it (CUDA, CPU), the one
    # our trainer uses by default, so the step compares the models, not optimizer implementations.
    fused = fused_supported(device) or None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
    loss_fn = LOSSES[impl]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        with ctx:
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()

    return step


# -------------------------------------------------------------------------------------------------- FLOPs
def _block_flops(d: int, f: int, n: int, rows: int | None = None) -> int:
    """One pre-norm block over ``n`` tokens whose output is needed at ``rows`` positions (default all): k/v
    projections for every token; q, attention, output projection and MLP for the needed rows only."""
    rows = n if rows is None else rows
    return 2 * n * 2 * d * d + 2 * rows * (2 * d * d + 2 * d * f) + 4 * rows * n * d


def _stack_flops(tower, n: int, last_rows: int | None = None) -> int:
    d, f, layers = tower.hidden_size, tower.intermediate_size, tower.num_layers
    if layers == 0:
        return 0
    return (layers - 1) * _block_flops(d, f, n) + _block_flops(d, f, n, last_rows)


def pair_step_flops(cfg, batch: dict[str, torch.Tensor], *, needed_only: bool = True) -> int:
    """Model FLOPs of one training step on ``batch`` (see the module docstring for the convention).

    ``needed_only``: the last block of a stack is counted only for the positions a loss reads (the CLS of the
    unmasked passes, which feed only the contrastive loss; the multimodal CLS, and the masked patches and tokens
    of matched pairs); otherwise every position of every block is counted."""
    from flava.train.flops import stem_flops

    img, txt, mm = cfg.image, cfg.text, cfg.multimodal
    b, t = batch["input_ids"].shape
    p = img.num_patches
    n_img, n_mm = p + 1, 1 + (p + 1) + t
    matched = batch["itm_labels"].bool()
    masked_patches = (batch["image_mask"] & matched[:, None]).sum(dim=1)  # (B,)
    masked_tokens = ((batch["mlm_labels"] != -100) & matched[:, None]).sum(dim=1)
    cls_only = 1 if needed_only else None

    patch = stem_flops(img)
    per_sample = 2 * patch + _stack_flops(img, n_img, cls_only) + _stack_flops(img, n_img)  # unmasked + masked
    per_sample += _stack_flops(txt, t, cls_only) + _stack_flops(txt, t)
    per_sample += 2 * cfg.projection_dim * (img.hidden_size + txt.hidden_size)  # contrastive projections
    per_sample += 2 * 2 * b * cfg.projection_dim  # image->text and text->image logits against the batch
    per_sample += 2 * mm.hidden_size * (n_img * img.hidden_size + t * txt.hidden_size)  # into the fusion width
    per_sample += 2 * (mm.hidden_size**2 + 2 * mm.hidden_size)  # ITM pooler + classifier
    forward = b * per_sample
    for k_img, k_txt in zip(masked_patches.tolist(), masked_tokens.tolist()):
        forward += _stack_flops(mm, n_mm, 1 + k_img + k_txt if needed_only else None)
    head = lambda vocab: 2 * (mm.hidden_size**2 + mm.hidden_size * vocab)  # noqa: E731 - per position
    forward += int(masked_patches.sum()) * head(cfg.codebook_size) + int(masked_tokens.sum()) * head(txt.vocab_size)
    return 3 * forward


# ----------------------------------------------------------------------------------------- memory children
def _save_inputs(workdir: Path, cfg, ours, hf_config, hf_state, batch) -> None:
    from safetensors.torch import save_file

    (workdir / "config.json").write_text(cfg.model_dump_json())
    hf_config.to_json_file(str(workdir / "hf_config.json"))
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(workdir / "ours.safetensors"))
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(workdir / "transformers.safetensors"))
    save_file(batch, str(workdir / "batch.safetensors"))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: build one implementation from the saved inputs, run steps, report its peak memory."""
    # Identical imports for both implementations, so the baseline RSS is the same.
    import transformers  # noqa: F401
    from safetensors.torch import load_file

    import flava.model  # noqa: F401
    from flava.model.config import FlavaConfig

    device = torch.device(args.device)
    workdir = Path(args.workdir)
    gc.collect()
    baseline = rss_bytes()
    batch = {k: v.to(device) for k, v in load_file(str(workdir / "batch.safetensors")).items()}
    state = load_file(str(workdir / f"{args.worker}.safetensors"))
    if args.worker == "ours":
        from flava.model import FlavaForPretraining

        model = FlavaForPretraining(FlavaConfig.model_validate_json((workdir / "config.json").read_text()))
        model.load_state_dict(state)
        if args.compile:
            from flava.train.parallel import compile_regions

            compile_regions(model)
    else:
        from transformers import FlavaConfig as HFConfig

        model = build_transformers(HFConfig.from_json_file(str(workdir / "hf_config.json")), state)
    del state
    gc.collect()
    model.to(device)
    reset_peak(device)
    step = make_step(model, args.worker, batch, device, args.dtype)
    for _ in range(args.warmup + args.steps):
        step()
    sync(device)
    out = {"impl": args.worker, "baseline_rss": baseline, "peak_rss": max_rss_bytes()}
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated(device)
    return out


# ------------------------------------------------------------------------------------------------------ main
@dataclass
class Result:
    impl: str
    seconds_per_step: float  # wall clock, median over rounds
    cpu_seconds_per_step: float  # this process's CPU time (all threads), median over rounds
    samples_per_s: float
    memory: dict[str, Any]


def parity(ours, theirs, batch) -> tuple[float, float]:
    """Losses of both models on the batch in eval mode, fp32: a check that both run the same computation."""
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = float(ours_loss(ours, batch)), float(transformers_loss(theirs, batch))
    return a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESET_DEFAULTS), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per preset (small 32, base 64)")
    parser.add_argument("--text-length", type=int, default=None, help="padded caption length (small 32, base 77)")
    parser.add_argument("--caption-tokens", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="real tokens per caption incl. [CLS]/[SEP] (small: 5 13, the synthetic captions)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default=None,
                        help="our attention kernel (default: the preset's); transformers' FLAVA is always eager")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile our transformer blocks as train.compile does (transformers stays eager; "
                             "compilation happens in the warm-up steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per implementation")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per implementation per round")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps in each memory child (after warm-up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's bf16 peak")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    device = torch.device(args.device)
    batch_size, text_length, caption_tokens = PRESET_DEFAULTS[args.preset]
    batch_size = args.batch_size or batch_size
    if args.text_length and not args.caption_tokens:
        caption_tokens = (max(3, args.text_length // 2), args.text_length)
    text_length = args.text_length or text_length
    caption_tokens = tuple(args.caption_tokens) if args.caption_tokens else caption_tokens
    if batch_size < 2:
        raise ValueError("--batch-size must be >= 2 (the contrastive loss needs in-batch negatives)")

    cfg = build_config(args.preset, text_length, args.attention)
    ours = build_ours(cfg, args.seed)
    hf_config, hf_state = hf_config_and_weights(ours)
    theirs = build_transformers(hf_config, hf_state)
    batch = make_batch(cfg, batch_size, text_length, args.seed, caption_tokens)
    loss_ours, loss_theirs = parity(ours, theirs, batch)
    flops = pair_step_flops(cfg, batch)
    flops_all_positions = pair_step_flops(cfg, batch, needed_only=False)

    with tempfile.TemporaryDirectory(prefix="flava-bench-") as tmp:
        workdir = Path(tmp)
        memory: dict[str, dict[str, Any]] = {impl: {} for impl in IMPLS}
        if not args.no_memory:
            _save_inputs(workdir, cfg, ours, hf_config, hf_state, batch)
            for impl in IMPLS:
                child = [__file__, "--worker", impl, "--workdir", tmp, "--device", args.device, "--dtype",
                         args.dtype, "--warmup", "2" if args.compile else "1", "--steps", str(args.memory_steps)]
                child += ["--compile"] if args.compile else []
                if args.threads:
                    child += ["--threads", str(args.threads)]
                memory[impl] = run_child(child, timeout_s=1800)
        del hf_state

    ours.to(device)
    theirs.to(device)
    if args.compile:
        from flava.train.parallel import compile_regions

        compile_regions(ours)
    batch = {k: v.to(device) for k, v in batch.items()}
    models = {"ours": ours, "transformers": theirs}
    steps = {impl: make_step(models[impl], impl, batch, device, args.dtype) for impl in IMPLS}
    times = interleaved(steps, device, warmup=args.warmup, rounds=args.rounds, steps=args.steps)
    results = [
        Result(impl, median(times[impl]["wall"]), median(times[impl]["cpu"]), batch_size / median(times[impl]["wall"]),
               memory[impl])
        for impl in IMPLS
    ]

    peak = peak_bf16_flops(device, args.peak_tflops) if args.dtype == "bf16" else None
    print(
        f"train step, pair batch: preset={args.preset} device={device} dtype={args.dtype} batch={batch_size} "
        f"text_length={text_length} (captions {caption_tokens[0]}-{caption_tokens[1]} tokens) "
        f"attention={cfg.attention}{' compiled' if args.compile else ''} threads={torch.get_num_threads()} "
        f"rounds={args.rounds}x{args.steps} steps (warm-up {args.warmup}) torch={torch.__version__}"
    )
    print(f"loss on the batch (eval, fp32): ours {loss_ours:.6f} | transformers {loss_theirs:.6f}")
    print(f"model FLOPs per step: {flops / 1e9:,.1f} GFLOP (matmul-only, 3 x forward, last blocks at the positions "
          f"a loss reads; every position of every block: {flops_all_positions / 1e9:,.1f} GFLOP)")
    on_cpu = device.type == "cpu"
    header = ["impl", "s/step (median)", "samples/s", "GFLOP/s"] + (["CPU s/step"] if on_cpu else [])
    if peak:
        header.append("MFU")
    if not args.no_memory:
        header += ["peak memory", "over baseline"]
    rows = []
    for r in results:
        row: list[Any] = [r.impl, f"{r.seconds_per_step:.4f}", f"{r.samples_per_s:.1f}",
                          f"{flops / r.seconds_per_step / 1e9:,.1f}"]
        if on_cpu:
            row.append(f"{r.cpu_seconds_per_step:.4f}")
        if peak:
            row.append(f"{flops / r.seconds_per_step / peak:.1%}")
        if r.memory:
            total = r.memory.get("peak_cuda", r.memory["peak_rss"])
            row.append(mib(total))
            row.append("-" if "peak_cuda" in r.memory else mib(total - r.memory["baseline_rss"]))
        rows.append(row)
    print(table(header, rows))
    ours_r, theirs_r = results
    print(f"throughput ratio ours / transformers: {ours_r.samples_per_s / theirs_r.samples_per_s:.2f}x")
    # Each round times both implementations back to back, so its ratio cancels the slow drifts of a shared machine
    # that the ratio of the two medians above still carries.
    per_round = sorted(t / o for t, o in zip(times["transformers"]["wall"], times["ours"]["wall"]))
    interval = median_interval(per_round) if len(per_round) > 1 else (per_round[0], per_round[0])
    print(f"per-round throughput ratios: median {median(per_round):.2f}x (95 % bootstrap interval "
          f"{interval[0]:.2f}-{interval[1]:.2f}x), range {per_round[0]:.2f}-{per_round[-1]:.2f}x over "
          f"{len(per_round)} rounds")
    if on_cpu:  # robust to other processes' load on a shared machine
        print(f"CPU-time ratio transformers / ours: {theirs_r.cpu_seconds_per_step / ours_r.cpu_seconds_per_step:.2f}x")
    if ours_r.memory and theirs_r.memory:
        key = "peak_cuda" if "peak_cuda" in ours_r.memory else "peak_rss"
        print(f"peak memory ratio ours / transformers: {ours_r.memory[key] / theirs_r.memory[key]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "preset": args.preset, "device": str(device), "dtype": args.dtype, "batch_size": batch_size,
            "text_length": text_length, "caption_tokens": caption_tokens, "attention": cfg.attention,
            "threads": torch.get_num_threads(), "flops_per_step": flops, "flops_all_positions": flops_all_positions,
            "peak_flops": peak,
            "results": [r.__dict__ for r in results], "times": times, "per_round_ratios": per_round,
            "per_round_ratio_interval": interval,
            "loss": {"ours": loss_ours, "transformers": loss_theirs},
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
