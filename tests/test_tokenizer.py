import shutil
import socket

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from soho.tokenizer import load_tokenizer, train_wordpiece_tokenizer

CORPUS = ["A small red circle to the left of a large blue square.", "Two green stars above a yellow cross!",
          "There are three objects: a circle, a star and a square."] * 4
PROBES = ["a red circle", "RED Circle!", "two crosses above the square", "a zebra", "Café naïve", ""]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    return train_wordpiece_tokenizer(CORPUS, directory, vocab_size=200), directory


def test_saved_directory_round_trips_through_auto_tokenizer(trained, monkeypatch):
    tokenizer, directory = trained
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt"} <= {p.name for p in directory.iterdir()}

    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for loaded in (AutoTokenizer.from_pretrained(str(directory), local_files_only=True), load_tokenizer(directory)):
        assert isinstance(loaded, PreTrainedTokenizerFast)
        assert loaded.get_vocab() == tokenizer.get_vocab()
        for text in PROBES:
            assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert loaded("a red circle", "a blue square") == tokenizer("a red circle", "a blue square")


def test_special_tokens_have_fixed_ids_and_vocab_txt_matches(trained):
    tokenizer, directory = trained
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    lines = (directory / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines == sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)


def test_encoding_adds_cls_sep_and_splits_unknown_words(trained):
    tokenizer, _ = trained
    ids = tokenizer("A red Circle")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert tokenizer.tokenize("circles") == ["circle", "##s"]
    assert tokenizer.tokenize("bluer") == ["blue", "##r"]
    assert tokenizer.tokenize("zebra") == ["[UNK]"]  # no "z" or "##z" in the corpus
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"


def test_sentence_pairs_get_segment_ids(trained):
    tokenizer, _ = trained
    encoded = tokenizer("a star", "a cross")
    assert tokenizer.convert_ids_to_tokens(encoded["input_ids"]) == [
        "[CLS]", "a", "star", "[SEP]", "a", "cross", "[SEP]"]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


def test_vocab_size_and_casing(tmp_path):
    small = train_wordpiece_tokenizer(iter(CORPUS), tmp_path / "small", vocab_size=60)
    assert len(small) == 60
    cased = train_wordpiece_tokenizer(CORPUS, tmp_path / "cased", vocab_size=200, lowercase=False)
    assert cased.tokenize("Two") == ["Two"] and cased.tokenize("two")[0] != "two"
    assert load_tokenizer(tmp_path / "cased").tokenize("Two green") == ["Two", "green"]


@pytest.mark.parametrize("texts, kwargs, error, message", [
    ("a single caption", {}, TypeError, "not a single string"),
    ([], {}, ValueError, "empty corpus"),
    (["a caption", 3], {}, TypeError, r"texts\[1\] is a int"),
    (CORPUS, {"vocab_size": 5}, ValueError, "vocab_size"),
    (CORPUS, {"min_frequency": 0}, ValueError, "min_frequency"),
])
def test_training_rejects_bad_arguments(tmp_path, texts, kwargs, error, message):
    with pytest.raises(error, match=message):
        train_wordpiece_tokenizer(texts, tmp_path / "tok", **kwargs)


def test_load_tokenizer_names_what_is_missing(trained, tmp_path):
    _, directory = trained
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(directory / "vocab.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    # tokenizer_config.json alone would load as a tokenizer that maps every word to [UNK].
    (tmp_path / "config_only").mkdir()
    shutil.copy(directory / "tokenizer_config.json", tmp_path / "config_only")
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "config_only")
    (tmp_path / "vocab_only").mkdir()
    shutil.copy(directory / "vocab.txt", tmp_path / "vocab_only")
    with pytest.raises(FileNotFoundError, match="tokenizer class is unknown"):
        load_tokenizer(tmp_path / "vocab_only")
