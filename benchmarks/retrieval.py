"""Retrieval scoring at scale: N images x 5N captions, chunked similarity + running top-k, never the N x 5N matrix.

For each N, a fresh child process builds random unit vectors of the model's projection dim (captions = their
image's vector plus noise, so the recalls are neither 0 nor 1), then times ``flava.eval.retrieval.retrieval_recall``
(both directions, R@1/5/10). Peak memory is the child's max RSS above its RSS after building the embeddings on
CPU (``benchmarks/common.py`` conventions), or the CUDA allocator's high-water mark above the embeddings on GPU.
For small N it also runs the dense reference (full similarity matrix + argsort-free topk) to show equal results.

    python benchmarks/retrieval.py                       # N = 1k, 10k, 100k, projection dim of model.preset
    python benchmarks/retrieval.py --sizes 1000 5000 --dense-max-n 5000 --threads 2

Recorded results (command, machine, date): benchmarks/README.md, "Retrieval at scale".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import max_rss_bytes, mib, peak_bytes, reset_peak, rss_bytes, run_child, sync, table  # noqa: E402
from flava.eval.config import RetrievalConfig  # noqa: E402
from flava.eval.retrieval import retrieval_recall  # noqa: E402


def _world(n: int, captions: int, dim: int, noise: float, device: torch.device, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    owner = torch.arange(n).repeat_interleave(captions)
    texts = torch.empty(n * captions, dim)
    step = 1 << 16  # build captions in slices so the benchmark's own setup stays small
    for s in range(0, texts.shape[0], step):
        # per-dimension noise noise/sqrt(dim): the noise vector's norm is about ``noise`` in any dim
        texts[s : s + step] = F.normalize(images[owner[s : s + step]] + noise / dim**0.5 * torch.randn(
            min(step, texts.shape[0] - s), dim, generator=gen), dim=-1)
    return images.to(device), texts.to(device), owner


def _dense(images, texts, owner, ks):
    """Reference that materialises the full (N, 5N) similarity matrix."""
    sim = images @ texts.T
    kmax = max(ks)
    top_t = sim.topk(kmax, dim=1).indices.cpu()
    top_i = sim.T.topk(kmax, dim=1).indices.cpu()
    i2t = (owner[top_t] == torch.arange(images.shape[0])[:, None]).cumsum(1) > 0
    t2i = (top_i == owner[:, None]).cumsum(1) > 0
    out = {f"i2t_r{k}": i2t[:, k - 1].float().mean().item() for k in ks}
    out.update({f"t2i_r{k}": t2i[:, k - 1].float().mean().item() for k in ks})
    return out


def child(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, texts, owner = _world(args.n, args.captions, args.dim, args.noise, device, args.seed)
    sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    reset_peak(device)
    ks = (1, 5, 10)
    start = time.perf_counter()
    recall = retrieval_recall(images, texts, owner, ks, query_chunk=args.query_chunk, key_chunk=args.key_chunk)
    sync(device)
    seconds = time.perf_counter() - start
    peak = peak_bytes(device)
    result = {
        "n": args.n, "captions": args.n * args.captions, "dim": args.dim, "seconds": seconds,
        "scoring_peak_bytes": max(0, peak - base), "embedding_bytes": (images.numel() + texts.numel()) * 4,
        "dense_matrix_bytes": args.n * args.n * args.captions * 4, "recall": recall,
        "process_peak_rss": max_rss_bytes(), "threads": torch.get_num_threads(), "device": str(device),
    }
    if args.dense:
        reset_peak(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
        start = time.perf_counter()
        dense = _dense(images, texts, owner, ks)
        sync(device)
        result["dense_seconds"] = time.perf_counter() - start
        result["dense_peak_bytes"] = max(0, peak_bytes(device) - base)
        result["dense_agrees"] = all(abs(dense[k] - recall[k]) < 1e-9 for k in dense)
    return result


def main() -> None:
    from flava.model.config import ModelSection

    defaults = RetrievalConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--dim", type=int, default=None, help="embedding dim (default: preset's projection_dim)")
    parser.add_argument("--preset", default=ModelSection().preset)
    parser.add_argument("--noise", type=float, default=3.0, help="caption noise norm relative to the unit image vector")
    parser.add_argument("--query-chunk", type=int, default=defaults.query_chunk)
    parser.add_argument("--key-chunk", type=int, default=defaults.key_chunk)
    parser.add_argument("--dense-max-n", type=int, default=5000, help="also run the dense reference up to this N")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dim is None:
        from flava.model.config import preset

        args.dim = preset(args.preset).projection_dim
    if args.child:
        print(json.dumps(child(args)))
        return

    results = []
    for n in args.sizes:
        cmd = [__file__, "--child", "--n", str(n), "--captions", str(args.captions), "--dim", str(args.dim),
               "--noise", str(args.noise), "--query-chunk", str(args.query_chunk), "--key-chunk",
               str(args.key_chunk), "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed)]
        if n <= args.dense_max_n:
            cmd.append("--dense")
        res = run_child(cmd, args.timeout)
        results.append(res)
        print(f"N={n}: {res['seconds']:.2f}s, scoring peak {mib(res['scoring_peak_bytes'])}", file=sys.stderr)
    rows = [
        [r["n"], r["captions"], r["dim"], f"{r['seconds']:.2f}", mib(r["scoring_peak_bytes"]),
         mib(r["embedding_bytes"]), mib(r["dense_matrix_bytes"]),
         f"{r['dense_seconds']:.2f}" if "dense_seconds" in r else "-",
         mib(r["dense_peak_bytes"]) if "dense_peak_bytes" in r else "-",
         str(r.get("dense_agrees", "-")), f"{r['recall']['i2t_r1']:.3f}", f"{r['recall']['t2i_r1']:.3f}"]
        for r in results
    ]
    print(f"device {results[0]['device']}, threads {results[0]['threads']}, query_chunk {args.query_chunk}, "
          f"key_chunk {args.key_chunk}")
    print(table(["N", "captions", "dim", "chunked s", "chunked peak", "embeddings", "full matrix would be",
                 "dense s", "dense peak", "same recall", "i2t R@1", "t2i R@1"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
