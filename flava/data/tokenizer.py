"""The text tokenizer: fit a BERT-style WordPiece vocabulary with the ``tokenizers`` library, save it in the
``BertTokenizerFast.save_pretrained`` layout (so transformers and published FLAVA/BERT code read it), load it back.

The vocabulary is learnt here, not by ``tokenizers.trainers.WordPieceTrainer``: that trainer breaks count ties in
hash-map order, so the same texts give different vocabularies from run to run (huggingface/tokenizers#1794), and
a pipeline stage must be deterministic. ``learn_wordpiece_vocab`` runs the same algorithm (BPE-style merges of
the most frequent adjacent pair, continuation pieces prefixed ``##``) with ties broken lexicographically; the
``tokenizers`` library still provides the normaliser, pre-tokeniser, WordPiece model and serialisation.

``load_tokenizer`` reads only local files (never a hub) and also accepts a pretrained BERT tokenizer directory made
by ``save_pretrained`` (``tokenizer.json`` and/or ``vocab.txt``).
"""
from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CONTINUATION = "##"


def _join(a: str, b: str) -> str:
    return a + b[len(CONTINUATION):]


def learn_wordpiece_vocab(
    word_counts: dict[str, int], vocab_size: int, *, min_frequency: int = 1, reserved: Iterable[str] = ()
) -> list[str]:
    """Deterministic WordPiece vocabulary: ``reserved`` tokens, the sorted alphabet (word-initial characters and
    ``##`` continuations), then merged pieces in merge order until ``vocab_size`` or no pair occurs
    ``min_frequency`` times. Each merge takes the most frequent adjacent pair; ties go to the smallest pair."""
    vocab: list[str] = list(dict.fromkeys(reserved))
    words: list[list[str]] = []
    counts: list[int] = []
    for word in sorted(word_counts):
        if not word:
            continue
        words.append([word[0]] + [CONTINUATION + ch for ch in word[1:]])
        counts.append(word_counts[word])
    alphabet = sorted({sym for w in words for sym in w} - set(vocab))
    vocab.extend(alphabet)
    known = set(vocab)

    pair_counts, where = _count_pairs(words, counts)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # stale entry; the current count was pushed again when it changed
        if -neg < min_frequency:
            break
        merged = _join(*pair)
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        touched = _merge_everywhere(pair, merged, words, counts, pair_counts, where)
        for p in touched:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p, None)
    return vocab


def _count_pairs(words: list[list[str]], counts: list[int]) -> tuple[Counter, dict[tuple[str, str], set[int]]]:
    """How often each adjacent pair of symbols occurs (weighted by word count), and in which words."""
    pair_counts: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for idx, (w, c) in enumerate(zip(words, counts)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += c
            where[pair].add(idx)
    return pair_counts, where


def _merge_everywhere(
    pair: tuple[str, str], merged: str, words: list[list[str]], counts: list[int], pair_counts: Counter,
    where: dict[tuple[str, str], set[int]],
) -> set[tuple[str, str]]:
    """Replace ``pair`` by ``merged`` in every word holding it, updating ``pair_counts`` and ``where`` in place;
    returns the pairs whose counts changed."""
    touched: set[tuple[str, str]] = set()
    for idx in sorted(where.pop(pair, ())):
        w, c = words[idx], counts[idx]
        for old in zip(w, w[1:]):
            pair_counts[old] -= c
            touched.add(old)
        out = _merge_word(w, pair, merged)
        words[idx] = out
        for new in zip(out, out[1:]):
            pair_counts[new] += c
            where[new].add(idx)
            touched.add(new)
    return touched


def _merge_word(word: list[str], pair: tuple[str, str], merged: str) -> list[str]:
    """``word`` with each non-overlapping occurrence of ``pair`` (left to right) replaced by ``merged``."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def fit_wordpiece(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 1,
    lowercase: bool = True,
    model_max_length: int = 512,
):
    """Train a WordPiece vocabulary (BERT normalisation and pre-tokenisation) and save it to ``out_dir``.

    Returns the loaded ``BertTokenizerFast``. ``[PAD]`` is id 0, then ``[UNK] [CLS] [SEP] [MASK]``.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("fit_wordpiece: no non-empty texts to fit on")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"fit_wordpiece: vocab_size {vocab_size} is too small for the special tokens")
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter = Counter()
    for text in texts:
        word_counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = learn_wordpiece_vocab(word_counts, vocab_size, min_frequency=min_frequency, reserved=SPECIAL_TOKENS)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = BertTokenizerFast(
        tokenizer_object=tok, do_lower_case=lowercase, unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]", model_max_length=model_max_length,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(directory: str | Path):
    """Load a tokenizer saved with ``save_pretrained`` from a local directory (no network, ever)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise ValueError(f"{directory} holds no tokenizer.json or vocab.txt: not a saved tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, OSError, KeyError):
        # A bare vocab.txt without tokenizer_config.json: read it as a BERT vocabulary.
        tok = BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    missing = [name for name in ("pad_token_id", "mask_token_id", "cls_token_id", "sep_token_id")
               if getattr(tok, name, None) is None]
    if missing:
        raise ValueError(f"tokenizer in {directory} lacks {', '.join(missing)} (BERT-style specials needed)")
    return tok
