"""Typed configuration of the data stages (``data:`` in params.yaml).

Two owners, two files: the preparation side (generate, ingest, validate) is typed in ``flava.data.prep_config``,
the streaming side (shards, tokenizer and codebook fitting, transforms, masking, loaders, corpus mixing) in
``flava.data.stream_config``. This module only composes them.
"""
from __future__ import annotations

from pydantic import Field

from flava.configbase import StrictModel
from flava.data.engine import EngineConfig
from flava.data.prep_config import GenerateConfig, IngestConfig, ValidateConfig
from flava.data.stream_config import (
    CodebookFitConfig,
    LoaderConfig,
    MaskingConfig,
    MixingConfig,
    ShardConfig,
    TokenizerConfig,
)


class DataConfig(StrictModel):
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    validation: ValidateConfig = Field(default_factory=ValidateConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    codebook: CodebookFitConfig = Field(default_factory=CodebookFitConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    mixing: MixingConfig = Field(default_factory=MixingConfig)
