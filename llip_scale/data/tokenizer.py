"""SentencePiece tokenizer: captions -> fixed-length token ids that end in EOT.

Flow: ``list[str]`` -> sentencepiece ids (the model's own normaliser; the models trained here
case-fold) -> cut to ``context_length - 1`` -> EOT appended (the text tower pools at the first
EOT, so it must always be present) -> padded with ``pad_id`` -> ``LongTensor [N, context_length]``.

Special ids are fixed at training time (:func:`train_tokenizer`): pad 0, unk 1, eos 2 (used as
EOT), no bos, which match the text tower's defaults ``eot_id=2, pad_id=0``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import sentencepiece as spm

from llip_scale.errors import ConfigError

if TYPE_CHECKING:
    import torch

PAD_ID, UNK_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """SentencePiece wrapper; picklable (the model bytes travel to DataLoader workers)."""

    def __init__(self, path: str, context_length: int = 77):
        if context_length < 2:
            raise ConfigError(f"tokenizer context_length must be >= 2, got {context_length}")
        try:
            proto = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"tokenizer file '{path}' cannot be read ({e.strerror}); set "
                              f"data.tokenizer or train one with tools/train_tokenizer.py") from None
        self.path = str(path)
        self.context_length = context_length
        self._load(proto)

    def _load(self, proto: bytes) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except RuntimeError:
            raise ConfigError(f"tokenizer file '{self.path}' is not a sentencepiece model; "
                              f"train one with tools/train_tokenizer.py") from None
        if sp.eos_id() < 0 or sp.pad_id() < 0:
            raise ConfigError(f"tokenizer '{self.path}' has no eos or pad id; retrain it with "
                              f"tools/train_tokenizer.py (pad_id=0, eos_id=2)")
        self._sp, self._proto = sp, proto

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eot_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without EOT or padding."""
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a row of ids; stops at the first EOT and ignores padding."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                break
            if i != self.pad_id:
                out.append(i)
        return self._sp.decode(out)

    def __call__(self, texts: list[str]) -> "torch.Tensor":
        """``LongTensor [N, context_length]``: ids cut to fit, then EOT, then padding."""
        import torch  # lazy: the shard and tokenizer tools start without loading torch

        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(self._sp.encode(list(texts))):
            ids = ids[: self.context_length - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __getstate__(self) -> dict:
        return {"path": self.path, "context_length": self.context_length, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path, self.context_length = state["path"], state["context_length"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer('{self.path}', vocab_size={self.vocab_size}, context_length={self.context_length})"


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int = 1024,
                    model_type: str = "bpe", case_sensitive: bool = False) -> Tokenizer:
    """Train a sentencepiece model on ``texts``, write it to ``out_path``, return it loaded.

    ``vocab_size`` is an upper bound: a small corpus gets a smaller vocabulary instead of an
    error. Training is single-threaded so the model file is the same on every run.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1,
        hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        normalization_rule_name="nmt_nfkc" if case_sensitive else "nmt_nfkc_cf",
        minloglevel=2)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_bytes(model.getvalue())
    return Tokenizer(out_path)
