import functools
import json
from pathlib import Path

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image

from soho.cli.convert_vqa import main
from soho.data.convert import convert
from soho.data.convert.vqa import convert_vqa
from soho.data.tasks import TaskDataset
from soho.eval.vqa import AnswerVocabulary
from soho.processing import ImageTransformConfig
from soho.tasks.vqa import VQATask, soft_score_targets
from soho.tokenizer import train_wordpiece_tokenizer

decode_vqa = VQATask.decode

IMAGE = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)
INFO = {"description": "This is v2.0 of the VQA dataset.", "url": "http://visualqa.org", "version": "2.0",
        "year": 2017, "contributor": "VQA Team", "date_created": "2017-04-26 17:00:44"}
LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/",
           "name": "Creative Commons Attribution 4.0 International License"}


def question(question_id, image_id, text):
    return {"image_id": image_id, "question": text, "question_id": question_id}


def annotation(question_id, image_id, answers, answer_type="other", question_type="what is"):
    """An entry as the official annotation files write it: 10 answers, each with a confidence and an id."""
    return {"question_type": question_type, "multiple_choice_answer": max(answers, key=answers.count),
            "answers": [{"answer": answer, "answer_confidence": "yes" if i % 3 else "maybe", "answer_id": i + 1}
                        for i, answer in enumerate(answers)],
            "image_id": image_id, "answer_type": answer_type, "question_id": question_id}


def write_questions(path: Path, subtype: str, questions):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE,
                                "data_subtype": subtype, "questions": questions}))


def write_annotations(path: Path, subtype: str, annotations):
    path.write_text(json.dumps({"info": INFO, "license": LICENSE, "data_subtype": subtype,
                                "annotations": annotations}))


TRAIN_ANSWERS = {
    458752000: ["net"] * 8 + ["netting", "mesh"],
    458752001: ["pitcher"] * 7 + ["catcher", "pitcher", "Pitcher."],
    458752002: ["2"] * 6 + ["two"] * 3 + ["3"],
}
VAL_ANSWERS = {
    42000: ["pizza"] * 9 + ["cheese pizza"],
    42001: ["yes"] * 10,
    73000: ["2"] * 8 + ["3", "2 "],
    136000: ["cat"] * 10,
    136001: ["no"] * 7 + ["yes"] * 3,
}


def make_vqa(root: Path):
    """The official files (test-dev in a subfolder, as some users unzip) and COCO folders, with planted problems:
    a corrupt and a missing image, a question without annotation, an annotation without question, an annotation
    with 9 answers, and an unusable (empty) val question."""
    vqa, coco = root / "vqa", root / "coco"
    for image_id in (458752, 393221):
        write_image(coco / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", seed=image_id % 97)
    write_corrupt_image(coco / "train2014" / "COCO_train2014_000000262146.jpg")  # 524291: missing
    write_questions(vqa / "v2_OpenEnded_mscoco_train2014_questions.json", "train2014", [
        question(458752000, 458752, "What is this photo taken looking through?"),
        question(458752001, 458752, "What position is this man playing?"),
        question(262146000, 262146, "What color is the snow?"),
        question(524291000, 524291, "How many people are there?"),
        question(393221000, 393221, "Is the sky blue?"),
        question(393221001, 393221, "Is it sunny?"),
        question(458752002, 458752, "How many balls are there?"),
    ])
    write_annotations(vqa / "v2_mscoco_train2014_annotations.json", "train2014", [
        annotation(458752000, 458752, TRAIN_ANSWERS[458752000], question_type="what is this"),
        annotation(458752001, 458752, TRAIN_ANSWERS[458752001], question_type="what"),
        annotation(262146000, 262146, ["white"] * 10, question_type="what color is the"),
        annotation(524291000, 524291, ["3"] * 10, "number", "how many"),
        annotation(393221001, 393221, ["yes"] * 9, "yes/no", "is it"),  # one answer short
        annotation(458752002, 458752, TRAIN_ANSWERS[458752002], "number", "how many"),
        annotation(999999000, 999999, ["no"] * 10, "yes/no", "is the"),  # no question asks for it
    ])
    for image_id in (42, 73, 136):
        write_image(coco / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", 40, 30, seed=image_id)
    write_questions(vqa / "v2_OpenEnded_mscoco_val2014_questions.json", "val2014", [
        question(42000, 42, "What is on the plate?"),
        question(42001, 42, "Is this food?"),
        question(73000, 73, "How many motorcycles are there?"),
        question(136000, 136, "What animal is this?"),
        question(136001, 136, "Is the animal sleeping?"),
        question(73001, 73, ""),
    ])
    write_annotations(vqa / "v2_mscoco_val2014_annotations.json", "val2014", [
        annotation(question_id, question_id // 1000, answers) for question_id, answers in VAL_ANSWERS.items()])
    for image_id in (1, 14):
        write_image(coco / "test2015" / f"COCO_test2015_{image_id:012d}.jpg", seed=image_id)
    write_questions(vqa / "v2_OpenEnded_mscoco_test2015_questions.json", "test2015", [
        question(1000, 1, "Is this a cat?"), question(14000, 14, "What color is the bus?"),
        question(14001, 14, "Where is the bus going?")])
    write_questions(vqa / "Questions" / "v2_OpenEnded_mscoco_test-dev2015_questions.json", "test-dev2015", [
        question(14000, 14, "What color is the bus?")])
    return vqa, coco


def test_converts_every_split_lists_planted_problems_and_loads(tmp_path):
    vqa, coco = make_vqa(tmp_path)
    out = tmp_path / "out"
    conversion = convert_vqa(vqa, coco, vocabulary_path=out / "answer_vocabulary.json")
    manifest = convert(conversion, out, shard_size=2)
    counts = {split: entry["samples"] for split, entry in manifest["splits"].items()}
    assert counts == {"vqa_train": 3, "vqa_val": 5, "vqa_test": 3, "vqa_test_dev": 1}
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == [
        ("vqa_train", "262146000", "corrupt_image"),
        ("vqa_train", "393221000", "no_annotation"),
        ("vqa_train", "393221001", "too_few_answers"),
        ("vqa_train", "524291000", "missing_image"),
        ("vqa_train", "999999000", "no_question"),
        ("vqa_val", "v2_OpenEnded_mscoco_val2014_questions.json#5", "bad_record"),
    ]
    assert all(p["detail"] for p in manifest["problems"])

    train = read_split(out, "vqa_train")
    record = json.loads(train[0]["json"])
    assert record == {"question_id": "458752000", "image_id": "458752",
                      "question": "What is this photo taken looking through?", "answers": TRAIN_ANSWERS[458752000],
                      "answer": "net", "answer_type": "other", "question_type": "what is this", "source": "vqav2",
                      "width": 48, "height": 32}
    example = decode_vqa(train[2])
    assert (example.example_id, example.text, example.target) == ("458752002", "How many balls are there?",
                                                                  TRAIN_ANSWERS[458752002])
    test = [json.loads(s["json"]) for s in read_split(out, "vqa_test")]
    assert [(r["question_id"], r["answers"], "answer" in r) for r in test] == [
        ("1000", [], False), ("14000", [], False), ("14001", [], False)]
    assert json.loads(read_split(out, "vqa_test_dev")[0]["json"])["question"] == "What color is the bus?"

    # The vocabulary is what AnswerVocabulary.build makes of every train + val annotation.
    vocabulary = AnswerVocabulary.load(out / "answer_vocabulary.json")
    answer_lists = [*TRAIN_ANSWERS.values(), ["white"] * 10, ["3"] * 10, ["yes"] * 9, ["no"] * 10,
                    *VAL_ANSWERS.values()]
    assert vocabulary.answers == AnswerVocabulary.build(answer_lists).answers
    stored = json.loads((out / "answer_vocabulary.json").read_text())
    assert dict(zip(stored["answers"], stored["counts"]))["2"] == 2  # "two" and "2 " normalise to "2"
    assert stored["answers"][:3] == ["3", "yes", "2"] and "pitcher" in stored["answers"]
    assert "Pitcher." not in stored["answers"] and "two" not in stored["answers"]
    assert manifest["answer_vocabulary"]["size"] == len(vocabulary) == 13

    tokenizer = train_wordpiece_tokenizer([q for s in train for q in [json.loads(s["json"])["question"]]],
                                          tmp_path / "tokenizer", vocab_size=120)
    batches = list(TaskDataset(str(out / "vqa_val"), decode_vqa, tokenizer, IMAGE, 16, 4, train=False,
                               targets=functools.partial(soft_score_targets, vocabulary)))
    assert sum(b["samples"] for b in batches) == 5 and not any(b["skipped"] for b in batches)
    rows = {i: (b, row) for b in batches for row, i in enumerate(b["example_ids"])}
    assert sorted(rows) == ["136000", "136001", "42000", "42001", "73000"]
    batch, row = rows["42000"]  # 9 x "pizza", 1 x "cheese pizza"
    assert batch["targets"][row] == VAL_ANSWERS[42000] and batch["info"][row]["question_type"] == "what is"
    labels = batch["labels"][row]
    assert labels[vocabulary.index("pizza")] == 1.0 and labels[vocabulary.index("cheese pizza")] == pytest.approx(0.3)
    assert batches[0]["pixel_values"].shape == (4, 3, 32, 32)


def test_cli_minival_by_image_hash_resizes_and_caps_the_vocabulary(tmp_path):
    vqa, coco = make_vqa(tmp_path)
    out = tmp_path / "out"
    assert main(["--vqa-dir", str(vqa), "--images", str(coco), "--out", str(out), "--splits", "train", "val",
                 "--minival-images", "1", "--answer-vocabulary-size", "4", "--max-short-side", "16",
                 "--workers", "1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    counts = {split: entry["samples"] for split, entry in manifest["splits"].items()}
    assert counts == {"vqa_train": 3, "vqa_val_train": 3, "vqa_minival": 2}
    assert manifest["minival"]["images"] == 1
    minival = [json.loads(s["json"]) for s in read_split(out, "vqa_minival")]
    assert [(r["question_id"], r["image_id"]) for r in minival] == [("136000", "136"), ("136001", "136")]
    assert {r["image_id"] for s in read_split(out, "vqa_val_train") for r in [json.loads(s["json"])]} == {"42", "73"}
    assert [p["split"] for p in manifest["problems"] if p["reason"] == "bad_record"] == ["vqa_val_train"]
    assert (minival[0]["width"], minival[0]["height"]) == (21, 16)  # 40 x 30 capped at a short side of 16
    assert AnswerVocabulary.load(out / "answer_vocabulary.json").answers == ["3", "yes", "2", "no"]
    assert manifest["answer_vocabulary"]["size"] == 4


def test_minival_from_a_question_id_file(tmp_path):
    vqa, coco = make_vqa(tmp_path)
    ids = tmp_path / "minival.json"  # LXMERT's minival.json: objects with question_id among other keys
    ids.write_text(json.dumps([{"question_id": 42001, "img_id": "COCO_val2014_000000000042", "sent": "?"},
                               {"question_id": 73000}, {"question_id": 5}]))
    manifest = convert(convert_vqa(vqa, coco, ["val"], minival_question_ids=ids), tmp_path / "out")
    assert {s: e["samples"] for s, e in manifest["splits"].items()} == {"vqa_val_train": 3, "vqa_minival": 2}
    assert manifest["minival"]["not_in_val"] == 1 and "answer_vocabulary" not in manifest
    lines = tmp_path / "minival.txt"
    lines.write_text("42001\n73000\n")
    manifest = convert(convert_vqa(vqa, coco, ["val"], minival_question_ids=lines), tmp_path / "out")
    assert {s: e["samples"] for s, e in manifest["splits"].items()} == {"vqa_val_train": 3, "vqa_minival": 2}


def test_bad_inputs_fail_before_any_work(tmp_path):
    vqa, coco = make_vqa(tmp_path)
    with pytest.raises(ValueError, match="unknown VQA v2 split"):
        convert_vqa(vqa, coco, ["testdev"])
    with pytest.raises(ValueError, match="either"):
        convert_vqa(vqa, coco, minival_images=1, minival_question_ids=tmp_path / "ids.txt")
    with pytest.raises(ValueError, match="between 1 and 2"):
        convert_vqa(vqa, coco, ["val"], minival_images=3)
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps([question(1, 1, "Why?")]))
    with pytest.raises(ValueError, match='v2_OpenEnded_mscoco_val2014_questions.json: expected a JSON object with '
                                         'a "questions" list'):
        convert_vqa(vqa, coco, ["val"])
    (vqa / "v2_mscoco_train2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match="v2_mscoco_train2014_annotations.json"):
        convert_vqa(vqa, coco, ["train"])
    with pytest.raises(FileNotFoundError, match="v2_mscoco_train2014_annotations.json"):  # the vocabulary needs it
        convert_vqa(vqa, coco, ["test"], vocabulary_path=tmp_path / "vocabulary.json")
    with pytest.raises(FileNotFoundError, match="test2015"):
        convert_vqa(vqa, tmp_path / "nowhere", ["test"])
