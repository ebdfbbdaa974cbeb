"""Pluggable tokenizers: CLIP's byte-level BPE (the packaged vocabulary, or a merges file) or the
sentencepiece tokenizer of the data pipeline, laid out as the towers expect."""
from __future__ import annotations

import gzip

import pytest
import torch

from llip_scale.interop.tokenizers import ClipBpeTokenizer, build_tokenizer
from llip_scale.model.text import eot_positions

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "p h", "o t", "ph ot", "phot o</w>"]


@pytest.fixture
def clip(tmp_path) -> ClipBpeTokenizer:
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *MERGES]) + "\n")
    return ClipBpeTokenizer(path, context_length=8)


def test_clip_bpe_ids_follow_the_clip_vocabulary(clip):
    # 256 byte symbols, the same with the end-of-word mark, the merges, then the two specials.
    assert clip.vocab_size == 512 + len(MERGES) + 2
    assert (clip.sot_id, clip.eot_id) == (512 + len(MERGES), 513 + len(MERGES))
    # CLIP's own ids for these do not depend on the merges: "a</w>" is 320, "!</w>" is 256.
    assert clip.encode("a") == [320] and clip.encode("!") == [256]
    # Lowest-ranked pair first: p h | o t -> ph ot -> phot o</w> -> photo</w>.
    assert clip.encode("the cat") == [513, 515]
    assert clip.encode("Photo") == [519]
    assert clip.encode("the  CAT &amp; the\tcat") == clip.encode("the cat & the cat")
    assert clip.decode(clip.encode("a photo of the cat!")) == "a photo of the cat !"  # as CLIP decodes


def test_clip_layout_pads_and_truncates_at_the_end_token(clip):
    tokens = clip(["the cat", "a photo of the cat a photo of the cat"])
    assert tokens.dtype == torch.long and tokens.shape == (2, 8)
    assert tokens[0].tolist() == [clip.sot_id, 513, 515, clip.eot_id, 0, 0, 0, 0]
    assert tokens[1, 0] == clip.sot_id and tokens[1, -1] == clip.eot_id  # truncated, still ended
    # The text tower pools where the official code pools (argmax: the end token is the largest id).
    assert eot_positions(tokens, clip.eot_id).tolist() == tokens.argmax(dim=1).tolist() == [3, 7]


def test_the_factory_picks_clip_bpe_or_sentencepiece(tmp_path, clip):
    from llip_scale.data.tokenizer import Tokenizer, train_tokenizer

    train_tokenizer(["a photo of a cat", "a photo of a dog", "the cat sat on the mat"] * 20,
                    str(tmp_path / "sp.model"), vocab_size=40)
    sp = build_tokenizer(context_length=8, spm_model=tmp_path / "sp.model")
    assert isinstance(sp, Tokenizer)
    tokens = sp(["a photo of a cat on the mat", "a"])
    assert tokens.shape == (2, 8) and tokens[0, -1] == sp.eot_id  # truncated, still ended
    assert isinstance(build_tokenizer(8, bpe_vocab=tmp_path / "bpe_simple_vocab_16e6.txt.gz"), ClipBpeTokenizer)
    packaged = build_tokenizer(8)  # nothing given: CLIP BPE from the vocabulary shipped with the package
    assert isinstance(packaged, ClipBpeTokenizer) and packaged.vocab_size == 49408
    with pytest.raises(ValueError, match="not both"):
        build_tokenizer(8, bpe_vocab=tmp_path / "bpe_simple_vocab_16e6.txt.gz", spm_model=tmp_path / "sp.model")
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        ClipBpeTokenizer(tmp_path / "missing.txt.gz")


def test_the_packaged_clip_vocabulary_gives_clips_own_ids():
    """Ids as OpenAI CLIP / open_clip tokenize them (their published ids for these words)."""
    tok = ClipBpeTokenizer(context_length=10)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id) == (49408, 49406, 49407)
    assert tok(["a photo of a cat"])[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]
    assert tok.encode("a dog") == [320, 1929]
    assert tok.decode(tok.encode("A Photo of two dogs!")) == "a photo of two dogs !"
