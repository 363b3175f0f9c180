"""VQA v2 evaluation: the official answer normalisation, soft accuracy, and an answer vocabulary.

The normalisation is the official evaluation's (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``): its punctuation rules, number words to digits,
no articles, and its table of 120 contractions written without their apostrophe. A prediction is
fully correct when at least 3 annotators gave it; with the usual 10 answers per question the score
is averaged over the 10 subsets that leave one annotator out, so a prediction matching k annotators
scores 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4+.

soho departs from the official script in two deliberate ways, both switchable (:class:`Scoring`):
:data:`SOHO` has them and is the default, :data:`OFFICIAL` has neither and gives the evaluation
server's number.

- **Always normalise.** The official script normalises the prediction and the answers only when the
  annotators disagree; when all of them typed the same answer, the prediction must equal it as typed
  (whitespace stripped), so "Yes" scores 0 against ten "yes". soho normalises both sides always, so the
  metric does not depend on how consistently the annotators happened to type an answer.
- **Fewer than ten answers.** The official script averages over the leave-one-out subsets whatever
  the number of answers, which scores every prediction 0 on a question with a single answer; soho
  scores ``min(matches / 3, 1)`` unless there are ten.

Training as classification over the most frequent answers uses :func:`answer_scores` as soft
targets, computed with soho's rules, so the loss and the default metric reward exactly the same answers.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

# The official script maps "none" to "0" too: it answers "how many" questions.
NUMBER_WORDS: Dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# The official table, entry for entry. It is looked up after lower-casing, so its capitalised keys
# ("Im", "Ive", "Id've", "I'dve") never apply and "im" stays "im"; "somebody'd" maps to "somebodyd".
CONTRACTIONS: Dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# The apostrophe is deliberately absent so that contractions survive; the period is handled apart.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
# A period not followed by a digit ends a sentence or an abbreviation; "2.5" keeps its decimal point.
_PERIOD = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (32) where re.sub takes its count: it removes at most 32 periods.
_MAX_PERIODS_REMOVED = 32
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Leave-one-out averaging needs the 10 answers that every VQA v2 question has.
NUM_ANNOTATORS = 10
# Answers given by this many annotators (of those counted) are fully correct.
FULL_AGREEMENT = 3


@dataclass(frozen=True)
class Scoring:
    """Which of soho's deliberate departures from the official evaluation apply (see the module docstring)."""

    always_normalize: bool = True
    """Normalise the prediction and every answer, also when all annotators gave the same answer."""
    plain_score_unless_ten: bool = True
    """With other than ten answers, score ``min(matches / 3, 1)`` instead of the leave-one-out mean."""


SOHO = Scoring()
OFFICIAL = Scoring(always_normalize=False, plain_score_unless_ten=False)


def _strip_punctuation(text: str) -> str:
    # As in the official script: a mark touching a space ("yes , it is") or any text holding a
    # number with a thousands comma ("1,000") loses its marks outright, so that "1,000" becomes
    # "1000"; elsewhere a mark separates words ("black/white" -> "black white").
    remove = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if remove or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS_REMOVED)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The official VQA normalisation: punctuation, lower case, number words to digits, no articles,
    missing apostrophes restored, single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in _strip_punctuation(_clean_whitespace(text)).lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def _soft_score(prediction: str, answers: Sequence[str], plain_score_unless_ten: bool) -> float:
    # Both sides already in the form they are compared in.
    matches = sum(answer == prediction for answer in answers)
    if plain_score_unless_ten and len(answers) != NUM_ANNOTATORS:
        return min(matches / FULL_AGREEMENT, 1.0)
    # Leaving out an annotator who gave the prediction drops one match; there are `matches` of them.
    left_out_match = matches * min((matches - 1) / FULL_AGREEMENT, 1.0)
    left_out_other = (len(answers) - matches) * min(matches / FULL_AGREEMENT, 1.0)
    return (left_out_match + left_out_other) / len(answers)


def vqa_score(prediction: str, answers: Sequence[str], scoring: Scoring = SOHO) -> float:
    """Soft accuracy (0..1) of one predicted answer against the annotators' answers.

    With 10 answers: the mean over the 10 leave-one-out subsets of min(matches / 3, 1); with any
    other number: min(matches / 3, 1) under :data:`SOHO`, the leave-one-out mean under :data:`OFFICIAL`.
    """
    if not answers:
        raise ValueError("vqa_score: no ground-truth answers to score the prediction against")
    prediction, answers = _clean_whitespace(prediction), [_clean_whitespace(answer) for answer in answers]
    if scoring.always_normalize or len(set(answers)) > 1:
        prediction, answers = normalize_answer(prediction), [normalize_answer(answer) for answer in answers]
    return _soft_score(prediction, answers, scoring.plain_score_unless_ten)


def _describe(question_ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(question_id) for question_id in question_ids[:limit])
    more = len(question_ids) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def vqa_accuracy(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]],
                 scoring: Scoring = SOHO) -> float:
    """Mean :func:`vqa_score` over the questions, in percent (:data:`OFFICIAL` scoring: the server's number).

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
    total = sum(vqa_score(predictions[qid], answers[qid], scoring) for qid in answers)
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
    """Soft target of every distinct normalised answer: its :func:`vqa_score` (soho's scoring) as if it were
    predicted."""
    if not answers:
        raise ValueError("answer_scores: no answers")
    normalized = [normalize_answer(answer) for answer in answers]
    return {answer: _soft_score(answer, normalized, SOHO.plain_score_unless_ten)
            for answer in dict.fromkeys(normalized)}


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
