"""``flava data fit``: the text tokenizer and the image codebook that the pretraining stages need.

- Tokenizer: a WordPiece vocabulary fit on the validated text of the configured corpora (``data.tokenizer``), or a
  pretrained tokenizer copied from a local directory (``data.tokenizer.pretrained_dir``, e.g. BERT's, or a
  transformers FLAVA checkpoint directory, of which only the tokenizer files are written).
- Codebook (MIM targets): ``KMeansCodebook`` fit on a seeded sample of validated images, transformed exactly as
  the loader transforms them (the model preset's image size, ``data.loader`` normalisation, no augmentation) with
  the preset's patch size; or a DALL-E dVAE copied from ``data.codebook.dalle_dir`` (a ``FlavaImageCodebook``
  directory, or a transformers FLAVA checkpoint directory holding ``image_codebook.*``).

Writes ``paths.artifacts/tokenizer/``, ``paths.artifacts/codebook/`` and ``paths.artifacts/fit.json``.
Deterministic for ``cfg.seed``.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flava.data.captions import row_captions
from flava.data.shards import read_manifest, read_row_image
from flava.data.tokenizer import fit_wordpiece, load_tokenizer
from flava.data.transforms import decode_image, model_image_geometry, transform_from_config
from flava.model.codebook import DalleCodebook, KMeansCodebook, load_codebook
from flava.model.hf import is_transformers_checkpoint, load_transformers_codebook
from flava.tracking.runs import stage_run

if TYPE_CHECKING:
    from flava.config import PipelineConfig

log = logging.getLogger(__name__)


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def fit_tokenizer(cfg: "PipelineConfig", out_dir: Path) -> dict[str, Any]:
    tc = cfg.data.tokenizer
    _fresh_dir(out_dir)
    if tc.pretrained_dir:
        source = Path(tc.pretrained_dir)
        tok = load_tokenizer(source)  # fails readably if it is not a tokenizer directory
        if is_transformers_checkpoint(source):  # a whole FLAVA checkpoint: its tokenizer files, not its weights
            tok.save_pretrained(str(out_dir))
        else:
            shutil.copytree(source, out_dir, dirs_exist_ok=True)
        tok = load_tokenizer(out_dir)
        return {"tokenizer_source": f"pretrained:{source}", "vocab_size": len(tok), "fit_texts": 0}
    texts: list[str] = []
    for corpus in tc.fit_corpora:
        for row in read_manifest(Path(cfg.paths.validated) / f"{corpus}.jsonl"):
            captions = row_captions(row)  # a multi-caption pair: every caption is fitting text
            for text in captions if captions is not None else [row.get("text", row.get("caption"))]:
                if isinstance(text, str) and text.strip():
                    texts.append(text)
    if tc.max_fit_texts is not None:
        texts = texts[: tc.max_fit_texts]
    if not texts:
        raise ValueError(f"no texts to fit the tokenizer on in {tc.fit_corpora} under {cfg.paths.validated}")
    tok = fit_wordpiece(texts, tc.vocab_size, out_dir, min_frequency=tc.min_frequency, lowercase=tc.lowercase,
                        model_max_length=tc.max_length)
    return {"tokenizer_source": "wordpiece", "vocab_size": len(tok), "fit_texts": len(texts)}


def sample_pixels(cfg: "PipelineConfig") -> torch.Tensor:
    """A seeded sample of validated images as the loader would see them: (N, 3, H, W) normalised."""
    cc = cfg.data.codebook
    rows: list[tuple[dict[str, Any], Path]] = []
    for corpus in cc.corpora:
        manifest = Path(cfg.paths.validated) / f"{corpus}.jsonl"
        rows += [(r, manifest.parent) for r in read_manifest(manifest) if r.get("image")]
    if not rows:
        raise ValueError(f"no images to fit the codebook on in {cc.corpora} under {cfg.paths.validated}")
    chosen = random.Random(f"{cfg.seed}:codebook").sample(rows, min(cc.sample_images, len(rows)))
    transform = transform_from_config(cfg, train=False)
    # as the shard stage reads them: from the source or validation's pack, checked against validation's SHA-256
    pixels = [transform(decode_image(read_row_image(row, base, cfg.data.ingest.s3)[1])) for row, base in chosen]
    return torch.stack(pixels)


def fit_codebook(cfg: "PipelineConfig", out_dir: Path) -> dict[str, Any]:
    cc = cfg.data.codebook
    image_size, patch_size = model_image_geometry(cfg)
    _fresh_dir(out_dir)
    if cc.kind == "dalle":
        source = Path(cc.dalle_dir)
        # A FlavaImageCodebook directory, or a whole transformers FLAVA checkpoint holding image_codebook.*
        codebook = load_transformers_codebook(source) if is_transformers_checkpoint(source) else \
            DalleCodebook.load(source)
        codebook.save(out_dir)
        return {"codebook_kind": "dalle", "codebook_size": codebook.num_codes, "codebook_images": 0,
                "codebook_source": str(cc.dalle_dir)}
    pixels = sample_pixels(cfg)
    codebook = KMeansCodebook.fit(pixels, num_codes=cc.num_codes, patch_size=patch_size, iters=cc.iters,
                                  seed=cfg.seed, features=cc.features, hog_bins=cc.hog_bins, hog_cells=cc.hog_cells)
    codebook.save(out_dir)
    loaded = load_codebook(out_dir)
    usage = torch.bincount(loaded(pixels).flatten(), minlength=loaded.num_codes)
    return {
        "codebook_kind": "kmeans", "codebook_features": cc.features, "codebook_size": codebook.num_codes,
        "codebook_images": int(pixels.shape[0]),
        "codebook_inertia": codebook.inertia, "codebook_codes_used": int((usage > 0).sum()),
        "image_size": image_size, "patch_size": patch_size,
    }


def run_fit(cfg: "PipelineConfig") -> dict[str, Any]:
    """Stage function: fit (or copy) the tokenizer and the codebook; write and return ``fit.json`` (also the
    metrics and an artifact of its MLflow run)."""
    with stage_run(cfg, "fit") as run:
        metrics, seconds = _fit(cfg)
        run.log_metrics({**metrics, **seconds})
        run.log_artifact(Path(cfg.paths.artifacts) / "fit.json")
    return metrics


def _fit(cfg: "PipelineConfig") -> tuple[dict[str, Any], dict[str, float]]:
    """-> (what was fitted, written to ``fit.json``; how long each part took, for MLflow only: a metrics file
    holds deterministic numbers, so a re-run with the same inputs writes the same bytes)."""
    artifacts = Path(cfg.paths.artifacts)
    metrics: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for part, fit in (("tokenizer", fit_tokenizer), ("codebook", fit_codebook)):
        start = time.perf_counter()
        metrics.update(fit(cfg, artifacts / part))
        seconds[f"{part}_seconds"] = round(time.perf_counter() - start, 3)
    (artifacts / "fit.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    log.info("fit: vocab %d, codebook %d codes", metrics["vocab_size"], metrics["codebook_size"])
    return metrics, seconds
