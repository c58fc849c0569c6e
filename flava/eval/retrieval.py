"""Zero-shot image<->text retrieval with Recall@K (Flickr30K / COCO protocol: several captions per image).

Scoring is chunked: queries are processed ``query_chunk`` at a time against keys ``key_chunk`` at a time, and only
a running top-K per query is kept. Peak memory is ``query_chunk * key_chunk`` similarities plus the running
``(num_queries, K)`` indices, so N images x 5N captions never materialises the N x 5N matrix.

Protocol: image->text counts a hit at K when ANY of the image's captions is among its K nearest captions;
text->image counts a hit when the caption's own image is among its K nearest images.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from flava.eval.datasets import RetrievalSet, load_retrieval
from flava.eval.features import encode_images, encode_texts


def chunked_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    query_chunk: int = 1024,
    key_chunk: int = 16384,
) -> torch.Tensor:
    """Indices ``(Q, k)`` of the ``k`` keys with the largest dot product for every query, best first.

    ``queries`` (Q, P) and ``keys`` (K, P) should already be L2-normalised for cosine similarity. The result lives
    on the CPU; the matmuls run on ``queries.device``.
    """
    if queries.ndim != 2 or keys.ndim != 2:
        raise ValueError(f"queries and keys must be 2-D, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"embedding dims differ: queries {queries.shape[1]} vs keys {keys.shape[1]}")
    if query_chunk < 1 or key_chunk < 1:
        raise ValueError("query_chunk and key_chunk must be >= 1")
    num_keys = keys.shape[0]
    if not 1 <= k <= num_keys:
        raise ValueError(f"k={k} must be between 1 and the number of keys ({num_keys})")
    device = queries.device
    out = torch.empty((queries.shape[0], k), dtype=torch.long)
    for qs in range(0, queries.shape[0], query_chunk):
        q = queries[qs : qs + query_chunk]
        best_scores = torch.full((q.shape[0], k), -math.inf, device=device, dtype=q.dtype)
        best_idx = torch.zeros((q.shape[0], k), device=device, dtype=torch.long)
        for ks in range(0, num_keys, key_chunk):
            block = q @ keys[ks : ks + key_chunk].to(device, q.dtype).T  # (q_chunk, k_chunk)
            kk = min(k, block.shape[1])
            scores, idx = block.topk(kk, dim=1)
            del block
            # Merge the block's top-k with the running top-k: (q_chunk, k + kk) -> (q_chunk, k).
            merged_scores = torch.cat([best_scores, scores], dim=1)
            merged_idx = torch.cat([best_idx, idx + ks], dim=1)
            best_scores, pos = merged_scores.topk(k, dim=1)
            best_idx = merged_idx.gather(1, pos)
        out[qs : qs + q.shape[0]] = best_idx.cpu()
    return out


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def recall_curves(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    max_k: int,
    *,
    query_chunk: int = 1024,
    key_chunk: int = 16384,
) -> dict[str, list[float]]:
    """Recall@1..max_k for both directions (capped by the number of candidates). Used for ks and curves."""
    if image_emb.ndim != 2 or text_emb.ndim != 2:
        raise ValueError("image_emb and text_emb must be 2-D (N, P) / (M, P)")
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long).cpu()
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}")
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image holds image indices outside [0, {num_images})")
    if torch.bincount(text_to_image, minlength=num_images).min() == 0:
        raise ValueError("every image needs at least one caption")
    chunks = {"query_chunk": query_chunk, "key_chunk": key_chunk}

    # Two passes, each direction as rows: on CPU a row-wise topk is several times faster than a column-wise one
    # over the same block, which outweighs computing each similarity block twice.
    top_texts = chunked_topk(image_emb, text_emb, min(max_k, num_texts), **chunks)  # (N, k)
    top_images = chunked_topk(text_emb, image_emb, min(max_k, num_images), **chunks)  # (M, k)
    i2t_match = text_to_image[top_texts] == torch.arange(num_images)[:, None]
    t2i_match = top_images == text_to_image[:, None]

    def curve(match: torch.Tensor) -> list[float]:
        return (torch.cumsum(match.int(), dim=1) > 0).float().mean(dim=0).tolist()

    return {"i2t": curve(i2t_match), "t2i": curve(t2i_match)}


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    query_chunk: int = 1024,
    key_chunk: int = 16384,
) -> dict[str, float]:
    """``{"i2t_r1": ..., "t2i_r1": ..., ..., "mean_recall": ...}`` for L2-normalised embeddings.

    ``text_to_image[j]`` is the index of the image caption ``j`` describes. K larger than the number of candidates
    saturates at that number (recall 1.0).
    """
    ks = _check_ks(ks)
    curves = recall_curves(image_emb, text_emb, text_to_image, ks[-1], query_chunk=query_chunk, key_chunk=key_chunk)
    return recall_from_curves(curves, ks)


def recall_from_curves(curves: dict[str, list[float]], ks: Sequence[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for direction in ("i2t", "t2i"):
        curve = curves[direction]
        for k in ks:
            out[f"{direction}_r{k}"] = curve[min(k, len(curve)) - 1]
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def chance_recall(num_images: int, captions_per_image: Sequence[int], ks: Sequence[int]) -> dict[str, float]:
    """Expected Recall@K of a random ranking, same keys as :func:`retrieval_recall`.

    image->text: 1 - C(M - c, K) / C(M, K) averaged over images with c captions each (M captions in all);
    text->image: K / N.
    """
    ks = _check_ks(ks)
    num_texts = sum(captions_per_image)
    if num_images < 1 or len(captions_per_image) != num_images or num_texts < 1:
        raise ValueError("chance_recall needs one caption count per image and at least one caption")
    out: dict[str, float] = {}
    for k in ks:
        kk = min(k, num_texts)
        miss = [_hypergeom_miss(num_texts, c, kk) for c in captions_per_image]
        out[f"i2t_r{k}"] = 1.0 - sum(miss) / num_images
    for k in ks:
        out[f"t2i_r{k}"] = min(k, num_images) / num_images
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _hypergeom_miss(total: int, relevant: int, draws: int) -> float:
    """P(no relevant item among ``draws`` drawn without replacement): prod_{i<draws} (total-relevant-i)/(total-i)."""
    p = 1.0
    for i in range(draws):
        if total - relevant - i <= 0:
            return 0.0
        p *= (total - relevant - i) / (total - i)
    return p


def flatten_captions(rows: Sequence[dict[str, Any]]) -> tuple[list[str], torch.Tensor]:
    """Manifest rows ``{"image", "captions": [...]}`` -> (all captions, ``text_to_image`` indices)."""
    texts: list[str] = []
    owners: list[int] = []
    for i, row in enumerate(rows):
        captions = row.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"retrieval row {i} ({row.get('image')!r}) needs a non-empty list of string captions")
        texts.extend(captions)
        owners.extend([i] * len(captions))
    return texts, torch.tensor(owners, dtype=torch.long)


def evaluate_retrieval(
    model: torch.nn.Module,
    tokenizer,
    eval_root,
    rcfg,
    *,
    transform,
    batch_size: int,
    device: torch.device | str,
    max_length: int,
    split: str = "test",
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Encode ``retrieval/{split}.jsonl`` with the model -> (recall metrics, recall curves, chance metrics).

    ``rcfg`` is :class:`flava.eval.config.RetrievalConfig` (ks, chunk sizes, curve length).
    """
    return evaluate_retrieval_set(
        model, tokenizer, load_retrieval(eval_root, split), rcfg, transform=transform, batch_size=batch_size,
        device=device, max_length=max_length,
    )


def evaluate_retrieval_set(
    model: torch.nn.Module,
    tokenizer,
    data: RetrievalSet,
    rcfg,
    *,
    transform,
    batch_size: int,
    device: torch.device | str,
    max_length: int,
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """:func:`evaluate_retrieval` for a set already in memory (e.g. a Karpathy split)."""
    texts, owners = flatten_captions([{"image": i, "captions": c} for i, c in zip(data.images, data.captions)])
    image_emb = encode_images(model, data.images, transform, batch_size=batch_size, device=device)
    text_emb = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device, max_length=max_length)
    max_k = max(rcfg.curve_max_k, max(rcfg.ks))
    device = torch.device(device)
    curves = recall_curves(
        image_emb.to(device), text_emb.to(device), owners, max_k, query_chunk=rcfg.query_chunk, key_chunk=rcfg.key_chunk
    )
    chance = chance_recall(len(data.images), [len(c) for c in data.captions], rcfg.ks)
    return recall_from_curves(curves, rcfg.ks), curves, chance
