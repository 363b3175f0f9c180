import json

import pytest

from soho.eval.vqa import (
    CONTRACTIONS,
    OFFICIAL,
    SOHO,
    AnswerVocabulary,
    Scoring,
    answer_scores,
    normalize_answer,
    submission,
    vqa_accuracy,
    vqa_score,
)


@pytest.mark.parametrize("raw, expected", [
    ("  Yes\n", "yes"),
    ("red\tcar", "red car"),
    ("The Dog", "dog"),
    ("a man", "man"),
    ("an apple", "apple"),
    ("Two", "2"),
    ("the one", "1"),
    ("ten", "10"),
    ("none", "0"),
    ("yes.", "yes"),
    ("Yes!", "yes"),
    ("mr. smith", "mr smith"),
    ("2.5", "2.5"),
    ("1,000", "1000"),
    ("black/white", "black white"),     # no space beside the mark: it separates words
    ("black / white", "black white"),   # beside a space: removed, then spaces collapse
    ("hello, world", "hello world"),
    ("t-shirt", "t shirt"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("cant", "can't"),
    ("im", "im"),                       # the official table's "Im" never matches a lower-cased word
    ("oclock", "o'clock"),
    ("yall", "y'all"),
    ("hed", "he'd"),
    ("whered", "where'd"),
    ("couldn'tve", "couldn't've"),
    ("somebody'd", "somebodyd"),        # the one entry that removes an apostrophe
    ("two oclock", "2 o'clock"),
    ("its 2:00", "its 2:00"),           # a colon is no punctuation to the official script
    ("." * 40, "." * 8),                # it removes at most 32 periods
    ("wont", "won't"),
    ("don't", "don't"),
    ("It's   a   CAT", "it's cat"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),              # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),        # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),              # 0.9
    (4, (4 * 1 + 6 * 1) / 10),
    (10, 1.0),
])
def test_vqa_score_leave_one_out_with_ten_answers(matches, expected):
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_score("yes", answers) == pytest.approx(expected)


@pytest.mark.parametrize("answers, expected", [
    (["yes"], 1 / 3),
    (["yes", "yes"], 2 / 3),
    (["yes", "no", "yes", "yes"], 1.0),
    (["no", "no"], 0.0),
])
def test_vqa_score_without_ten_answers_is_plain_min(answers, expected):
    assert vqa_score("yes", answers) == pytest.approx(expected)


def test_vqa_score_normalises_both_sides():
    assert vqa_score("Two", ["2", "two.", "the two"] + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_score("2", ["Two"]) == pytest.approx(1 / 3)


def test_the_contraction_table_is_the_official_one():
    assert len(CONTRACTIONS) == 120
    assert {"oclock", "yall", "hed", "maam", "twas", "somebodyll", "y'allll"} <= set(CONTRACTIONS)
    assert all("'" in value or key == "somebody'd" for key, value in CONTRACTIONS.items())


# (prediction, answers, official score, soho score), worked out by hand from the official script's rules.
SCORING_CASES = [
    # Annotators disagree: both sides are normalised, by either rule.
    ("oclock", ["o'clock"] * 9 + ["3"], 1.0, 1.0),
    ("Two", ["2", "two.", "the two"] + ["3"] * 7, 0.9, 0.9),
    # All ten agree: officially nothing is normalised, the prediction must equal the answer as typed.
    ("2", ["2"] * 10, 1.0, 1.0),
    ("two", ["2"] * 10, 0.0, 1.0),
    ("yes", ["Yes"] * 10, 0.0, 1.0),
    ("  yes\n", ["yes"] * 10, 1.0, 1.0),     # whitespace is stripped in either case
    # Fewer than ten answers: officially the leave-one-out mean, soho's min(matches / 3, 1).
    ("yes", ["yes"], 0.0, 1 / 3),
    ("yes", ["yes", "no"], (0 + 1 / 3) / 2, 1 / 3),
    ("yes", ["yes"] * 4 + ["no"] * 2, (4 * 1 + 2 * 1) / 6, 1.0),
    ("yes", ["yes"] * 2 + ["no"] * 2, (2 * (1 / 3) + 2 * (2 / 3)) / 4, 2 / 3),
]


@pytest.mark.parametrize("prediction, answers, official, soho", SCORING_CASES)
def test_official_and_soho_scoring(prediction, answers, official, soho):
    assert vqa_score(prediction, answers, OFFICIAL) == pytest.approx(official)
    assert vqa_score(prediction, answers, SOHO) == pytest.approx(soho)
    assert vqa_score(prediction, answers) == pytest.approx(soho)


def test_each_difference_switches_off_on_its_own():
    assert vqa_score("two", ["2"] * 10, Scoring(always_normalize=False)) == 0.0
    assert vqa_score("yes", ["yes"], Scoring(always_normalize=False)) == pytest.approx(1 / 3)
    assert vqa_score("yes", ["yes"], Scoring(plain_score_unless_ten=False)) == 0.0
    assert vqa_score("two", ["2"] * 10, Scoring(plain_score_unless_ten=False)) == 1.0
    predictions, answers = {"1": "two", "2": "yes"}, {"1": ["2"] * 10, "2": ["yes"] * 3 + ["no"] * 7}
    assert vqa_accuracy(predictions, answers, OFFICIAL) == pytest.approx(100 * (0.0 + 0.9) / 2)
    assert vqa_accuracy(predictions, answers) == pytest.approx(100 * (1.0 + 0.9) / 2)


def test_vqa_score_rejects_no_answers():
    with pytest.raises(ValueError, match="no ground-truth answers"):
        vqa_score("yes", [])


def test_vqa_accuracy_in_percent():
    predictions = {"1": "yes", "2": "2", "3": "blue"}
    answers = {"1": ["yes"] * 3 + ["no"] * 7, "2": ["two"] * 10, "3": ["red"]}
    assert vqa_accuracy(predictions, answers) == pytest.approx(100 * (0.9 + 1.0 + 0.0) / 3)


def test_vqa_accuracy_names_questions_without_prediction_or_answers():
    with pytest.raises(ValueError, match=r"1 question\(s\) without a prediction: '2'"):
        vqa_accuracy({"1": "yes"}, {"1": ["yes"], "2": ["no"]})
    with pytest.raises(ValueError, match=r"without ground-truth answers: '2', '3'"):
        vqa_accuracy({"1": "yes", "2": "no", "3": "no"}, {"1": ["yes"], "3": []})
    with pytest.raises(ValueError, match=r"12 question\(s\) without a prediction: .*\(and 7 more\)"):
        vqa_accuracy({}, {f"q{i:02d}": ["yes"] for i in range(12)})
    with pytest.raises(ValueError, match="no questions"):
        vqa_accuracy({}, {})


def test_answer_scores_match_the_metric():
    answers = ["yes"] * 3 + ["No"] * 6 + ["maybe."]
    scores = answer_scores(answers)
    assert list(scores) == ["yes", "no", "maybe"]
    assert scores == pytest.approx({"yes": 0.9, "no": 1.0, "maybe": 0.3})
    for answer, score in scores.items():
        assert vqa_score(answer, answers) == pytest.approx(score)
    assert answer_scores(["Yes", "yes", "no"]) == pytest.approx({"yes": 2 / 3, "no": 1 / 3})
    with pytest.raises(ValueError, match="no answers"):
        answer_scores([])


# "yes" is given twice in the first question but counts once, so it ties with "cat" and "no".
QUESTIONS = [["yes", "yes", "no"], ["no", "The cat"], ["cat", "dog"], ["Yes"]]


def test_vocabulary_counts_once_per_question_and_breaks_ties_alphabetically():
    vocab = AnswerVocabulary.build(QUESTIONS)
    assert vocab.answers == ["cat", "no", "yes", "dog"]
    assert len(vocab) == 4
    assert AnswerVocabulary.build(QUESTIONS, max_size=2).answers == ["cat", "no"]
    assert AnswerVocabulary.build(QUESTIONS, min_count=2).answers == ["cat", "no", "yes"]
    assert AnswerVocabulary.build(QUESTIONS, min_count=3).answers == []


def test_vocabulary_build_rejects_bad_limits():
    with pytest.raises(ValueError, match="must be positive"):
        AnswerVocabulary.build(QUESTIONS, max_size=0)
    with pytest.raises(ValueError, match="must be positive"):
        AnswerVocabulary.build(QUESTIONS, min_count=0)


def test_vocabulary_index_normalises():
    vocab = AnswerVocabulary.build(QUESTIONS)
    assert vocab.index("The Cat.") == 0
    assert vocab.index("dog") == 3
    assert vocab.index("bird") is None


def test_vocabulary_targets_are_soft_scores_of_known_answers():
    vocab = AnswerVocabulary(["cat", "no", "yes", "dog"])
    indices, scores = vocab.targets(["yes"] * 3 + ["no"] * 6 + ["maybe"])
    assert indices == [1, 2]
    assert scores == pytest.approx([1.0, 0.9])
    assert vocab.targets(["bird"]) == ([], [])


def test_vocabulary_coverage_is_the_accuracy_upper_bound():
    vocab = AnswerVocabulary(["cat", "no"])
    questions = [["cat"] * 10, ["yes"] * 10, ["no"] * 2 + ["yes"] * 8]
    assert vocab.coverage(questions) == pytest.approx((1.0 + 0.0 + 0.6) / 3)
    with pytest.raises(ValueError, match="no questions"):
        vocab.coverage([])


def test_vocabulary_rejects_bad_entries():
    with pytest.raises(ValueError, match="normalised"):
        AnswerVocabulary(["Yes"])
    with pytest.raises(ValueError, match="normalised"):
        AnswerVocabulary([1])
    with pytest.raises(ValueError, match="duplicate entries \\['no'\\]"):
        AnswerVocabulary(["no", "yes", "no"])


def test_vocabulary_save_load_round_trip(tmp_path):
    vocab = AnswerVocabulary.build(QUESTIONS)
    path = tmp_path / "sub" / "answers.json"
    vocab.save(path)
    assert json.loads(path.read_text()) == {"answers": ["cat", "no", "yes", "dog"]}
    loaded = AnswerVocabulary.load(str(path))
    assert loaded.answers == vocab.answers
    assert loaded.index("yes") == 2


def test_vocabulary_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        AnswerVocabulary.load(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{answers: ")
    with pytest.raises(ValueError, match="not valid JSON"):
        AnswerVocabulary.load(bad_json)
    for content in (["yes"], {"answer": ["yes"]}, {"answers": "yes"}):
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps(content))
        with pytest.raises(ValueError, match="expected a JSON object"):
            AnswerVocabulary.load(wrong)
    wrong.write_text(json.dumps({"answers": ["yes", 2]}))
    with pytest.raises(ValueError, match="wrong.json: AnswerVocabulary: entries must be normalised"):
        AnswerVocabulary.load(wrong)
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes('{"answers": ["caf\u00e9"]}'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not valid JSON"):
        AnswerVocabulary.load(not_utf8)


def test_submission_is_the_official_results_format():
    # The server wants integer question ids; the shards store them as strings.
    assert submission({"458752001": "yes", "1": "2", "42": "red"}) == [
        {"question_id": 1, "answer": "2"}, {"question_id": 42, "answer": "red"},
        {"question_id": 458752001, "answer": "yes"}]
    with pytest.raises(ValueError, match=r"1 question id\(s\) are not integers.*'17-2'"):
        submission({"1": "yes", "17-2": "no"})
