"""Great Expectations suites of the three corpora, and the row-level reason each expectation gives.

Validation first computes one column per check for every row (decoding each image safely, see
``flava.data.images``); a suite of GE expectations then runs over those columns. The expectations are listed in
priority order: a failing row's reason is the first expectation it fails, phrased from that row's values.
GE's column-map expectations skip nulls, so a value that could not be computed (e.g. the width of an image
that did not decode) is left null and only its own check (here ``image_error``) fails.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from flava.data.prep_config import ValidateConfig


@dataclass(frozen=True)
class Check:
    name: str  # expectation type, e.g. "expect_column_values_to_be_unique"
    column: str
    kwargs: dict[str, Any]
    reason: Callable[[dict[str, Any]], str]  # row of the check frame -> "<category>: <detail>"

    def expectation(self):
        import great_expectations as gx  # lazy: ~4 s to import (see ephemeral_context)

        cls = {
            "expect_column_values_to_not_be_null": gx.expectations.ExpectColumnValuesToNotBeNull,
            "expect_column_values_to_be_null": gx.expectations.ExpectColumnValuesToBeNull,
            "expect_column_values_to_be_in_set": gx.expectations.ExpectColumnValuesToBeInSet,
            "expect_column_values_to_be_between": gx.expectations.ExpectColumnValuesToBeBetween,
            "expect_column_value_lengths_to_be_between": gx.expectations.ExpectColumnValueLengthsToBeBetween,
            "expect_column_values_to_be_unique": gx.expectations.ExpectColumnValuesToBeUnique,
        }[self.name]
        return cls(column=self.column, **self.kwargs)


def _side_text(r: dict[str, Any]) -> str:
    return f"{int(r['image_width'])}x{int(r['image_height'])}"


def key_checks() -> list[Check]:
    return [
        Check("expect_column_values_to_not_be_null", "key", {}, lambda r: "missing key: row has no key"),
        Check("expect_column_values_to_be_null", "duplicate_of", {},
              lambda r: f"duplicate key: {r['key']!r} already seen at row {int(r['duplicate_of'])}"),
    ]


def text_checks(v: ValidateConfig, noun: str, *, min_words: int, max_words: int, max_chars: int) -> list[Check]:
    return [
        Check("expect_column_values_to_be_in_set", "text_valid_utf8", {"value_set": [True]},
              lambda r: f"invalid {noun}: not valid UTF-8"),
        Check("expect_column_value_lengths_to_be_between", "text_stripped", {"min_value": 1},
              lambda r: f"empty {noun}: " + ("no text" if r["text_chars"] == 0 else "whitespace only")),
        Check("expect_column_values_to_be_between", "text_chars", {"max_value": max_chars},
              lambda r: f"{noun} too long: {int(r['text_chars'])} characters > {max_chars}"),
        Check("expect_column_values_to_be_between", "text_words", {"min_value": min_words, "max_value": max_words},
              lambda r: f"{noun} word count out of bounds: {int(r['text_words'])} not in [{min_words}, {max_words}]"),
    ]


def image_checks(v: ValidateConfig) -> list[Check]:
    return [
        Check("expect_column_values_to_be_null", "image_error", {}, lambda r: r["image_error"]),
        Check("expect_column_values_to_be_in_set", "image_mode", {"value_set": list(v.allowed_modes)},
              lambda r: f"unsupported image mode: {r['image_mode']}"),
        Check("expect_column_values_to_be_between", "image_min_side", {"min_value": v.min_image_side},
              lambda r: f"image too small: {_side_text(r)}, shorter side < {v.min_image_side}"),
        Check("expect_column_values_to_be_between", "image_max_side", {"max_value": v.max_image_side},
              lambda r: f"image too large: {_side_text(r)}, longer side > {v.max_image_side}"),
        Check("expect_column_values_to_be_between", "image_aspect", {"max_value": v.max_aspect_ratio},
              lambda r: f"extreme aspect ratio: {_side_text(r)} > {v.max_aspect_ratio}:1"),
    ]


def caption_checks(v: ValidateConfig) -> list[Check]:
    """The checks of one caption: of a pair's ``text``, and of each of a multi-caption sample's ``captions``."""
    return text_checks(v, "caption", min_words=v.min_caption_words, max_words=v.max_caption_words,
                       max_chars=v.max_caption_chars)


def corpus_checks(corpus: str, v: ValidateConfig) -> list[Check]:
    """The suite of one corpus, in reason-priority order."""
    checks = key_checks()
    if corpus == "pairs":
        checks += caption_checks(v)
    if corpus == "text":
        checks += text_checks(v, "text", min_words=v.min_text_words, max_words=v.max_text_words,
                              max_chars=v.max_text_chars)
    if corpus in ("pairs", "images"):
        checks += image_checks(v)
    if corpus == "images":
        checks.append(Check("expect_column_value_lengths_to_be_between", "label", {"min_value": 1},
                            lambda r: "missing label: class-folder image without a label"))
    return checks


def accepted_checks(corpus: str, v: ValidateConfig) -> list[Check]:
    """The suite the accepted rows must pass as a whole: every row check, and keys unique across the set."""
    return corpus_checks(corpus, v) + [
        Check("expect_column_values_to_be_unique", "key", {}, lambda r: f"duplicate key: {r['key']!r}")]


def ephemeral_context():
    """An in-memory GE context: no project directory, no analytics, no progress bars."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # great_expectations takes ~4 s to import (measured here; only validate needs it), and is imported after
    # GX_ANALYTICS_ENABLED is set above
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                               progress_bars=ProgressBarsConfig(globally=False), analytics_enabled=False)
    return gx.get_context(mode="ephemeral", project_config=config)


class SuiteRunner:
    """Runs a corpus's suite on a pandas frame of check columns; one datasource per context."""

    def __init__(self, context=None):
        self.context = context or ephemeral_context()
        self.datasource = self.context.data_sources.add_pandas("flava_manifests")
        self._suites: dict[str, Any] = {}

    def run(self, name: str, checks: list[Check], frame) -> Any:
        import great_expectations as gx  # lazy: ~4 s to import (see ephemeral_context)

        if name not in self._suites:
            self._suites[name] = self.context.suites.add(
                gx.ExpectationSuite(name=name, expectations=[c.expectation() for c in checks]))
            self.datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        batch = self.datasource.get_asset(name).get_batch_definition("all").get_batch(
            batch_parameters={"dataframe": frame})
        return batch.validate(self._suites[name], result_format={"result_format": "COMPLETE"})
