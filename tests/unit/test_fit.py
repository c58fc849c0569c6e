"""run_fit: WordPiece + k-means codebook from validated data (deterministic), or copies of local pretrained ones."""
from __future__ import annotations

import json

import pytest
import torch

from flava.data.fit import run_fit
from flava.data.tokenizer import load_tokenizer
from flava.model.codebook import DalleCodebook, KMeansCodebook, load_codebook
from tests.unit.shard_fixtures import config, make_validated


def cfg_for(root, **data):
    return config(root, **({"tokenizer": {"vocab_size": 150}, "codebook": {"num_codes": 16, "iters": 5}} | data))


def test_fit_writes_tokenizer_codebook_and_report(tmp_path):
    make_validated(tmp_path, n_pairs=10, n_images=8, n_text=12)
    cfg = cfg_for(tmp_path)
    metrics = run_fit(cfg)
    art = tmp_path / "artifacts"
    tok = load_tokenizer(art / "tokenizer")
    assert metrics["vocab_size"] == len(tok) <= 150 and metrics["fit_texts"] == 22
    assert tok.unk_token_id not in tok("a purple star left of a green circle")["input_ids"]
    cb = load_codebook(art / "codebook")
    assert isinstance(cb, KMeansCodebook) and cb.num_codes == 16
    image_size = cfg.model.resolved.image.image_size
    assert cb.patch_size == cfg.model.resolved.image.patch_size == metrics["patch_size"]
    assert cb(torch.zeros(1, 3, image_size, image_size)).shape == (1, (image_size // cb.patch_size) ** 2)
    assert metrics["codebook_images"] == 18 and metrics["codebook_codes_used"] > 1
    assert json.loads((art / "fit.json").read_text())["codebook_size"] == 16


def test_fit_is_deterministic(tmp_path):
    make_validated(tmp_path, n_pairs=8, n_images=8, n_text=8)
    run_fit(cfg_for(tmp_path))
    art = tmp_path / "artifacts"
    first = {p: (art / p).read_bytes() for p in ("tokenizer/tokenizer.json", "codebook/codebook.safetensors")}
    run_fit(cfg_for(tmp_path))
    assert all((art / p).read_bytes() == b for p, b in first.items())


def test_fit_a_hog_codebook_when_asked(tmp_path):
    """data.codebook.features: hog fits the k-means codebook on gradient-orientation histograms of the same
    sampled patches; the saved codebook describes patches that way, and the report says so."""
    make_validated(tmp_path, n_pairs=6, n_images=6, n_text=4)
    metrics = run_fit(cfg_for(tmp_path, codebook={"num_codes": 16, "iters": 5, "features": "hog", "hog_bins": 6}))
    cb = load_codebook(tmp_path / "artifacts" / "codebook")
    assert (cb.features, cb.hog_bins, cb.hog_cells) == ("hog", 6, 2) and cb.centroids.shape == (16, 6 * 2**2)
    # the fixture's images are flat colours, one per image: no edge anywhere, so every patch gets the one "flat"
    # code, where the pixel codebook tells the colours apart
    assert metrics["codebook_features"] == "hog" and metrics["codebook_codes_used"] == 1
    assert run_fit(cfg_for(tmp_path))["codebook_codes_used"] > 1


def test_copies_pretrained_tokenizer_and_dalle_codebook(tmp_path):
    from transformers import BertTokenizer

    make_validated(tmp_path, n_pairs=2, n_images=2, n_text=2)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle"]) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(str(tmp_path / "bert"))
    DalleCodebook(num_groups=2, num_blocks_per_group=1, hidden_size=8, vocab_size=12).save(tmp_path / "dalle")
    cfg = cfg_for(tmp_path, tokenizer={"pretrained_dir": str(tmp_path / "bert")},
                  codebook={"kind": "dalle", "dalle_dir": str(tmp_path / "dalle")})
    metrics = run_fit(cfg)
    assert metrics["vocab_size"] == 7 and metrics["codebook_size"] == 12 and metrics["codebook_kind"] == "dalle"
    assert load_tokenizer(tmp_path / "artifacts" / "tokenizer")("red circle")["input_ids"] == [2, 5, 6, 3]
    assert isinstance(load_codebook(tmp_path / "artifacts" / "codebook"), DalleCodebook)


def test_errors(tmp_path):
    make_validated(tmp_path, n_pairs=2, n_images=2, n_text=2)
    with pytest.raises(ValueError, match="num_codes"):  # 4 images x 16 patches < 500 codes
        run_fit(cfg_for(tmp_path, codebook={"num_codes": 500}))
    with pytest.raises(FileNotFoundError):
        run_fit(cfg_for(tmp_path, tokenizer={"pretrained_dir": str(tmp_path / "missing")}))
    with pytest.raises(ValueError, match="dalle_dir"):
        cfg_for(tmp_path, codebook={"kind": "dalle"})


def test_the_tokenizer_is_fit_on_every_caption_of_a_multi_caption_pair(tmp_path):
    make_validated(tmp_path, n_pairs=10, n_images=8, n_text=12)
    manifest = tmp_path / "validated" / "pairs.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    first = rows[0]
    rows[0] = {k: v for k, v in first.items() if k != "text"} | {
        "captions": [first["text"], "an xylophone beside a zeppelin", "a quokka under an umbrella"]}
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(tmp_path, tokenizer={"vocab_size": 300})
    metrics = run_fit(cfg)
    assert metrics["fit_texts"] == 24  # 10 pairs, one of them with 3 captions, + 12 passages
    tok = load_tokenizer(tmp_path / "artifacts" / "tokenizer")
    assert tok.unk_token_id not in tok("xylophone zeppelin quokka")["input_ids"]
