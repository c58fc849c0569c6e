"""Typed config of data preparation: synthetic generation, ingestion, validation. Owned by those stages.

Defaults are the embedded (synthetic, small) pipeline's values: ``data.generate`` writes the raw layout that
``data.ingest``'s default sources read, and ``data.validation``'s bounds accept every synthetic sample.
Paths inside ``data.ingest`` sources are relative to ``paths.raw`` unless absolute.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from flava.configbase import StrictModel
from flava.data.stream_config import S3Config


# --------------------------------------------------------------------------------------------- generate
class GenerateConfig(StrictModel):
    """The embedded synthetic world (``flava data generate``): shapes with colours, sizes, positions and
    background textures, captioned in varied phrasings. Zero-shot classes are ``"<colour> <shape>"``, so chance
    level is ``1 / (len(colours) * len(shapes))`` (1/24 with the defaults)."""

    image_size: int = Field(64, ge=16, le=1024)
    colours: list[str] = Field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"])
    shapes: list[str] = Field(default_factory=lambda: ["circle", "square", "triangle", "cross"])
    max_count: int = Field(3, ge=1, le=4)  # objects per image: 1..max_count copies of one coloured shape
    # Object radius as a fraction of the image side, per size: [one object alone, each of several in a 3x3 grid].
    # The renderer jitters it by +-10 %. Defaults: at 64 px, small grid objects are ~6 px in radius.
    object_radius: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {"small": (0.12, 0.09), "large": (0.22, 0.15)}
    )
    # sizes of the corpora
    pairs: int = Field(3000, ge=1)
    images_per_class: int = Field(40, ge=1)  # unpaired class-folder images
    text_passages: int = Field(1500, ge=1)
    text_files: int = Field(3, ge=1)
    # sizes of the evaluation splits
    zeroshot_per_class: dict[str, int] = Field(default_factory=lambda: {"train": 20, "val": 5, "test": 10})
    retrieval_images: int = Field(200, ge=1)
    retrieval_captions: int = Field(5, ge=1, le=8)
    text_cls: dict[str, int] = Field(default_factory=lambda: {"train": 800, "val": 200, "test": 400})
    vqa: dict[str, int] = Field(default_factory=lambda: {"train": 600, "val": 200, "test": 400})
    prompt_templates: list[str] = Field(
        default_factory=lambda: [
            "a photo of a {}.",
            "a picture of a {}.",
            "an image showing a {}.",
            "a drawing of a {}.",
            "a {} on a plain background.",
        ]
    )
    png_compress_level: int = Field(6, ge=0, le=9)

    @field_validator("colours", "shapes")
    @classmethod
    def _known_and_unique(cls, value: list[str], info) -> list[str]:
        from flava.data.world import COLOURS, SHAPES  # the palette and the shapes the renderer can draw

        known = COLOURS if info.field_name == "colours" else SHAPES
        unknown = [v for v in value if v not in known]
        if unknown or not value or len(set(value)) != len(value):
            raise ValueError(
                f"data.generate.{info.field_name} must be distinct names from {sorted(known)}, got {value}"
            )
        return value

    @field_validator("object_radius")
    @classmethod
    def _radii(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        from flava.data.world import SIZES  # the sizes a scene can have

        if set(value) != set(SIZES) or any(not 0 < r <= 0.5 for pair in value.values() for r in pair):
            raise ValueError(
                f"data.generate.object_radius needs exactly {list(SIZES)}, each [alone, in a grid] as fractions "
                f"of the image side in (0, 0.5], got {value}"
            )
        return value

    @field_validator("zeroshot_per_class", "text_cls", "vqa")
    @classmethod
    def _splits(cls, value: dict[str, int], info) -> dict[str, int]:
        if set(value) != {"train", "val", "test"} or any(n < 1 for n in value.values()):
            raise ValueError(f"data.generate.{info.field_name} needs positive counts for exactly train, val, test")
        return value

    @field_validator("prompt_templates")
    @classmethod
    def _templates(cls, value: list[str]) -> list[str]:
        if not value or any(t.count("{}") != 1 for t in value):
            raise ValueError("data.generate.prompt_templates must be non-empty, each with exactly one '{}'")
        return value


# --------------------------------------------------------------------------------------------- ingest
class ManifestPairs(StrictModel):
    """Image-text pairs from a table: CSV / TSV / JSONL, Parquet (one file or a folder of parts, e.g.
    img2dataset's parquet output or a Hugging Face dataset's parquet export) or Arrow (a Hugging Face
    ``datasets`` ``save_to_disk`` directory, or one ``.arrow`` file). A value of ``image_column`` is a path
    relative to the manifest's directory, an absolute path, an ``s3://bucket/key`` URI, the image's bytes
    (img2dataset's ``jpg`` column) or a Hugging Face ``Image`` struct ``{bytes, path}`` (bytes when embedded,
    else the path). Embedded bytes are written once per distinct image of each file (parquet part, Arrow file),
    named by their SHA-256, into the pack ``paths.prepared/extracted/<name>/<file number>.tar``
    (``flava.data.packs``)."""

    kind: Literal["manifest"] = "manifest"
    path: str = "pairs/captions.jsonl"
    # auto: from the file extension; a directory is Arrow when it holds a save_to_disk layout, else parquet parts
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "arrow"] = "auto"
    header: bool = True  # CSV/TSV: the first line names the columns (CC3M/CC12M as distributed have none)
    column_names: list[str] | None = None  # CSV/TSV: the columns' names (required without a header)
    pattern: str = "*.parquet"  # parquet parts when ``path`` is a directory
    split: str | None = None  # Arrow: the split of a saved DatasetDict (None: every split, in saved order)
    key_column: str | None = "key"  # None: keys are "<name>-<row index>"; else "<name>-<key>"
    image_column: str = "image"
    caption_column: str | None = "caption"
    # PMD/YFCC style: caption = description if it passes the caption filter, else title (needs caption_filter)
    title_column: str | None = None
    description_column: str | None = None
    caption_filter: bool = False
    name: str | None = None  # source name used in keys and provenance; default: the file stem

    @model_validator(mode="after")
    def _caption_source(self) -> "ManifestPairs":
        if self.caption_column is None and self.title_column is None and self.description_column is None:
            raise ValueError(f"pair source {self.path}: set caption_column or title_column/description_column")
        if not self.header and not self.column_names:
            raise ValueError(f"pair source {self.path}: header: false needs column_names (e.g. [caption, url] "
                             "for CC3M, [url, caption] for CC12M)")
        return self


class WebdatasetPairs(StrictModel):
    """Image-text pairs from existing webdataset tar shards (img2dataset / LAION / PMD style ``jpg`` + ``txt``
    [+ ``json``] members), in a local directory or under an ``s3://bucket/prefix``. With ``caption_filter`` the
    ``json`` member's title/description fields are used instead of ``txt``. The ``json`` member's
    ``provenance_fields`` (img2dataset: the source url, sha256, ...) are kept as manifest columns. Images of
    uncompressed shards are referenced in place (``<shard>#<offset>+<size>``, ``flava.data.packs``); those of
    compressed shards go into the pack ``paths.prepared/extracted/<name>/<shard number>.tar``."""

    kind: Literal["webdataset"] = "webdataset"
    path: str  # a directory holding the shards, one .tar file, or an s3://bucket/prefix
    pattern: str = "*.tar"
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    text_extension: str = "txt"
    caption_filter: bool = False
    title_field: str = "title"
    description_field: str = "description"
    provenance_fields: list[str] = Field(default_factory=lambda: ["url", "sha256", "size"])
    name: str | None = None


class CocoPairs(StrictModel):
    """COCO captions (``annotations/captions_<split>.json``: ``images`` with ``id`` and ``file_name``,
    ``annotations`` with ``image_id`` and ``caption``). One sample per image holding all its captions
    (``flava.data.captions``), so an image with five captions is stored once."""

    kind: Literal["coco"] = "coco"
    path: str  # the captions JSON
    images_dir: str  # the folder of the images' file names (e.g. train2017), relative to paths.raw
    name: str | None = None


class KarpathyPairs(StrictModel):
    """Karpathy-split captions (``dataset_coco.json``, ``dataset_flickr30k.json``: ``images[]`` with
    ``filename``, optional ``filepath``, ``split`` and ``sentences[].raw``). One sample per image holding all
    its sentences (``flava.data.captions``); images of splits outside ``splits`` are rejects (keep the test split
    out of pretraining)."""

    kind: Literal["karpathy"] = "karpathy"
    path: str
    images_dir: str  # the folder that ``filepath/filename`` is relative to, relative to paths.raw
    splits: list[str] = Field(default_factory=lambda: ["train", "restval"])
    name: str | None = None


PairSource = Annotated[Union[ManifestPairs, WebdatasetPairs, CocoPairs, KarpathyPairs], Field(discriminator="kind")]


class ClassFolderImages(StrictModel):
    """Unpaired images in the ImageNet layout: ``<path>/<class>/<image>``; the label is the folder name, or its
    name in ``class_names`` (a file under paths.raw: ``LOC_synset_mapping.txt`` lines ``<synset> <name>``, a
    JSON object ``{synset: name}``, or Keras' ``imagenet_class_index.json`` ``{index: [synset, name]}``).
    With a map, folders it does not name are rejects and the folder name is kept in ``synset``."""

    path: str = "images"
    extensions: list[str] = Field(default_factory=lambda: ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"])
    class_names: str | None = None
    name: str | None = None


class TextFiles(StrictModel):
    """Unpaired text (CCNews/BookCorpus style): ``.txt`` files (paragraphs separated by blank lines, read line
    by line; consecutive paragraphs are merged into one document until it has ``min_document_words`` words)
    and ``.jsonl`` files (one document per line, in ``jsonl_field``), split into passages."""

    path: str = "text"
    patterns: list[str] = Field(default_factory=lambda: ["*.txt", "*.jsonl"])
    jsonl_field: str = "text"
    min_document_words: int = Field(8, ge=1)
    name: str | None = None


class CaptionFilterConfig(StrictModel):
    """The PMD/YFCC caption filter: English (heuristic) and more than two words."""

    min_words: int = Field(3, ge=1)  # "more than two words"
    min_ascii_letter_fraction: float = Field(0.9, ge=0, le=1)  # of the letters, the share that are a-z/A-Z
    min_stopwords: int = Field(1, ge=0)  # common English function words the caption must contain


class IngestConfig(StrictModel):
    """Ingestion of raw corpora into per-corpus manifests (``flava data prepare``)."""

    pairs: list[PairSource] = Field(default_factory=lambda: [ManifestPairs()])
    images: list[ClassFolderImages] = Field(default_factory=lambda: [ClassFolderImages()])
    text: list[TextFiles] = Field(default_factory=lambda: [TextFiles()])
    eval_dir: str | None = "eval"  # evaluation sets under paths.raw; None: none
    max_passage_words: int = Field(64, ge=1)
    caption_filter: CaptionFilterConfig = Field(default_factory=CaptionFilterConfig)
    # boto3 access for s3:// image URIs (endpoint else $AWS_ENDPOINT_URL; credentials from the AWS chain)
    s3: S3Config = Field(default_factory=S3Config)

    @field_validator("pairs", mode="before")
    @classmethod
    def _default_kind(cls, value):
        """A pair source without ``kind`` is a manifest."""
        if isinstance(value, list):
            return [{"kind": "manifest", **v} if isinstance(v, dict) and "kind" not in v else v for v in value]
        return value


# --------------------------------------------------------------------------------------------- validate
class ValidateConfig(StrictModel):
    """Great Expectations validation (``flava data validate``). Rows failing a check are quarantined with the
    reason; images in convertible modes (CMYK, L, P, RGBA, 16-bit, ...) are normalised to RGB, EXIF-rotated,
    and written into one pack per partition, ``paths.validated/images/<corpus>/<n>.tar`` (``flava.data.packs``);
    RGB JPEGs and PNGs kept as they are (see passthrough) are not copied: their rows name the source."""

    min_accept_fraction: float = Field(0.9, ge=0, le=1)
    # captions (pairs) and passages (text)
    min_caption_words: int = Field(1, ge=1)
    max_caption_words: int = Field(128, ge=1)
    max_caption_chars: int = Field(1024, ge=1)
    truncate_captions: bool = False  # True: cut over-long captions to max_caption_words instead of rejecting
    min_text_words: int = Field(3, ge=1)
    max_text_words: int = Field(512, ge=1)
    max_text_chars: int = Field(8192, ge=1)
    # images
    min_image_side: int = Field(16, ge=1)
    max_image_side: int = Field(4096, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # decompression-bomb limit (decoded pixels)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1)  # encoded file size
    max_aspect_ratio: float = Field(8.0, ge=1)
    allowed_modes: list[str] = Field(
        default_factory=lambda: ["RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1", "I;16",
                                 "I;16B", "I;16L", "I", "F", "LAB", "HSV"]
    )
    alpha_background: list[int] = Field(default_factory=lambda: [255, 255, 255])  # RGBA composited onto this
    image_format: Literal["png", "jpg"] = "png"  # format of the normalised images
    # True: a JPEG or PNG that needs no conversion (8-bit RGB, no EXIF rotation) is kept byte for byte, whatever
    # image_format says (re-encoding is most of validate's time at photo size, and a PNG of a photo is ~4x the
    # JPEG's bytes); False re-encodes every image as image_format. The synthetic PNGs come out of PIL's encoder
    # with its default settings, which re-encoding reproduces byte for byte, so either way gives the same files.
    passthrough: bool = True
    jpeg_quality: int = Field(95, ge=1, le=100)
    report_examples: int = Field(3, ge=0)  # example rejects per reason in report.md

    @model_validator(mode="after")
    def _bounds(self) -> "ValidateConfig":
        for low, high in [("min_caption_words", "max_caption_words"), ("min_text_words", "max_text_words"),
                          ("min_image_side", "max_image_side")]:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"data.validation.{low} must be <= data.validation.{high}")
        if len(self.alpha_background) != 3 or any(not 0 <= c <= 255 for c in self.alpha_background):
            raise ValueError("data.validation.alpha_background must be three integers in 0..255")
        return self
