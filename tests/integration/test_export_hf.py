"""export_hf: our tiny model -> a transformers FLAVA directory that transformers loads and that computes the same
embeddings as our model (fp32, 1e-4), with a processor and tokenizer that reproduce our inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from flava.data.config import DataConfig  # noqa: E402
from flava.model import FlavaForPretraining, preset  # noqa: E402
from flava.model.codebook import KMeansCodebook  # noqa: E402
from flava.export import export_hf  # noqa: E402
from flava.model.io import save_model  # noqa: E402

TOL = 1e-4
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "left", "of", "right", "above", "below",
         "the", "small", "big"]
CAPTIONS = ["a red circle left of a blue square", "the big green triangle", "a small square above the circle"]


def make_tokenizer(directory):
    """A handmade BERT WordPiece tokenizer (specials, whole words, a few continuation pieces), saved in the
    ``BertTokenizerFast.save_pretrained`` layout."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS + ["##s", "##er", "##est"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(directory))
    return len(vocab)


def perturb(model: FlavaForPretraining, seed: int) -> None:
    """Random init leaves biases, LayerNorms, CLS tokens and the mm CLS at 0/1; jitter every tensor so a
    transposed or swapped weight in the export could not go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    vocab_size = make_tokenizer(root / "tokenizer")
    cfg = preset("tiny", {"text": {"vocab_size": vocab_size}})
    torch.manual_seed(0)
    images = torch.randn(16, 3, cfg.image.image_size, cfg.image.image_size)
    codebook = KMeansCodebook.fit(images, num_codes=cfg.codebook_size, patch_size=cfg.image.patch_size, iters=3,
                                  seed=0)
    model = FlavaForPretraining(cfg, codebook=codebook)
    perturb(model, 1)
    save_model(model, root / "model")
    out = export_hf(root / "model", root / "hf", tokenizer_dir=root / "tokenizer", model_card="# tiny FLAVA\n")
    return {"root": root, "out": out, "model": model.eval(), "cfg": cfg}


def _inputs(cfg, tokenizer):
    g = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(3, 3, cfg.image.image_size, cfg.image.image_size, generator=g)
    text = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    return pixel_values, text["input_ids"], text["attention_mask"]


def test_directory_layout_and_card(exported):
    out = exported["out"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
            "preprocessor_config.json", "README.md", "codebook"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)  # safetensors only
    assert (out / "README.md").read_text() == "# tiny FLAVA\n"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "flava" and config["architectures"] == ["FlavaForPreTraining"]
    assert config["init_codebook"] is False  # k-means codebook: copied beside, not inside transformers' model
    assert not list(out.parent.glob(".hf.*"))  # no staging directory left behind


def test_transformers_loads_both_classes_without_missing_weights(exported):
    out = exported["out"]
    pretraining, info = transformers.FlavaForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    base, info = transformers.FlavaModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # Only the pretraining heads are unexpected for the bare model.
    assert all(k.split(".")[0].endswith("_head") for k in info["unexpected_keys"]), info["unexpected_keys"]


def test_embeddings_match_ours(exported):
    out, ours, cfg = exported["out"], exported["model"], exported["cfg"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    pixel_values, input_ids, attention_mask = _inputs(cfg, tokenizer)
    assert int(attention_mask.min()) == 0  # the captions differ in length: padding is exercised
    with torch.no_grad():
        ours_image = ours.encode_image(pixel_values)
        ours_text = ours.encode_text(input_ids, attention_mask)
        ours_image_cls = ours.image_features(pixel_values)
        ours_text_cls = ours.text_features(input_ids, attention_mask)
        ours_mm = ours.multimodal_features(pixel_values, input_ids, attention_mask)
        ours_itm = ours.itm_logits(pixel_values, input_ids, attention_mask)

    for cls in (transformers.FlavaModel, transformers.FlavaForPreTraining):
        model = cls.from_pretrained(str(out)).eval()
        flava = model if cls is transformers.FlavaModel else model.flava
        with torch.no_grad():
            image = flava.get_image_features(pixel_values=pixel_values).pooler_output[:, 0]
            text = flava.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output[:, 0]
            both = flava(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        torch.testing.assert_close(torch.nn.functional.normalize(image, dim=-1), ours_image, atol=TOL, rtol=0)
        torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1), ours_text, atol=TOL, rtol=0)
        torch.testing.assert_close(both.image_embeddings[:, 0], ours_image_cls, atol=TOL, rtol=0)
        torch.testing.assert_close(both.text_embeddings[:, 0], ours_text_cls, atol=TOL, rtol=0)
        torch.testing.assert_close(both.multimodal_embeddings[:, 0], ours_mm, atol=TOL, rtol=0)
        if cls is transformers.FlavaForPreTraining:
            with torch.no_grad():
                itm = model.itm_head(both.multimodal_embeddings)
            torch.testing.assert_close(itm, ours_itm, atol=TOL, rtol=0)


def test_processor_reproduces_our_inputs(exported):
    out, cfg = exported["out"], exported["cfg"]
    processor = transformers.AutoProcessor.from_pretrained(str(out))
    assert isinstance(processor, transformers.FlavaProcessor)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.model_max_length == cfg.text.max_position_embeddings
    ids = tokenizer(["A red circle"])["input_ids"][0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]

    size = cfg.image.image_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    feats = processor(images=[Image.fromarray(pixels)], text=["a red circle"], return_tensors="pt",
                      return_image_mask=True, return_codebook_pixels=True)
    loader = DataConfig().loader
    mean, std = torch.tensor(loader.mean).view(3, 1, 1), torch.tensor(loader.std).view(3, 1, 1)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(feats["pixel_values"][0], expected, atol=1e-5, rtol=0)
    # The k-means codebook reads the model's own pixels.
    torch.testing.assert_close(feats["codebook_pixel_values"][0], expected, atol=1e-5, rtol=0)
    grid = cfg.image.grid_size
    assert tuple(feats["bool_masked_pos"].shape) == (1, grid, grid)
    assert int(feats["bool_masked_pos"].sum()) >= 1

    # A non-square image: shorter side resized to the model's size, then centre-cropped, as our eval transform.
    wide = processor(images=[Image.fromarray(rng.integers(0, 256, (size, 2 * size, 3), dtype=np.uint8))],
                     return_tensors="pt")
    assert tuple(wide["pixel_values"].shape) == (1, 3, size, size)


def test_refuses_to_replace_a_foreign_directory(exported, tmp_path):
    root = exported["root"]
    foreign = tmp_path / "not-an-export"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_hf(root / "model", foreign, tokenizer_dir=root / "tokenizer")
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_rejects_a_tokenizer_larger_than_the_vocab(exported, tmp_path):
    root = exported["root"]
    cfg = preset("tiny", {"text": {"vocab_size": 8}})
    save_model(FlavaForPretraining(cfg), tmp_path / "model")
    with pytest.raises(ValueError, match="vocab_size"):
        export_hf(tmp_path / "model", tmp_path / "hf", tokenizer_dir=root / "tokenizer")
    assert not (tmp_path / "hf").exists()


def test_reexport_replaces_previous_export_and_writes_default_card(exported):
    root = exported["root"]
    first = export_hf(root / "model", root / "again", tokenizer_dir=root / "tokenizer", model_card="old card")
    (first / "stale.txt").write_text("from the previous export")
    out = export_hf(root / "model", root / "again", tokenizer_dir=root / "tokenizer")
    assert out == first and not (out / "stale.txt").exists()
    card = (out / "README.md").read_text()
    assert "FLAVA" in card and "codebook/" in card and "old card" not in card


def test_dalle_codebook_travels_inside_transformers_model(exported, tmp_path):
    """A DALL-E codebook becomes transformers' ``image_codebook`` (same codes), and the processor gives it its
    own view: 8x the patch grid, unnormalised, mapped into [eps, 1 - eps]."""
    from flava.model.codebook import DalleCodebook

    root, cfg = exported["root"], exported["cfg"]
    torch.manual_seed(3)
    codebook = DalleCodebook(hidden_size=8, num_blocks_per_group=1, vocab_size=cfg.codebook_size)
    perturb(codebook, 4)
    model = FlavaForPretraining(cfg, codebook=codebook)
    save_model(model, tmp_path / "model")
    out = export_hf(tmp_path / "model", tmp_path / "hf", tokenizer_dir=root / "tokenizer")
    assert not (out / "codebook").exists()
    hf_model, info = transformers.FlavaForPreTraining.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert hf_model.config.init_codebook and hf_model.image_codebook is not None

    side = cfg.image.grid_size * codebook.downsample
    processor = transformers.FlavaProcessor.from_pretrained(str(out))
    pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    feats = processor(images=[Image.fromarray(pixels)], return_codebook_pixels=True, return_tensors="pt")
    view = feats["codebook_pixel_values"]
    assert tuple(view.shape) == (1, 3, side, side)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255 * 0.8 + 0.1
    torch.testing.assert_close(view, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        theirs = hf_model.image_codebook.get_codebook_indices(view)
    assert torch.equal(theirs.flatten(1), codebook(view))
    assert theirs.flatten(1).unique().numel() > 1  # a non-degenerate codebook, so the comparison means something
