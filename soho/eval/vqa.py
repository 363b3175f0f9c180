"""VQA v2 evaluation: the official answer normalisation, soft accuracy, and an answer vocabulary.

The metric follows the official VQA evaluation: an answer is fully correct when at least
3 of the annotators gave it, and with the usual 10 answers per question the score is
averaged over the 10 subsets that leave one annotator out, so a prediction matching
k annotators scores 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4+.

Unlike the official script, which only normalises when the annotators disagree, both the
prediction and every ground-truth answer are always normalised: the metric then does not
depend on how consistently the annotators happened to type an answer.

Training as classification over the most frequent answers uses :func:`answer_scores` as
soft targets, so the loss and the metric reward exactly the same answers.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

# The official script maps "none" to "0" too: it answers "how many" questions.
NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
CONTRACTIONS: Dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itll": "it'll",
    "lets": "let's", "mightnt": "mightn't", "mustnt": "mustn't", "shes": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "werent": "weren't", "weve": "we've", "whats": "what's", "wheres": "where's",
    "whos": "who's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The apostrophe is deliberately absent so that contractions survive; the period is handled apart.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# A period not followed by a digit ends a sentence or an abbreviation; "2.5" keeps its decimal point.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Leave-one-out averaging needs the 10 answers that every VQA v2 question has.
NUM_ANNOTATORS = 10
# Answers given by this many annotators (of those counted) are fully correct.
FULL_AGREEMENT = 3


def _strip_punctuation(text: str) -> str:
    # As in the official script: a mark touching a space ("yes , it is") or any text holding a
    # number with a thousands comma ("1,000") loses its marks outright, so that "1,000" becomes
    # "1000"; elsewhere a mark separates words ("black/white" -> "black white").
    remove = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if remove or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """The official VQA normalisation: lower case, punctuation, number words to digits, no articles,
    missing apostrophes restored, single spaces."""
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    words = [NUMBER_WORDS.get(word, word) for word in _strip_punctuation(text).split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _soft_score(prediction: str, answers: Sequence[str]) -> float:
    # Both sides already normalised.
    matches = sum(answer == prediction for answer in answers)
    if len(answers) != NUM_ANNOTATORS:
        return min(matches / FULL_AGREEMENT, 1.0)
    # Leaving out an annotator who gave the prediction drops one match; there are `matches` of them.
    left_out_match = matches * min((matches - 1) / FULL_AGREEMENT, 1.0)
    left_out_other = (len(answers) - matches) * min(matches / FULL_AGREEMENT, 1.0)
    return (left_out_match + left_out_other) / len(answers)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """Soft accuracy (0..1) of one predicted answer against the annotators' answers.

    With 10 answers: the mean over the 10 leave-one-out subsets of min(matches / 3, 1);
    with any other number: min(matches / 3, 1).
    """
    if not answers:
        raise ValueError("vqa_score: no ground-truth answers to score the prediction against")
    return _soft_score(normalize_answer(prediction), [normalize_answer(answer) for answer in answers])


def _describe(question_ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(question_id) for question_id in question_ids[:limit])
    more = len(question_ids) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def vqa_accuracy(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> float:
    """Mean :func:`vqa_score` over the questions, in percent.

    Every question must have both a prediction and at least one answer: a partial evaluation
    would report a number that is not comparable with anything, so it is an error.
    """
    unanswered = sorted(str(qid) for qid in answers if qid not in predictions)
    no_truth = sorted(str(qid) for qid in {*predictions, *answers} if not answers.get(qid))
    problems = []
    if unanswered:
        problems.append(f"{len(unanswered)} question(s) without a prediction: {_describe(unanswered)}")
    if no_truth:
        problems.append(f"{len(no_truth)} question(s) without ground-truth answers: {_describe(no_truth)}")
    if problems:
        raise ValueError("vqa_accuracy: " + "; ".join(problems))
    if not answers:
        raise ValueError("vqa_accuracy: no questions to evaluate")
    total = sum(vqa_score(predictions[qid], answers[qid]) for qid in answers)
    return 100.0 * total / len(answers)


def submission(predictions: Mapping[str, str]) -> List[Dict[str, Union[int, str]]]:
    """Predictions (question id -> answer) in the official results format, ``[{"question_id": int, "answer": str}]``,
    by question id: what the VQA evaluation server takes for test-dev and test.

    The server matches integer question ids; an id that is not one (e.g. a synthetic ``"17-2"``) is an error.
    """
    not_integers = sorted(qid for qid in predictions if not qid.isdecimal())
    if not_integers:
        raise ValueError(f"submission: {len(not_integers)} question id(s) are not integers, as the VQA evaluation "
                         f"server expects: {_describe(not_integers)}")
    return sorted(({"question_id": int(qid), "answer": answer} for qid, answer in predictions.items()),
                  key=lambda entry: entry["question_id"])


def answer_scores(answers: Sequence[str]) -> Dict[str, float]:
    """Soft target of every distinct normalised answer: its :func:`vqa_score` as if it were predicted."""
    if not answers:
        raise ValueError("answer_scores: no answers")
    normalized = [normalize_answer(answer) for answer in answers]
    return {answer: _soft_score(answer, normalized) for answer in dict.fromkeys(normalized)}


class AnswerVocabulary:
    """The answers a VQA classifier chooses from, by index; every entry is a normalised answer."""

    def __init__(self, answers: Sequence[str]) -> None:
        bad = [answer for answer in answers if not isinstance(answer, str) or normalize_answer(answer) != answer]
        if bad:
            # An entry that normalisation changes could never be matched by index().
            raise ValueError(f"AnswerVocabulary: entries must be normalised answer strings, got {bad[:5]!r}")
        duplicates = sorted(answer for answer, count in Counter(answers).items() if count > 1)
        if duplicates:
            raise ValueError(f"AnswerVocabulary: duplicate entries {duplicates[:5]!r}")
        self.answers: List[str] = list(answers)
        self._index: Dict[str, int] = {answer: i for i, answer in enumerate(self.answers)}

    @classmethod
    def build(cls, answer_lists: Iterable[Sequence[str]], max_size: int = 3129,
              min_count: int = 1) -> AnswerVocabulary:
        """The ``max_size`` answers given in the most questions (ties alphabetical), each given in at
        least ``min_count`` questions.

        An answer counts once per question however many annotators gave it: the vocabulary should
        cover many questions, not reward one question with many identical answers.
        """
        if max_size < 1 or min_count < 1:
            raise ValueError(f"AnswerVocabulary.build: max_size ({max_size}) and min_count ({min_count}) "
                             "must be positive")
        counts: Counter[str] = Counter()
        for answers in answer_lists:
            counts.update({normalize_answer(answer) for answer in answers})
        ranked = sorted((answer for answer, count in counts.items() if count >= min_count),
                        key=lambda answer: (-counts[answer], answer))
        return cls(ranked[:max_size])

    def __len__(self) -> int:
        return len(self.answers)

    def index(self, answer: str) -> Optional[int]:
        """Index of the answer after normalisation; None when it is not in the vocabulary."""
        return self._index.get(normalize_answer(answer))

    def targets(self, answers: Sequence[str]) -> Tuple[List[int], List[float]]:
        """Indices (ascending) and soft scores of the in-vocabulary answers among the annotators' answers."""
        scored = sorted((self._index[answer], score) for answer, score in answer_scores(answers).items()
                        if answer in self._index)
        return [index for index, _ in scored], [score for _, score in scored]

    def coverage(self, answer_lists: Iterable[Sequence[str]]) -> float:
        """Upper bound (0..1) of the VQA accuracy with this vocabulary: the mean over questions of the
        best score an in-vocabulary answer reaches."""
        best = [max(self.targets(answers)[1], default=0.0) for answers in answer_lists]
        if not best:
            raise ValueError("AnswerVocabulary.coverage: no questions")
        return sum(best) / len(best)

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"answers": self.answers}, indent=1, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, Path]) -> AnswerVocabulary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"answer vocabulary {path}: no such file")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:  # JSON or UTF-8
            raise ValueError(f"answer vocabulary {path}: not valid JSON ({error})") from error
        if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
            raise ValueError(f'answer vocabulary {path}: expected a JSON object {{"answers": [...]}}')
        try:
            return cls(data["answers"])
        except ValueError as error:
            raise ValueError(f"answer vocabulary {path}: {error}") from None
