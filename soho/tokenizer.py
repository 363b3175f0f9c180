"""Tokenizers: any local Hugging Face tokenizer, or a WordPiece vocabulary trained on your captions."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Iterator, Union

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# [PAD] must be id 0: the text embeddings and the collators treat id 0 as padding.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# A directory needs one of these to hold an actual vocabulary; tokenizer_config.json alone makes
# transformers build a tokenizer that knows only the special tokens and maps every word to [UNK].
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model")
# Without one of these AutoTokenizer cannot tell which tokenizer class the vocabulary belongs to.
DESCRIPTION_FILES = ("tokenizer.json", "tokenizer_config.json")


def _checked_texts(texts: Iterable[str]) -> Iterator[str]:
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is a {type(text).__name__}, expected str")
        yield text


def train_wordpiece_tokenizer(texts: Iterable[str], output_dir: Union[str, Path], vocab_size: int = 1000,
                              min_frequency: int = 1, lowercase: bool = True) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts`` and save it in Hugging Face format.

    Nothing can be downloaded offline, so the vocabulary is learned from the corpus at hand.
    ``vocab_size`` is a target: every character seen gets an entry, so a corpus with a large
    alphabet can yield a bigger vocabulary; check ``len(tokenizer)`` against the model.
    ``texts`` may be a generator; it is consumed once.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    texts = iter(texts)
    end = object()
    first = next(texts, end)
    if first is end:
        raise ValueError("cannot train a tokenizer on an empty corpus")

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    # The same normaliser BertTokenizerFast rebuilds from do_lower_case when the directory is
    # loaded again, so the returned and the reloaded tokenizer agree (accents follow lowercase).
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##",
                                        show_progress=False)
    tokenizer.train_from_iterator(_checked_texts(itertools.chain([first], texts)), trainer=trainer)

    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer.decoder = decoders.WordPiece(prefix="##")

    wrapped = BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=lowercase, unk_token="[UNK]",
                                sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(output_dir))
    # transformers 5 saves only tokenizer.json; BERT tooling and older releases expect vocab.txt.
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    (output_dir / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    return wrapped


def load_tokenizer(path: Union[str, Path]) -> PreTrainedTokenizerBase:
    """Load a local Hugging Face tokenizer directory; never touches the network."""
    path = Path(path)
    # A path that is not a directory would be taken for a Hub repository id.
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any((path / name).is_file() for name in VOCABULARY_FILES):
        raise FileNotFoundError(f"{path} holds no tokenizer files: expected a vocabulary "
                                f"({', '.join(VOCABULARY_FILES)})")
    if not any((path / name).is_file() for name in DESCRIPTION_FILES):
        raise FileNotFoundError(f"{path} has a vocabulary but neither {' nor '.join(DESCRIPTION_FILES)}, so the "
                                "tokenizer class is unknown; save the tokenizer with save_pretrained()")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
