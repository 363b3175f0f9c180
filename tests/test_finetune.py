import functools
import importlib
import io
import itertools
import json
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from soho.config import ConfigError, to_dict
from soho.data.synthetic import SyntheticWorldConfig, generate_world
from soho.data.tasks import TaskDataset, class_targets
from soho.eval.tasks import accuracy_metrics, vqa_metrics
from soho.eval.vqa import AnswerVocabulary
from soho.models.pretrained import read_config
from soho.models.soho import SohoForPretraining
from soho.models.tasks import SohoForNLVR2, SohoForVisualEntailment, SohoForVQA, vqa_loss
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tasks import TASKS, load_run_config
from soho.tasks.ve import VisualEntailmentTask
from soho.tasks.vqa import VQATask, load_answer_vocabulary, soft_score_targets
from soho.tokenizer import load_tokenizer
from soho.train.trainer import flat_scalars, train

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"pretrain": 8, "retrieval_train": 12, "retrieval_val": 6, "nlvr2_train": 16, "nlvr2_val": 6,
          "ve_train": 18, "ve_val": 9, "vqa_train": 18, "vqa_val": 9}
IMAGE = ImageTransformConfig(min_size=32, max_size=32, size_divisor=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world and a tiny pre-trained (random) checkpoint with its processor."""
    root = tmp_path_factory.mktemp("finetune")
    generate_world(SyntheticWorldConfig(image_size=32, split_sizes=SPLITS, shard_size=4, num_workers=1,
                                        tokenizer_vocab_size=300), root / "data")
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"encoder.vocab_size": len(tokenizer), "itc.enabled": True,
                                              "encoder.max_position_embeddings": 40}))
    model.save_pretrained(root / "pretrained", processor=SohoProcessor(tokenizer, IMAGE, max_text_length=40))
    return root


def run_config(world, task, output_dir, **overrides):
    overrides = {"train.max_steps": 4, "train.batch_size": 4, "train.eval_batch_size": 4, "train.log_every": 2,
                 "data.num_workers": 0, "data.shuffle_buffer": 4, "optim.warmup_steps": 1, **overrides}
    return load_run_config(ROOT / "configs" / "finetune" / f"{task}_synthetic.yaml", [
        f"init.checkpoint={world / 'pretrained'}", f"data.train_shards={world / 'data' / f'{task}_train'}",
        f"data.eval_shards={{val: {world / 'data' / f'{task}_val'}}}", f"train.output_dir={output_dir}",
        *[f"{key}={value}" for key, value in overrides.items()]])


def test_every_shipped_finetune_config_validates():
    for path in sorted((ROOT / "configs" / "finetune").glob("*.yaml")):
        config = load_run_config(path)
        assert path.stem.startswith(config.task), path


def test_task_batches(world):
    processor = SohoProcessor.from_pretrained(world / "pretrained")
    vocabulary = AnswerVocabulary(["yes", "no", "2", "red"])
    for task, images_per_text in (("nlvr2", 2), ("ve", 1), ("vqa", 1)):
        targets = functools.partial(soft_score_targets, vocabulary) if task == "vqa" else class_targets
        dataset = TaskDataset(str(world / "data" / f"{task}_val"), TASKS[task].decode, processor.tokenizer, IMAGE,
                              40, 4, train=False, targets=targets)
        batches = list(dataset)
        assert sum(b["samples"] for b in batches) == SPLITS[f"{task}_val"]
        batch = batches[0]
        assert batch["pixel_values"].shape == (4 * images_per_text, 3, 32, 32)
        assert batch["input_ids"].shape[0] == 4 and len(batch["example_ids"]) == 4
        if task == "vqa":
            assert batch["labels"].shape == (4, 4)
            for answers, scores in zip(batch["targets"], batch["labels"]):
                expected = [min(1.0, sum(a == name for a in answers) * 0.3) if answers.count(name) < 4 else 1.0
                            for name in vocabulary.answers]
                assert scores.tolist() == pytest.approx(expected)
        else:
            assert batch["labels"].tolist() == batch["targets"]


def test_broken_task_samples_are_skipped_and_counted(world, tmp_path):
    shard = tmp_path / "ve-000000.tar"
    good = next(iter(tarfile.open(next((world / "data" / "ve_val").glob("*.tar")))))
    with tarfile.open(next((world / "data" / "ve_val").glob("*.tar"))) as source, tarfile.open(shard, "w") as tar:
        members = {m.name: source.extractfile(m).read() for m in source if m.isfile()}
        key = good.name.split(".")[0]
        record = json.loads(members[f"{key}.json"])

        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add(f"{key}.jpg", members[f"{key}.jpg"])
        add(f"{key}.json", members[f"{key}.json"])
        add("bad1.jpg", members[f"{key}.jpg"])
        add("bad1.json", json.dumps({**record, "label": "maybe"}).encode())
        add("bad2.json", json.dumps(record).encode())
        add("bad3.jpg", b"not an image")
        add("bad3.json", json.dumps(record).encode())
    processor = SohoProcessor.from_pretrained(world / "pretrained")
    batches = list(TaskDataset(str(shard), VisualEntailmentTask.decode, processor.tokenizer, IMAGE, 40, 8,
                               train=False))
    assert [b["samples"] for b in batches] == [1]
    assert batches[0]["skipped"] == {"bad_record": 1, "missing_image": 1, "corrupt_image": 1}


@pytest.mark.parametrize("cls, images_per_text, labels", [
    (SohoForVisualEntailment, 1, ["entailment", "neutral", "contradiction"]),
    (SohoForNLVR2, 2, ["false", "true"]),
    (SohoForVQA, 1, ["yes", "no", "1", "2", "red"]),
])
def test_heads_fit_a_fixed_batch(cls, images_per_text, labels):
    torch.manual_seed(0)
    model = cls(tiny_config(labels=labels))
    texts = 4
    pixel_values = torch.randn(texts * images_per_text, 3, 32, 32)
    input_ids = torch.randint(5, 60, (texts, 7))
    if cls is SohoForVQA:
        targets = torch.zeros(texts, len(labels))
        targets[torch.arange(texts), torch.tensor([0, 1, 4, 2])] = 1.0
        targets[0, 2] = 0.3
        # Soft targets cannot be fitted to zero loss: the floor is their summed binary entropy.
        floor = vqa_loss(torch.logit(targets.clamp(1e-6, 1 - 1e-6)), targets).item()
    else:
        targets = torch.arange(texts) % len(labels)
        floor = 0.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        out = model(pixel_values=pixel_values, input_ids=input_ids, labels=targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.logits.shape == (texts, len(labels))
    assert losses[-1] - floor < 0.5 * (losses[0] - floor)
    assert model.soho.backbone.proj.weight.grad.abs().sum() > 0, "the CNN must get gradients"
    predictions = model.eval().predict(pixel_values, input_ids)
    assert len(predictions) == texts and set(predictions) <= set(labels)


def test_nlvr2_pairs_each_text_with_its_two_images():
    torch.manual_seed(0)
    # Continuous features: a random dictionary would map both images to the same entries.
    model = SohoForNLVR2(tiny_config(labels=["false", "true"], use_visual_dictionary=False,
                                     **{"loss_weights.mvm": 0.0})).eval()
    pixel_values = torch.randn(6, 3, 32, 32)
    input_ids = torch.randint(5, 60, (3, 7))
    logits = model.logits(pixel_values, input_ids)
    single = model.logits(pixel_values[2:4], input_ids[1:2])
    torch.testing.assert_close(logits[1:2], single, atol=1e-5, rtol=0)
    swapped = model.logits(pixel_values[[3, 2]], input_ids[1:2])
    assert not torch.allclose(swapped, single), "left and right must not be interchangeable"
    with pytest.raises(ValueError, match="2 image"):
        model.logits(pixel_values[:5], input_ids)


def test_vqa_loss_is_bce_summed_over_answers():
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3]])
    expected = sum(-(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))
                   for x, t in zip(logits[0], targets[0]))
    assert vqa_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_classification_metrics_by_hand():
    predictions = [{"id": "a", "prediction": "true", "label": "true"},
                   {"id": "b", "prediction": "true", "label": "false"},
                   {"id": "c", "prediction": "false", "label": "false"},
                   {"id": "d", "prediction": "false", "label": "false"}]
    assert accuracy_metrics(predictions) == {"accuracy": 75.0, "chance_accuracy": 75.0}
    vqa = [{"id": "q1", "prediction": "two", "answers": ["2"] * 10, "answer_type": "number"},
           {"id": "q2", "prediction": "yes", "answers": ["yes"] * 2 + ["no"] * 8, "answer_type": "yes/no"}]
    metrics = vqa_metrics(vqa)
    # The ceiling: the best class for each question. With "2" and "no" both can score 1; with "yes" alone,
    # q1 nothing and q2 0.6 (2 of 10 said "yes").
    assert VQATask.metrics(vqa, ["2", "no"])["ceiling_vqa_accuracy"] == pytest.approx(100.0)
    assert VQATask.metrics(vqa, ["yes"])["ceiling_vqa_accuracy"] == pytest.approx(30.0)
    # Per question type, against that type's best single answer.
    typed = [{**p, "question_type": kind} for p, kind in zip(vqa + vqa, ["count", "verify", "count", "verify"])]
    typed[2] = {**typed[2], "id": "q3", "prediction": "3", "answers": ["3"] * 10}
    typed[3] = {**typed[3], "id": "q4", "prediction": "no", "answers": ["no"] * 10}
    by_type = VQATask.metrics(typed, ["2", "3", "yes", "no"])
    assert by_type["vqa_accuracy_type_count"] == pytest.approx(100.0)
    assert by_type["chance_vqa_accuracy_type_count"] == pytest.approx(50.0)
    assert by_type["vqa_accuracy_type_verify"] == pytest.approx(80.0)  # "yes" 0.6, "no" 1
    assert by_type["chance_vqa_accuracy_type_verify"] == pytest.approx(100.0)  # always "no"
    # q1: "two" normalises to "2", all 10 agree -> 1; q2: 2 of 10 say yes -> 0.6.
    assert metrics["vqa_accuracy"] == pytest.approx(80.0)
    assert metrics["vqa_accuracy_number"] == pytest.approx(100.0)
    assert metrics["vqa_accuracy_yes_no"] == pytest.approx(60.0)
    # Best constant answer: "2" scores 1 + 0, "no" 0 + 1, "yes" 0 + 0.6 -> 50 %.
    assert metrics["chance_vqa_accuracy"] == pytest.approx(50.0)
    # Officially q1's unanimous answers leave "two" unnormalised, and it is not "2": (0 + 0.6) / 2.
    assert metrics["vqa_accuracy_official"] == pytest.approx(30.0)


@pytest.mark.parametrize("task", ["ve", "nlvr2", "vqa", "retrieval"])
def test_finetune_writes_results_predictions_and_a_loadable_model(world, tmp_path, task):
    overrides = {"retrieval.protocols": "[itc, itc_itm, itm_all]", "retrieval.k": 3} if task == "retrieval" else {}
    results = train(run_config(world, task, tmp_path / task, **overrides))
    assert results["steps"] == 4 and results["init"] == str(world / "pretrained")
    metrics = results["splits"]["val"]["metrics"]
    predictions = [json.loads(line) for line in (tmp_path / task / "predictions_val.jsonl").open()]
    records = [json.loads(line) for line in (tmp_path / task / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert records[-1]["final"] and json.loads((tmp_path / task / "results.json").read_text())["task"] == task
    if task == "retrieval":
        assert {"itc/rsum", "itc_itm/rsum", "itm_all/rsum", "chance/rsum", "ceiling/rsum"} <= set(metrics)
        assert metrics["chance/rsum"] < metrics["ceiling/rsum"] <= 600
        assert len(predictions) == 3 * 6 * 5  # protocols x images x captions
        return
    assert len(predictions) == SPLITS[f"{task}_val"]
    key = "vqa_accuracy" if task == "vqa" else "accuracy"
    assert 0.0 <= metrics[key] <= 100.0 and f"chance_{key}" in metrics
    cls = {"ve": SohoForVisualEntailment, "nlvr2": SohoForNLVR2, "vqa": SohoForVQA}[task]
    model = cls.from_pretrained(tmp_path / task / "model")
    processor = SohoProcessor.from_pretrained(tmp_path / task / "model")
    again = TASKS[task].evaluate_model(model, processor, str(world / "data" / f"{task}_val"), 3, accelerator=None)
    assert again.metrics == pytest.approx(metrics)
    assert [p["prediction"] for p in again.predictions] == [p["prediction"] for p in predictions]


def test_from_scratch_keeps_the_architecture_but_not_the_weights(world, tmp_path):
    task = VisualEntailmentTask(run_config(world, "ve", tmp_path, **{"init.from_scratch": "true"}))
    task.setup(accelerator=None)
    scratch = task.build_model()
    assert scratch.config.labels == ["entailment", "neutral", "contradiction"]
    pretrained = SohoForPretraining.from_pretrained(world / "pretrained")
    assert to_dict(scratch.config.encoder) == to_dict(pretrained.config.encoder)
    assert not torch.equal(scratch.soho.encoder.layers[0].attention.query.weight,
                           pretrained.soho.encoder.layers[0].attention.query.weight)


def test_retrieval_adds_missing_itc_heads_with_a_note(world, tmp_path, caplog):
    config = run_config(world, "retrieval", tmp_path, **{"init.model_overrides": "['itc.enabled=false']"})
    task = TASKS["retrieval"](config)
    task.setup(accelerator=None)
    assert task.architecture.itc.enabled and "has no ITC heads (pre-trained without ITC)" in caplog.text
    # ITM alone needs no ITC heads, as long as no protocol ranks with them; the objectives it leaves out weigh 0.
    without_itc = {"init.model_overrides": "['itc.enabled=false']", "retrieval.objectives": "{itm: 1.0}"}
    with pytest.raises(ConfigError, match=r"retrieval.protocols \['itc', 'itc_itm'\] need ITC heads"):
        TASKS["retrieval"](run_config(world, "retrieval", tmp_path, **without_itc)).setup(accelerator=None)
    task = TASKS["retrieval"](run_config(world, "retrieval", tmp_path, **without_itc,
                                         **{"retrieval.protocols": "[itm_all]"}))
    task.setup(accelerator=None)
    assert not task.architecture.itc.enabled
    assert task.architecture.loss_weights == {"itc": 0.0, "itm": 1.0, "mlm": 0.0, "mvm": 0.0}


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(world, tmp_path):
    train(run_config(world, "vqa", tmp_path / "run"))
    outputs = {}
    for processes in (1, 2):
        output = tmp_path / f"eval{processes}"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", str(processes),
                   str(ROOT / "tools" / "evaluate.py"), "vqa", "--checkpoint", str(tmp_path / "run" / "model"),
                   "--shards", str(world / "data" / "vqa_val"), "--batch-size", "2", "--output", str(output)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[processes] = json.loads((output / "results.json").read_text())
        assert outputs[processes]["cost"]["processes"] == processes
        lines = (output / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == SPLITS["vqa_val"] == len({json.loads(line)["id"] for line in lines})
    assert outputs[2]["metrics"] == pytest.approx(outputs[1]["metrics"])


@pytest.mark.slow
def test_two_process_retrieval_shares_the_fusion_passes_and_equals_one_process(world, tmp_path):
    outputs = {}
    for processes in (1, 2):
        output = tmp_path / f"eval{processes}"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", str(processes),
                   str(ROOT / "tools" / "evaluate.py"), "retrieval", "--checkpoint", str(world / "pretrained"),
                   "--shards", str(world / "data" / "retrieval_val"), "--protocols", "itm_all", "itc", "itc_itm",
                   "--k", "3", "--fusion-batch-size", "7", "--output", str(output)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[processes] = json.loads((output / "results.json").read_text())
        assert outputs[processes]["cost"]["processes"] == processes
        # 6 images x 5 captions: 30 texts, each with its 3 most likely images, in both directions.
        assert outputs[processes]["cost"]["itc_itm"]["fusion_passes"] == 30 * 3 + 6 * 3
        assert len((output / "predictions.jsonl").read_text().splitlines()) == 3 * 30
    assert outputs[2]["metrics"] == pytest.approx(outputs[1]["metrics"])



def write_unlabelled_vqa_shard(world, path):
    """The tiny world's vqa_val questions as the VQA v2 converter writes test-dev: integer ids, ``"answers": []``."""
    records = []
    with tarfile.open(path, "w") as tar:
        for source in sorted((world / "data" / "vqa_val").glob("*.tar")):
            with tarfile.open(source) as shard:
                files = {m.name: shard.extractfile(m).read() for m in shard if m.isfile()}
            for name in sorted(n for n in files if n.endswith(".json")):
                record = json.loads(files[name])
                # Ids of 1 to 4 digits: the submission must sort them as numbers, not as strings.
                question_id = str(10 ** (len(records) % 4) + len(records))
                records.append({"question_id": question_id, "image_id": record["image_id"],
                                "question": record["question"], "answers": [], "source": "vqav2"})
                for member, payload in ((f"{question_id}.jpg", files[name.replace(".json", ".jpg")]),
                                        (f"{question_id}.json", json.dumps(records[-1]).encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return records


def load_tool(name):
    return importlib.import_module(f"soho.cli.{name}")


def test_questions_without_answers_are_read_for_prediction_only(world, tmp_path):
    questions = write_unlabelled_vqa_shard(world, tmp_path / "unlabelled.tar")
    tokenizer = SohoProcessor.from_pretrained(world / "pretrained").tokenizer
    vocabulary = AnswerVocabulary(["yes", "no"])

    def dataset(shards, labelled=True, **kwargs):
        return TaskDataset(shards, lambda sample: VQATask.decode(sample, labelled), tokenizer, IMAGE, 40, 4,
                           targets=functools.partial(soft_score_targets, vocabulary) if labelled else None, **kwargs)

    # Training on labelled and unlabelled questions together: the unlabelled ones stay counted skips.
    mixed = dataset([str(world / "data" / "vqa_val"), str(tmp_path / "unlabelled.tar")], train=True, shuffle_buffer=4)
    batches = list(itertools.islice(mixed, 6))  # 24 labelled questions: the 9 of vqa_val read more than twice
    skipped = sum((Counter(batch["skipped"]) for batch in batches), Counter())
    assert set(skipped) == {"bad_record"} and skipped["bad_record"] >= len(questions)
    assert all(batch["samples"] == 4 and batch["labels"].shape == (4, 2) for batch in batches)
    labelled = list(dataset(str(tmp_path / "unlabelled.tar"), train=False))
    assert [batch["samples"] for batch in labelled] == [0] and labelled[0]["skipped"] == {"bad_record": 9}

    unlabelled = list(dataset(str(tmp_path / "unlabelled.tar"), train=False, labelled=False))
    ids = sorted(example_id for batch in unlabelled for example_id in batch["example_ids"])
    assert ids == sorted(q["question_id"] for q in questions)
    assert all("labels" not in batch and not batch["skipped"] for batch in unlabelled)


def test_vqa_with_a_vocabulary_file_writes_a_submission_for_unlabelled_questions(world, tmp_path):
    vocabulary = AnswerVocabulary(["yes", "no", "2", "red", "circle"])
    vocabulary.save(tmp_path / "answer_vocabulary.json")
    train(run_config(world, "vqa", tmp_path / "run", **{"data.answer_vocabulary": tmp_path / "answer_vocabulary.json"}))
    model = tmp_path / "run" / "model"
    assert read_config(model).labels == vocabulary.answers

    questions = write_unlabelled_vqa_shard(world, tmp_path / "vqa_test_dev-000000.tar")
    evaluate = load_tool("evaluate")
    args = ["vqa", "--checkpoint", str(model), "--shards", str(tmp_path / "vqa_test_dev-000000.tar"),
            "--batch-size", "4", "--device", "cpu"]
    assert evaluate.main([*args, "--predict-only", "--output", str(tmp_path / "test_dev")]) == 0
    entries = json.loads((tmp_path / "test_dev" / "submission.json").read_text())
    assert [entry["question_id"] for entry in entries] == sorted(int(q["question_id"]) for q in questions)
    assert all(type(entry["question_id"]) is int and entry["answer"] in vocabulary.answers for entry in entries)
    results = json.loads((tmp_path / "test_dev" / "results.json").read_text())
    assert results["metrics"] == {} and results["skipped"] == {}
    assert results["submission"]["questions"] == len(questions)
    # Without --predict-only there is nothing to score a prediction against: every question is a counted skip.
    with pytest.raises(ValueError, match="every sample was skipped .*'bad_record': 9"):
        evaluate.main([*args, "--output", str(tmp_path / "scored")])


def test_answer_vocabulary_file_is_checked_before_training(world, tmp_path):
    path = tmp_path / "answer_vocabulary.json"

    def config(task="vqa", **overrides):
        return run_config(world, task, tmp_path / "run", **{"data.answer_vocabulary": path, **overrides})

    with pytest.raises(ConfigError, match="data.answer_min_count=2 .* data.answer_vocabulary="):
        config(**{"data.answer_min_count": 2})
    with pytest.raises(ConfigError, match="unknown config key.* data.answer_vocabulary"):
        config("ve")
    with pytest.raises(ConfigError, match=f"data.answer_vocabulary: answer vocabulary {re.escape(str(path))}: no such"):
        train(config())
    assert not (tmp_path / "run").exists(), "nothing is written before the vocabulary is read"
    for content, message in (("{answers", "not valid JSON"), ('{"answers": []}', "lists no answers"),
                             ('{"answers": ["Yes"]}', "must be normalised"),
                             ('{"answers": ["yes", "no", "red"]}', "lists 3 answers, more than "
                                                                   "data.answer_vocabulary_size=2")):
        path.write_text(content)
        with pytest.raises(ConfigError, match=f"data.answer_vocabulary: .*{re.escape(str(path))}.*{message}"):
            load_answer_vocabulary(config(**{"data.answer_vocabulary_size": 2}).data)
    path.write_text('{"answers": ["yes", "no"]}')
    assert load_answer_vocabulary(config(**{"data.answer_vocabulary_size": 2}).data).answers == ["yes", "no"]


def test_retrieval_evaluation_in_bf16_reports_its_precision_and_agrees_with_float32(world, tmp_path):
    evaluate = load_tool("evaluate")
    results = {}
    for precision in ("no", "bf16"):
        output = tmp_path / precision
        assert evaluate.main(["retrieval", "--checkpoint", str(world / "pretrained"),
                              "--shards", str(world / "data" / "retrieval_val"), "--protocols", "itm_all", "itc",
                              "--mixed-precision", precision, "--output", str(output)]) == 0
        results[precision] = json.loads((output / "results.json").read_text())
        assert results[precision]["cost"]["mixed_precision"] == precision
    # 6 images: R@10 is 100 either way; bf16 may only reorder near-ties, so R@5 moves by at most one query.
    for metric, value in results["no"]["metrics"].items():
        assert results["bf16"]["metrics"][metric] == pytest.approx(value, abs=100 / 6 + 1e-6), metric


def test_flat_scalars_name_nested_metrics_by_path():
    record = {"loss": 0.5, "eval": {"val": {"accuracy": 70.0, "chance_accuracy": 33.3}}, "final": True, "note": "x"}
    assert flat_scalars(record) == {"loss": 0.5, "eval/val/accuracy": 70.0, "eval/val/chance_accuracy": 33.3}


def test_finetune_trackers_write_tensorboard_and_offline_wandb(world, tmp_path, offline_trackers):
    results = train(run_config(world, "ve", tmp_path / "tracked", **{"train.trackers": "[tensorboard, wandb]"}))
    assert results["steps"] == 4
    assert list((tmp_path / "tracked").rglob("events.out.tfevents.*")), "no TensorBoard event file"
    offline_runs = list(offline_trackers.glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb")), "no offline wandb run"


@pytest.mark.parametrize("task", ["ve", "retrieval"])
def test_resume_reproduces_the_uninterrupted_fine_tuning(world, tmp_path, task):
    settings = {"train.log_every": 1, "train.save_every": 1, "train.keep_last": 3}
    if task == "retrieval":
        settings["retrieval.protocols"] = "[itc]"
    full = train(run_config(world, task, tmp_path / "full", **settings))
    losses = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "full" / "metrics.jsonl").open())
              if "loss" in r}
    # keep_last 3: the checkpoints of steps 2 to 4 are left, each with the model exported.
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["step_2", "step_3", "step_4"]
    assert (tmp_path / "full" / "checkpoints" / "step_2" / "model" / "model.safetensors").is_file()

    resumed = train(run_config(world, task, tmp_path / "resumed",
                                  **{**settings, "train.resume": str(tmp_path / "full" / "checkpoints" / "step_2")}))
    again = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").open())
             if "loss" in r}
    assert resumed["steps"] == 4 and sorted(again) == [3, 4]
    for step in (3, 4):
        assert again[step] == pytest.approx(losses[step], rel=1e-5), step
    assert resumed["splits"]["val"]["metrics"] == pytest.approx(full["splits"]["val"]["metrics"])


TOY_TASK = '''
"""A task defined outside soho: is the hypothesis entailed (VE records, two classes)?"""
import dataclasses

from soho.models.tasks import SohoForClassification
from soho.tasks import FinetuneConfig, register_task
from soho.tasks.classification import ClassificationTask
from soho.tasks.ve import VisualEntailmentTask


@register_task
class EntailedTask(ClassificationTask):
    name = "entailed"
    config_class = FinetuneConfig
    model_class = SohoForClassification
    labels = ("no", "yes")

    @classmethod
    def decode(cls, sample, labelled=True):
        example = VisualEntailmentTask.decode(sample)
        return dataclasses.replace(example, target=int(example.target == 0))
'''


def test_a_new_task_is_one_module_and_a_config(world, tmp_path, monkeypatch):
    (tmp_path / "toy_task.py").write_text(TOY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"task": "entailed", "imports": ["toy_task"], "init": {"checkpoint": str(world / "pretrained")},
              "data": {"train_shards": str(world / "data" / "ve_train"), "num_workers": 0, "shuffle_buffer": 4,
                       "eval_shards": {"val": str(world / "data" / "ve_val")}},
              "optim": {"warmup_steps": 1},
              "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "log_every": 1}}
    (tmp_path / "entailed.yaml").write_text(yaml.safe_dump(config))
    assert load_tool("finetune").main(["--config", str(tmp_path / "entailed.yaml")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "entailed" and results["steps"] == 3
    predictions = [json.loads(line) for line in (tmp_path / "run" / "predictions_val.jsonl").open()]
    # One in three VE hypotheses is entailed: the toy task's labels come from its own decoder.
    assert [p["label"] for p in predictions].count("yes") == SPLITS["ve_val"] // 3
    assert results["splits"]["val"]["metrics"]["chance_accuracy"] == pytest.approx(200 / 3)
    # The evaluation tool finds it through the same registry.
    assert load_tool("evaluate").main(["--import", "toy_task", "entailed", "--checkpoint",
                                       str(tmp_path / "run" / "model"), "--shards", str(world / "data" / "ve_val"),
                                       "--output", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert evaluated["metrics"] == pytest.approx(results["splits"]["val"]["metrics"])


def test_transfer_study_fine_tunes_every_start_and_seed_and_tabulates_the_gain(world, tmp_path):
    from soho.train.transfer import load_transfer, run_transfer

    study = {"starts": {"pretrained": str(world / "pretrained")}, "scratch": "pretrained", "seeds": [0, 1],
             "common": ["train.max_steps=2", "train.batch_size=4", "train.eval_batch_size=4", "data.num_workers=0",
                        "data.shuffle_buffer=4", "optim.warmup_steps=1",
                        f"data.train_shards={world / 'data' / 've_train'}",
                        f"data.eval_shards={{test: {world / 'data' / 've_val'}}}"],
             "tasks": {"ve": {"config": str(ROOT / "configs" / "finetune" / "ve_synthetic.yaml"),
                              "metric": "test/accuracy"}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    table = run_transfer(load_transfer(tmp_path / "study.yaml"), tmp_path / "out")
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert sorted((r["start"], r["seed"], r["from_scratch"]) for r in runs) == [
        ("pretrained", 0, False), ("pretrained", 1, False), ("scratch", 0, True), ("scratch", 1, True)]
    accuracy = {(r["start"], r["seed"]): r["metrics"]["test/accuracy"] for r in runs}
    row = next(line for line in table.splitlines() if line.startswith("| ve "))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    gains = [accuracy["pretrained", s] - accuracy["scratch", s] for s in (0, 1)]
    mean_gain = sum(gains) / 2
    assert cells[4].startswith(f"{mean_gain:.2f} ± ")
    assert cells[5] == f"{runs[0]['metrics']['test/chance_accuracy']:.2f}"
    # A second call trains nothing.
    before = {p: p.stat().st_mtime for p in (tmp_path / "out").rglob("transfer.json")}
    assert run_transfer(load_transfer(tmp_path / "study.yaml"), tmp_path / "out") == table
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "out").rglob("transfer.json")}
