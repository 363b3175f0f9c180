"""VQA v2 (Goyal et al., CVPR 2017) from its official files to ``vqa_*`` shards and an answer vocabulary.

Inputs, as https://visualqa.org/download.html publishes them (each zip holds one JSON file; they
may lie directly in one folder or in its subfolders, e.g. ``Questions/`` and ``Annotations/``):

- questions (``v2_Questions_{Train,Val,Test}_mscoco.zip``): ``v2_OpenEnded_mscoco_train2014_questions.json``,
  ``..._val2014_...``, ``..._test2015_...`` and ``..._test-dev2015_...`` (the test zip holds both):
  ``{"info", "task_type", "data_type", "data_subtype", "license",
  "questions": [{"image_id": int, "question": str, "question_id": int}]}``.
- annotations (train and val only): ``v2_mscoco_train2014_annotations.json``, ``v2_mscoco_val2014_annotations.json``:
  ``{"info", "license", "data_subtype", "annotations": [{"question_type", "multiple_choice_answer",
  "answers": [{"answer", "answer_confidence", "answer_id"}] (10), "image_id", "answer_type", "question_id"}]}``.
- images, from COCO: ``train2014/COCO_train2014_%012d.jpg``, ``val2014/COCO_val2014_%012d.jpg`` and
  ``test2015/COCO_test2015_%012d.jpg`` (test-dev is a subset of test2015 and uses its images).

One sample per question. ``vqa_test`` and ``vqa_test_dev`` are for the evaluation server: their
records have ``"answers": []`` and no ``answer``. A held-out minival can be cut out of val
(``vqa_val_train`` + ``vqa_minival`` instead of ``vqa_val``) by a deterministic rule.

The annotation files are read whole with ``json.load`` (the train file is ~300 MB on disk and a few
GB in memory while parsed) and indexed once by question id; only one split's files are in memory
at a time. The answer vocabulary reads the train and val annotations once more, before any shard.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple, Union

from soho.data.convert.inputs import load_json, require_file
from soho.data.convert.writer import Conversion, Problem, Sample, safe_key
from soho.eval.vqa import NUM_ANNOTATORS, AnswerVocabulary, normalize_answer

SOURCE = "vqav2"
VOCABULARY_FILE = "answer_vocabulary.json"
VOCABULARY_SIZE = 3129


@dataclass(frozen=True)
class SplitFiles:
    questions: str
    annotations: Optional[str]
    images: str
    """COCO image folder, also the middle part of its file names."""


SPLITS: Dict[str, SplitFiles] = {
    "train": SplitFiles("v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
                        "train2014"),
    "val": SplitFiles("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014"),
    "test": SplitFiles("v2_OpenEnded_mscoco_test2015_questions.json", None, "test2015"),
    "test_dev": SplitFiles("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015"),
}

PathLike = Union[str, Path]
Item = Union[Sample, Problem]
HeldOut = Callable[[int, int], bool]
"""(question id, image id) -> whether the question belongs to the minival."""


def find_file(vqa_dir: Path, name: str) -> Path:
    """``vqa_dir/name`` or ``vqa_dir/<subfolder>/name`` (zips unpacked into folders of their own)."""
    candidates = [vqa_dir / name, *sorted(vqa_dir.glob(f"*/{name}"))]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise FileNotFoundError(f"VQA v2 file {name} not found in {vqa_dir} or its subfolders "
                                f"(download it from https://visualqa.org/download.html)")
    return found[0]


def load_entries(path: Path, key: str) -> List[Any]:
    """The ``key`` list of an official VQA JSON file; an error naming the file when it is not one."""
    data = load_json(path, "VQA v2 file")
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f'{path}: expected a JSON object with a "{key}" list, as the official VQA v2 files have')
    return data[key]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def image_path(coco_dir: Path, folder: str, image_id: int) -> Path:
    return coco_dir / folder / f"COCO_{folder}_{image_id:012d}.jpg"


# ----------------------------------------------------------------------------- minival

def _image_rank(image_id: int) -> str:
    # A hash, not the id itself: consecutive COCO ids are not a random sample.
    return hashlib.sha256(str(image_id).encode()).hexdigest()


def minival_by_images(val_questions: Path, count: int) -> Tuple[HeldOut, Dict[str, Any]]:
    """The ``count`` val images with the smallest sha256 of their decimal id, and what describes the choice."""
    image_ids = {q["image_id"] for q in load_entries(val_questions, "questions")
                 if isinstance(q, dict) and _is_int(q.get("image_id"))}
    if not 0 < count < len(image_ids):
        raise ValueError(f"the minival must have between 1 and {len(image_ids) - 1} images (val has "
                         f"{len(image_ids)}), got {count}")
    chosen = frozenset(sorted(image_ids, key=_image_rank)[:count])
    return (lambda question_id, image_id: image_id in chosen), {
        "rule": "the val images with the smallest sha256 of their decimal image id", "images": count}


def read_question_ids(path: Path) -> FrozenSet[int]:
    """Question ids from a JSON list (of ids, or of objects with ``question_id`` such as LXMERT's
    ``minival.json``) or from a text file with one id per line."""
    require_file(path, "minival question id file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    else:
        entries = text.split()
    ids = set()
    for index, entry in enumerate(entries):
        value = entry.get("question_id") if isinstance(entry, dict) else entry
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not _is_int(value):
            raise ValueError(f"{path}: entry {index} ({entry!r}) is not a question id")
        ids.add(value)
    if not ids:
        raise ValueError(f"{path}: no question ids")
    return frozenset(ids)


def minival_by_question_ids(val_questions: Path, ids_file: Path) -> Tuple[HeldOut, Dict[str, Any]]:
    ids = read_question_ids(ids_file)
    val_ids = {q.get("question_id") for q in load_entries(val_questions, "questions") if isinstance(q, dict)}
    unknown = len(ids - val_ids)
    if unknown == len(ids):
        raise ValueError(f"{ids_file}: none of its {len(ids)} question ids is a val question")
    return (lambda question_id, image_id: question_id in ids), {
        "rule": f"question ids listed in {ids_file}", "question_ids": len(ids), "not_in_val": unknown}


# ----------------------------------------------------------------------------- records

def index_annotations(annotations: List[Any], path: Path) -> Tuple[Dict[int, Dict[str, Any]], List[Problem]]:
    """Annotations by question id, and the ones that cannot be indexed."""
    index: Dict[int, Dict[str, Any]] = {}
    problems = []
    for position, annotation in enumerate(annotations):
        question_id = annotation.get("question_id") if isinstance(annotation, dict) else None
        if not _is_int(question_id):
            problems.append(Problem(f"{path.name}#{position}", "bad_record",
                                    f"{path}: annotations[{position}] has no integer question_id"))
        elif question_id in index:
            problems.append(Problem(safe_key(question_id), "duplicate_annotation",
                                    f"{path}: a second annotation of question {question_id} (annotations[{position}])"))
        else:
            index[question_id] = annotation
    return index, problems


def _answers(annotation: Dict[str, Any]) -> Optional[List[str]]:
    answers = annotation.get("answers")
    if not isinstance(answers, list):
        return None
    texts = [answer.get("answer") if isinstance(answer, dict) else None for answer in answers]
    return texts if all(isinstance(text, str) for text in texts) else None


def make_sample(record: Dict[str, Any], annotation: Dict[str, Any], image: Path, where: str) -> Item:
    """The sample of a question (``record``) and its annotation, or the problem that keeps it out."""
    key = safe_key(record["question_id"])
    answers = _answers(annotation)
    if answers is None:
        return Problem(key, "bad_record", f"{where}: answers={annotation.get('answers')!r} "
                                          '(expected a list of {"answer": str})')
    if len(answers) != NUM_ANNOTATORS:
        return Problem(key, "too_few_answers" if len(answers) < NUM_ANNOTATORS else "too_many_answers",
                       f"{where}: {len(answers)} answers, VQA v2 has {NUM_ANNOTATORS} per question")
    if str(annotation.get("image_id")) != record["image_id"]:
        return Problem(key, "image_mismatch", f"{where}: the annotation is of image {annotation.get('image_id')!r}, "
                                              f"the question of image {record['image_id']}")
    fields = {name: annotation.get(name) for name in ("multiple_choice_answer", "answer_type", "question_type")}
    wrong = {name: value for name, value in fields.items() if not isinstance(value, str)}
    if wrong:
        return Problem(key, "bad_record", f"{where}: {wrong} (expected strings)")
    return Sample(key, {**record, "answers": answers, "answer": fields["multiple_choice_answer"],
                        "answer_type": fields["answer_type"], "question_type": fields["question_type"],
                        "source": SOURCE}, {"": image})


def split_stream(questions_path: Path, annotations_path: Optional[Path], coco_dir: Path, folder: str,
                 held_out: Optional[HeldOut] = None, keep_held_out: bool = False) -> Iterator[Item]:
    """One split's samples in question-file order, then the annotations no question asked for.

    With ``held_out``, only the questions whose ``held_out(question_id, image_id)`` equals
    ``keep_held_out`` (the minival, or the rest of val); entries that belong to neither (no ids)
    are reported with the rest of val."""
    def selected(question_id: Any, image_id: Any) -> bool:
        return held_out is None or held_out(question_id, image_id) == keep_held_out

    reports_unassigned = held_out is None or not keep_held_out
    annotations: Optional[Dict[int, Dict[str, Any]]] = None
    if annotations_path is not None:
        annotations, problems = index_annotations(load_entries(annotations_path, "annotations"), annotations_path)
        yield from (problem for problem in problems if reports_unassigned)
    for position, question in enumerate(load_entries(questions_path, "questions")):
        where = f"{questions_path.name} questions[{position}]"
        fields = question if isinstance(question, dict) else {}
        question_id, image_id, text = fields.get("question_id"), fields.get("image_id"), fields.get("question")
        if not (_is_int(question_id) and _is_int(image_id) and isinstance(text, str) and text.strip()):
            if reports_unassigned:
                yield Problem(f"{questions_path.name}#{position}", "bad_record",
                              f"{where}: {question!r} (expected integer question_id and image_id, a question)")
            continue
        annotation = annotations.pop(question_id, None) if annotations is not None else None
        if not selected(question_id, image_id):
            continue
        record: Dict[str, Any] = {"question_id": str(question_id), "image_id": str(image_id), "question": text}
        image = image_path(coco_dir, folder, image_id)
        if annotations is None:  # test splits: questions only
            yield Sample(safe_key(question_id), {**record, "answers": [], "source": SOURCE}, {"": image})
        elif annotation is None:
            yield Problem(safe_key(question_id), "no_annotation",
                          f"{where}: question {question_id} has no entry in {annotations_path}")
        else:
            yield make_sample(record, annotation, image, f"{annotations_path.name}, question {question_id}")
    for question_id, annotation in (annotations or {}).items():
        if selected(question_id, annotation.get("image_id")):
            yield Problem(safe_key(question_id), "no_question",
                          f"{annotations_path.name}: question {question_id} is annotated but not in {questions_path}")


# ----------------------------------------------------------------------------- answer vocabulary

def count_answers(annotation_paths: Sequence[Path]) -> Counter:
    """For every normalised answer, in how many questions at least one annotator gave it
    (what ``AnswerVocabulary.build`` ranks by)."""
    normalize = lru_cache(maxsize=None)(normalize_answer)  # ~6.6 M answers, a few hundred thousand distinct
    counts: Counter = Counter()
    for path in annotation_paths:
        for annotation in load_entries(path, "annotations"):
            answers = _answers(annotation) if isinstance(annotation, dict) else None
            if answers:
                counts.update({normalize(answer) for answer in answers})
    return counts


def write_answer_vocabulary(annotation_paths: Sequence[Path], path: PathLike, size: int) -> Dict[str, Any]:
    """Write the ``size`` most frequent answers (ties alphabetical, as ``AnswerVocabulary.build``) with their
    counts to ``path``, loadable by ``AnswerVocabulary.load``; returns the manifest entry."""
    counts = count_answers(annotation_paths)
    vocabulary = AnswerVocabulary(sorted(counts, key=lambda answer: (-counts[answer], answer))[:size])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counted = (f"questions of {' + '.join(p.name for p in annotation_paths)} in which at least one of the "
               f"{NUM_ANNOTATORS} annotators gave the answer, after soho.eval.vqa.normalize_answer")
    path.write_text(json.dumps({"answers": vocabulary.answers, "counts": [counts[a] for a in vocabulary.answers],
                                "counted": counted}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"path": str(path), "size": len(vocabulary), "answers_seen": len(counts),
            "smallest_count": counts[vocabulary.answers[-1]] if len(vocabulary) else 0}


# ----------------------------------------------------------------------------- conversion

def convert_vqa(vqa_dir: PathLike, coco_dir: PathLike, splits: Sequence[str] = tuple(SPLITS),
                minival_images: int = 0, minival_question_ids: Optional[PathLike] = None,
                vocabulary_path: Optional[PathLike] = None, vocabulary_size: int = VOCABULARY_SIZE) -> Conversion:
    """The plan for ``vqa_<split>`` shards from the VQA v2 JSON files in ``vqa_dir`` and COCO images in ``coco_dir``.

    Every input is checked here, before any work. With ``minival_images`` or ``minival_question_ids``
    val becomes ``vqa_val_train`` + ``vqa_minival``. With ``vocabulary_path`` the ``vocabulary_size``
    most frequent train + val answers are written there (and described in the manifest)."""
    vqa_dir, coco_dir = Path(vqa_dir), Path(coco_dir)
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"unknown VQA v2 split(s) {unknown}; expected some of {', '.join(SPLITS)}")
    if minival_images and minival_question_ids:
        raise ValueError("give either minival_images or minival_question_ids, not both")
    wants_minival = bool(minival_images or minival_question_ids)
    if wants_minival and "val" not in splits:
        raise ValueError("a minival is cut out of val: add val to the splits")
    if not vqa_dir.is_dir():
        raise FileNotFoundError(f"VQA v2 folder not found: {vqa_dir}")
    needed = list(splits) + [s for s in ("train", "val") if vocabulary_path is not None and s not in splits]
    files = {split: (find_file(vqa_dir, SPLITS[split].questions),
                     find_file(vqa_dir, SPLITS[split].annotations) if SPLITS[split].annotations else None)
             for split in needed}
    for split in splits:
        folder = coco_dir / SPLITS[split].images
        if not folder.is_dir():
            raise FileNotFoundError(f"COCO images for VQA {split} not found: {folder} (unpack {folder.name}.zip "
                                    f"from https://cocodataset.org/#download into {coco_dir})")

    extra: Dict[str, Any] = {}
    streams: Dict[str, Iterator[Item]] = {}
    for split in splits:
        questions, annotations = files[split]
        folder = SPLITS[split].images
        if split == "val" and wants_minival:
            held_out, extra["minival"] = (minival_by_images(questions, minival_images) if minival_images
                                          else minival_by_question_ids(questions, Path(minival_question_ids)))
            streams["vqa_val_train"] = split_stream(questions, annotations, coco_dir, folder, held_out, False)
            streams["vqa_minival"] = split_stream(questions, annotations, coco_dir, folder, held_out, True)
        else:
            streams[f"vqa_{split}"] = split_stream(questions, annotations, coco_dir, folder)
    if vocabulary_path is not None:
        extra["answer_vocabulary"] = write_answer_vocabulary([files["train"][1], files["val"][1]], vocabulary_path,
                                                             vocabulary_size)
    # The streams parse their files lazily; a file that is not what it should be fails here, before any shard.
    for split in splits:
        questions, annotations = files[split]
        load_entries(questions, "questions")
        if annotations is not None and vocabulary_path is None:  # the vocabulary has read them already
            load_entries(annotations, "annotations")
    return Conversion(
        converter="vqav2",
        splits=streams,
        tasks={split: "vqa" for split in streams},
        inputs={"questions": {split: str(files[split][0]) for split in splits},
                "annotations": {split: str(files[split][1]) for split in splits if files[split][1]},
                "images": {split: str(coco_dir / SPLITS[split].images) for split in splits}},
        extra=extra,
    )
