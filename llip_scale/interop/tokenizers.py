"""Text tokenizers behind one interface: texts -> LongTensor [N, context_length].

    tokenizer = build_tokenizer(context_length=77)     # CLIP BPE, the packaged vocabulary
    tokens = tokenizer(["a photo of a cat"])           # [1, 77], then model.encode_text(tokens)

* ``ClipBpeTokenizer``: the byte-level BPE of OpenAI CLIP, which the official Llip checkpoints
  were trained with (vocabulary 49,408: 256 bytes, the same with an end-of-word mark, 48,894
  merges, then <start_of_text> = 49,406 and <end_of_text> = 49,407). CLIP's merges file
  (``bpe_simple_vocab_16e6.txt.gz``, MIT licensed, as open_clip ships it) comes with this
  package; another merges file can be given. Nothing is downloaded.
* ``llip_scale.data.tokenizer.Tokenizer``: a sentencepiece model (``data.tokenizer``), our
  own training path.

Both lay a text out as pieces + [end] (CLIP BPE starts with <start_of_text>), truncate to
``context_length`` keeping the end token last (the towers pool at it) and pad with ``pad_id``.
"""
from __future__ import annotations

import gzip
import html
import re
from pathlib import Path
from typing import Protocol, Sequence, Union

import torch

from llip_scale.data.tokenizer import Tokenizer as SentencePieceTokenizer

Texts = Union[str, Sequence[str]]


class TextTokenizer(Protocol):
    """What the towers need of a tokenizer (CLIP BPE and the sentencepiece one both are)."""

    vocab_size: int
    eot_id: int
    pad_id: int
    context_length: int
    def __call__(self, texts: Texts) -> torch.Tensor: ...


def _layout(ids: list[list[int]], context_length: int, start: int, end: int, pad: int) -> torch.Tensor:
    out = torch.full((len(ids), context_length), pad, dtype=torch.long)
    for row, pieces in enumerate(ids):
        seq = [start] + pieces + [end]
        if len(seq) > context_length:
            seq = seq[:context_length - 1] + [end]  # truncated: still pooled at an end token
        out[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _as_list(texts: Texts) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


# ---------------------------------------------------------------------------------------------
# CLIP byte-level BPE
# ---------------------------------------------------------------------------------------------

NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses from its file
# CLIP's merges file, shipped as package data (the official checkpoints' vocabulary).
DEFAULT_BPE_VOCAB = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE, CLIP_EOT_ID = 49408, 49407  # the packaged BPE's vocabulary and end token


def is_clip_vocabulary(vocab_size: int, eot_id: int) -> bool:
    """Whether a text tower with these ids reads CLIP's BPE (the official checkpoints' vocabulary)."""
    return (vocab_size, eot_id) == (CLIP_VOCAB_SIZE, CLIP_EOT_ID)


def byte_alphabet() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes stand for themselves, the
    others (controls, space, ...) are moved to code points from 256 on, in byte order.

    The order is the vocabulary's: the printable bytes first ("!" is id 0, "a" id 64), then
    the moved ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + offset) for offset, b in enumerate(moved)})
    return table


def _split_pattern() -> "re.Pattern[str]":
    """Contractions, runs of letters, single digits, runs of other non-space characters."""
    specials = r"<start_of_text>|<end_of_text>"
    contractions = r"'s|'t|'re|'ve|'m|'ll|'d"
    try:  # optional: the Unicode classes CLIP uses, when the `regex` package is there
        import regex

        return regex.compile(rf"{specials}|{contractions}|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE)
    except ImportError:  # `re`: letters are word characters minus digits and "_"
        return re.compile(rf"{specials}|{contractions}|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


def clean_text(text: str) -> str:
    """Repair mojibake (ftfy, when installed), unescape HTML twice, collapse whitespace."""
    try:  # optional
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class ClipBpeTokenizer:
    """OpenAI CLIP's tokenizer, from its merges file (gzip or plain text, one merge a line
    after a header line); ``merges_path`` None: the packaged ``bpe_simple_vocab_16e6.txt.gz``."""

    def __init__(self, merges_path: Union[str, Path, None] = None, context_length: int = 77):
        path = Path(merges_path) if merges_path else DEFAULT_BPE_VOCAB
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE merges file '{path}' not found; pass the path of "
                                    "bpe_simple_vocab_16e6.txt.gz (it is not downloaded)")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:NUM_MERGES + 1]
        merges = [tuple(line.split()) for line in lines if line.strip()]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: every line after the header must be two symbols to merge")
        self.bytes = byte_alphabet()
        symbols = list(self.bytes.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot_id, self.eot_id, self.pad_id = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"], 0
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self.pattern = _split_pattern()
        self._cache: dict[str, list[str]] = {}

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until none applies."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, len(self.ranks)), pair) for pair in zip(parts, parts[1:])]
            rank, (first, second) = min(ranked)
            if rank == len(self.ranks):
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(clean_text(text).lower()):
            mapped = "".join(self.bytes[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` up to the first end token (padding, id 0, is also "!" in CLIP)."""
        inverse = {c: b for b, c in self.bytes.items()}
        raw = bytearray()
        for i in ids:
            if i == self.eot_id:
                break
            if i == self.sot_id or i not in self.decoder:
                continue
            token = self.decoder[i]
            word_end = token.endswith("</w>")
            raw.extend(inverse[c] for c in (token[:-4] if word_end else token))
            if word_end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: Texts) -> torch.Tensor:
        return _layout([self.encode(t) for t in _as_list(texts)], self.context_length, self.sot_id,
                       self.eot_id, self.pad_id)


def build_tokenizer(context_length: int = 77, bpe_vocab: Union[str, Path, None] = None,
                    spm_model: Union[str, Path, None] = None) -> TextTokenizer:
    """A sentencepiece model when ``spm_model`` is given, else CLIP BPE (``bpe_vocab``, or the
    packaged vocabulary). ``llip_scale.get_tokenizer`` picks these for a model by name or path."""
    if bpe_vocab and spm_model:
        raise ValueError("pass bpe_vocab or spm_model, not both")
    if spm_model:

        return SentencePieceTokenizer(str(spm_model), context_length)
    return ClipBpeTokenizer(bpe_vocab, context_length)
