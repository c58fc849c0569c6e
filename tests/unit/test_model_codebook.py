"""Image codebooks: k-means fit/save/load and codes per patch; DALL-E dVAE parity with transformers' layout."""
from __future__ import annotations

import json

import pytest
import torch

from flava.model import FlavaForPretraining, preset
from flava.model.codebook import DalleCodebook, KMeansCodebook, hog_patches, load_codebook


def clustered_images(n: int = 24, size: int = 32, patch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose patches are flat colours drawn from 4 prototypes (+ small noise), and the prototype ids."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.tensor([[2.0, -2, 0], [-2, 2, 0], [0, 0, 2], [-1, -1, -2]])
    grid = size // patch
    ids = torch.randint(0, 4, (n, grid, grid), generator=g)
    colours = prototypes[ids].permute(0, 3, 1, 2)  # (n, 3, grid, grid)
    images = colours.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return images + 0.05 * torch.randn(images.shape, generator=g), ids.flatten(1)


def test_kmeans_recovers_planted_clusters_and_is_seeded():
    images, ids = clustered_images()
    codebook = KMeansCodebook.fit(images, num_codes=4, patch_size=8, iters=20, seed=0)
    codes = codebook(images)
    assert codes.shape == (24, 16) and codes.dtype == torch.long and codebook.num_codes == 4
    # the clustering equals the planted one up to a relabelling
    mapping = {}
    for c, i in zip(codes.flatten().tolist(), ids.flatten().tolist()):
        assert mapping.setdefault(c, i) == i
    assert len(set(mapping.values())) == 4
    again = KMeansCodebook.fit(images, num_codes=4, patch_size=8, iters=20, seed=0)
    assert torch.equal(again.centroids, codebook.centroids)
    assert codebook.inertia == pytest.approx(192 * 0.05**2, rel=0.2)  # only the planted noise is left


def test_kmeans_save_load_roundtrip(tmp_path):
    images, _ = clustered_images()
    codebook = KMeansCodebook.fit(images, num_codes=8, patch_size=8, iters=5, seed=1)
    codebook.save(tmp_path / "cb")
    assert json.loads((tmp_path / "cb" / "codebook.json").read_text())["kind"] == "kmeans"
    loaded = load_codebook(tmp_path / "cb")
    assert isinstance(loaded, KMeansCodebook)
    assert torch.equal(loaded(images), codebook(images))
    assert not list((tmp_path / "cb").glob("*.bin")) and not list((tmp_path / "cb").glob("*.pt"))


def test_kmeans_rejects_bad_input():
    images, _ = clustered_images(n=1)
    with pytest.raises(ValueError, match="at least num_codes"):
        KMeansCodebook.fit(images, num_codes=64, patch_size=8, iters=2, seed=0)
    codebook = KMeansCodebook.fit(images, num_codes=4, patch_size=8, iters=2, seed=0)
    with pytest.raises(ValueError, match="patch_size"):
        codebook(torch.randn(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        codebook(torch.randn(1, 1, 32, 32))


def test_model_takes_mim_targets_from_a_kmeans_codebook():
    cfg = preset("tiny", {"codebook_size": 4})
    images, ids = clustered_images(n=4)
    codebook = KMeansCodebook.fit(images, num_codes=4, patch_size=8, iters=10, seed=0)
    model = FlavaForPretraining(cfg, codebook=codebook)
    assert "codebook" not in dict(model.named_children())
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :6] = True
    out = model({"kind": "image", "pixel_values": images, "image_mask": mask})
    assert set(out.losses) == {"mim"} and torch.isfinite(out.loss)


def tiny_hf_codebook(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.FlavaImageCodebookConfig(hidden_size=8, vocab_size=32, num_blocks_per_group=1)
    torch.manual_seed(0)
    hf = transformers.FlavaImageCodebook(config).eval()
    with torch.no_grad():  # transformers initialises biases to 0; make them matter
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf_codebook")
    return hf


def test_dalle_codebook_matches_transformers(tmp_path):
    hf = tiny_hf_codebook(tmp_path)
    ours = load_codebook(tmp_path / "hf_codebook")  # bare transformers directory, no codebook.json
    assert isinstance(ours, DalleCodebook) and ours.num_codes == 32
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf.get_codebook_indices(pixels).flatten(1)
    assert torch.equal(ours(pixels), expected)
    assert ours(pixels).shape == (2, 16)
    ours.save(tmp_path / "ours")
    again = load_codebook(tmp_path / "ours")
    assert torch.equal(again(pixels), expected)
    assert all(not p.requires_grad for p in again.parameters())


def test_dalle_codebook_stays_out_of_the_model_state(tmp_path):
    tiny_hf_codebook(tmp_path)
    codebook = DalleCodebook.load(tmp_path / "hf_codebook")
    model = FlavaForPretraining(preset("tiny"), codebook=codebook)
    assert model.codebook is codebook
    assert not any(k.startswith("codebook") for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())


def test_load_codebook_refuses_unknown_directories(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_codebook(tmp_path)
    (tmp_path / "codebook.json").write_text(json.dumps({"kind": "vqgan"}))
    with pytest.raises(ValueError, match="vqgan"):
        load_codebook(tmp_path)


def _edge_image(size: int = 16, vertical: bool = True) -> torch.Tensor:
    """One image, left (or top) half -1, the rest +1, in all three channels: one straight edge."""
    img = -torch.ones(1, 3, size, size)
    if vertical:
        img[..., size // 2:] = 1.0
    else:
        img[..., size // 2:, :] = 1.0
    return img


def test_hog_descriptors_bin_an_edge_by_its_direction_and_leave_flat_patches_at_zero():
    bins, cells = 4, 2  # bins of 45 degrees: 0 = horizontal gradient (a vertical edge), 2 = vertical gradient
    d = hog_patches(_edge_image(vertical=True), patch_size=8, bins=bins, cells=cells)  # (1, 4 patches, 16)
    assert d.shape == (1, 4, bins * cells**2)
    per_bin = d[0].reshape(4, bins, cells * cells).sum(-1)  # (patches, bins)
    # the edge at x = 8 runs down the right-hand column of patches 0 and 2 and the left of 1 and 3
    assert bool((per_bin[:, 0] > 0).all()) and float(per_bin[:, 1:].abs().sum()) == 0.0
    d = hog_patches(_edge_image(vertical=False), patch_size=8, bins=bins, cells=cells)
    per_bin = d[0].reshape(4, bins, cells * cells).sum(-1)
    assert bool((per_bin[:, 2] > 0).all()) and float(per_bin[:, [0, 1, 3]].abs().sum()) == 0.0
    flat = hog_patches(torch.full((1, 3, 16, 16), 0.7), patch_size=8, bins=bins, cells=cells)
    assert float(flat.abs().sum()) == 0.0
    # the colour of the two sides does not matter, only the direction of the change
    recoloured = _edge_image(vertical=True) * torch.tensor([0.3, -2.0, 1.0])[None, :, None, None]
    per_bin = hog_patches(recoloured, 8, bins, cells)[0].reshape(4, bins, cells * cells).sum(-1)
    assert bool((per_bin[:, 0] > 0).all()) and float(per_bin[:, 1:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"patch_size \(8\) must be a multiple of the HOG cells per side \(3\)"):
        hog_patches(_edge_image(), 8, bins, 3)


def test_hog_codebook_codes_edges_not_colours_and_round_trips(tmp_path):
    """Codes of a HOG codebook separate a vertical from a horizontal edge and give a red and a blue flat patch
    the same code; save/load keeps the descriptor; a codebook saved before descriptors were a choice loads as
    pixels."""
    images = torch.cat([_edge_image(vertical=True), _edge_image(vertical=False), torch.zeros(1, 3, 16, 16)])
    codebook = KMeansCodebook.fit(images, num_codes=5, patch_size=8, iters=10, seed=0, features="hog",
                                  hog_bins=4, hog_cells=2)
    assert codebook.centroids.shape == (5, 16) and codebook.features == "hog"  # 5 distinct patches
    codes = codebook(images)  # (3 images, 4 patches)
    assert len({int(codes[0, 0]), int(codes[1, 0]), int(codes[2, 0])}) == 3
    red, blue = torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16)
    red[:, 0], blue[:, 2] = 2.0, 2.0
    assert torch.equal(codebook(red), codebook(blue)) and torch.equal(codebook(red), codes[2:3])
    codebook.save(tmp_path / "cb")
    assert json.loads((tmp_path / "cb" / "codebook.json").read_text())["features"] == "hog"
    loaded = load_codebook(tmp_path / "cb")
    assert (loaded.features, loaded.hog_bins, loaded.hog_cells) == ("hog", 4, 2)
    assert torch.equal(loaded(images), codes)
    pixels_cb = KMeansCodebook.fit(clustered_images()[0], num_codes=4, patch_size=8, iters=5, seed=0)
    pixels_cb.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "codebook.json").read_text())
    for key in ("features", "hog_bins", "hog_cells"):
        del meta[key]
    (tmp_path / "old" / "codebook.json").write_text(json.dumps(meta))
    assert load_codebook(tmp_path / "old").features == "pixels"
    with pytest.raises(ValueError, match=r"expected \(num_codes, 16\) for hog descriptors"):
        KMeansCodebook(torch.zeros(4, 192), 8, features="hog", hog_bins=4, hog_cells=2)
