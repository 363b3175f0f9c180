"""The fine-tuning loop, on Accelerate: retrieval, NLVR2, visual entailment, VQA.

A run starts from a ``save_pretrained`` directory (or, as a baseline, from the same
architecture with random weights), trains for a step or time budget, evaluates every
split in ``data.eval_shards`` and writes, under ``train.output_dir``:

- ``metrics.jsonl``: training logs, then evaluations;
- ``results.json``: task, initialisation, metrics per split (with chance levels), cost, config;
- ``predictions_<split>.jsonl``: one line per example (retrieval: per caption and protocol);
- ``model/``: the fine-tuned model and its processor (``from_pretrained`` loads it).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from soho.config import ConfigError, apply_overrides, from_dict, to_dict
from soho.data.pretraining import (
    PretrainingDataConfig,
    PretrainingDataset,
    SampleError,
    decode_json,
    pretraining_loader,
)
from soho.data.shards import SkipCounter, check_skip_fraction, expand_urls, stream_samples
from soho.data.tasks import NLVR2_LABELS, VE_LABELS, TaskDataset
from soho.eval.tasks import MODEL_INPUTS, SplitEvaluation, evaluate_classification, evaluate_retrieval, write_jsonl
from soho.eval.vqa import AnswerVocabulary
from soho.models.config import SohoConfig
from soho.models.pretrained import read_config
from soho.models.soho import SohoForPretraining
from soho.models.tasks import TASK_MODELS
from soho.processing import SohoProcessor
from soho.train.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from soho.train.config import FinetuneConfig, FinetuneDataConfig
from soho.train.optim import build_optimizers, optimizer_step

logger = logging.getLogger(__name__)

RETRIEVAL_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids", "image_index",
                    "image_ids")


def build_answer_vocabulary(config: FinetuneConfig) -> AnswerVocabulary:
    """The most frequent annotator answers of the training split (records only; images are not decoded).

    Unreadable records are left out here and counted by the training stream, which skips them too.
    """
    answer_lists = []
    for sample in stream_samples(expand_urls(config.data.train_shards), seed=0, rank=0, world_size=1, worker=0,
                                 num_workers=1, skips=SkipCounter(), repeat=False):
        try:
            answers = decode_json(sample).get("answers")
        except SampleError:  # the training stream skips and reports it
            continue
        if isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers):
            answer_lists.append(answers)
    if not answer_lists:
        raise ValueError(f"no VQA answers found in {config.data.train_shards!r}")
    vocabulary = AnswerVocabulary.build(answer_lists, config.data.answer_vocabulary_size,
                                        config.data.answer_min_count)
    logger.info("answer vocabulary: %d answers, %.1f %% best reachable training accuracy",
                len(vocabulary), 100.0 * vocabulary.coverage(answer_lists))
    return vocabulary


def load_answer_vocabulary(data: FinetuneDataConfig) -> AnswerVocabulary:
    """The classes listed in ``data.answer_vocabulary``; a ConfigError naming the file when it cannot be used."""
    try:
        vocabulary = AnswerVocabulary.load(data.answer_vocabulary)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.answer_vocabulary: {error}") from None
    if not len(vocabulary):
        raise ConfigError(f"data.answer_vocabulary: {data.answer_vocabulary} lists no answers")
    if len(vocabulary) > data.answer_vocabulary_size:
        raise ConfigError(f"data.answer_vocabulary: {data.answer_vocabulary} lists {len(vocabulary)} answers, more "
                          f"than data.answer_vocabulary_size={data.answer_vocabulary_size}; raise that or use a "
                          "shorter file")
    logger.info("answer vocabulary: %d answers from %s", len(vocabulary), data.answer_vocabulary)
    return vocabulary


def answer_vocabulary(config: FinetuneConfig) -> Optional[AnswerVocabulary]:
    """The VQA classes (None for other tasks): ``data.answer_vocabulary``, else the most frequent training answers."""
    if config.task != "vqa":
        return None
    if config.data.answer_vocabulary is None:
        return build_answer_vocabulary(config)
    return load_answer_vocabulary(config.data)


def model_config(config: FinetuneConfig, labels: List[str]) -> SohoConfig:
    """The checkpoint's architecture with the user's overrides and what the task needs."""
    base = to_dict(read_config(config.init.checkpoint))
    model = from_dict(SohoConfig, apply_overrides(base, config.init.model_overrides))
    if config.task != "retrieval":
        return dataclasses.replace(model, labels=list(labels))
    if config.retrieval.itc and not model.itc.enabled:
        raise ConfigError(f"retrieval.itc is true but {config.init.checkpoint} has no ITC heads; "
                          "set retrieval.itc=false or init.model_overrides=['itc.enabled=true']")
    return dataclasses.replace(
        model,
        # Retrieval fine-tuning is ITM (and ITC) alone: no masking, no dictionary prediction.
        loss_weights={"mlm": 0.0, "mvm": 0.0, "itm": 1.0, "itc": 1.0 if config.retrieval.itc else 0.0},
        itm=dataclasses.replace(model.itm, hard_negatives=config.retrieval.hard_negatives),
    )


def build_model(config: FinetuneConfig, labels: List[str]):
    cls = SohoForPretraining if config.task == "retrieval" else TASK_MODELS[config.task]
    architecture = model_config(config, labels)
    if config.init.from_scratch:
        return cls(architecture)
    return cls.from_pretrained(config.init.checkpoint, config=architecture, strict=False)


def training_batches(config: FinetuneConfig, processor: SohoProcessor, accelerator: Accelerator,
                     vocabulary: Optional[AnswerVocabulary], positions: Optional[Dict[int, int]] = None):
    """The training stream of this rank; ``positions`` (worker -> samples handed out) resumes it."""
    data = config.data
    if config.task == "retrieval":
        stream = PretrainingDataset(
            PretrainingDataConfig(shards=data.train_shards, image=processor.image_config,
                                  max_text_length=data.max_text_length or processor.max_text_length,
                                  captions_per_image=data.captions_per_image, shuffle_buffer=data.shuffle_buffer,
                                  num_workers=data.num_workers, max_skip_fraction=data.max_skip_fraction),
            processor.tokenizer, config.train.batch_size, seed=config.train.seed,
            rank=accelerator.process_index, world_size=accelerator.num_processes, start_positions=positions)
        return iter(pretraining_loader(stream, data.num_workers, pin_memory=accelerator.device.type == "cuda"))
    stream = TaskDataset(config.task, data.train_shards, processor.tokenizer, processor.image_config,
                         data.max_text_length or processor.max_text_length, config.train.batch_size, train=True,
                         seed=config.train.seed, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, shuffle_buffer=data.shuffle_buffer,
                         answer_vocabulary=vocabulary, start_positions=positions)
    return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=data.num_workers,
                                            persistent_workers=data.num_workers > 0,
                                            pin_memory=accelerator.device.type == "cuda"))


def _step_values(config: FinetuneConfig, out, batch: Dict[str, Any]) -> Dict[str, float]:
    """The loss and the training accuracy of one step, as floats."""
    if config.task == "retrieval":
        values = {"loss": float(out.loss.detach())}
        values.update({name: float(value.detach()) for name, value in out.losses.items()})
        values.update({name: float(value) for name, value in out.metrics.items() if name in ("itm_acc", "itc_acc")})
        return values
    predicted = out.logits.detach().argmax(-1)
    labels = batch["labels"].to(predicted.device)
    if config.task == "vqa":
        # The soft score of the predicted answer (0 when it is outside the vocabulary's targets).
        accuracy = labels.gather(1, predicted[:, None]).mean()
    else:
        accuracy = (predicted == labels).float().mean()
    return {"loss": float(out.loss.detach()), "accuracy": float(accuracy)}


def evaluate_split(config: FinetuneConfig, model, shards: str, processor: SohoProcessor, accelerator: Accelerator,
                   vocabulary: Optional[AnswerVocabulary]) -> SplitEvaluation:
    """Every process joins, shares the work and returns the whole result."""
    if config.task != "retrieval":
        return evaluate_classification(model, config.task, shards, processor, config.train.eval_batch_size,
                                       accelerator, vocabulary)
    retrieval = config.retrieval
    return evaluate_retrieval(model, shards, processor, retrieval.protocols, retrieval.k, retrieval.itc_weight,
                              config.train.eval_batch_size, max_images=retrieval.max_eval_images,
                              mixed_precision=config.train.mixed_precision, accelerator=accelerator)


def flat_scalars(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """Nested metrics as ``eval/<split>/<metric>`` scalars, what trackers plot; other values are left out."""
    flat: Dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def finetune(config: FinetuneConfig) -> Dict[str, Any]:
    """Fine-tune, evaluate every split, write the run's files; returns the results record."""
    train = config.train
    output_dir = Path(train.output_dir)
    # Before anything is written: a bad vocabulary file must not cost the previous run's metrics.jsonl.
    vocabulary = answer_vocabulary(config)
    accelerator = Accelerator(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
                              mixed_precision=train.mixed_precision,
                              gradient_accumulation_steps=config.optim.accumulation_steps,
                              log_with=list(train.trackers) or None, project_dir=str(output_dir),
                              step_scheduler_with_optimizer=False)
    set_seed(train.seed, device_specific=True)
    resume_from = resolve_resume(train.resume, output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2))
        if resume_from is None:
            (output_dir / "metrics.jsonl").unlink(missing_ok=True)

    processor = SohoProcessor.from_pretrained(config.init.checkpoint)
    labels = {"nlvr2": list(NLVR2_LABELS), "ve": list(VE_LABELS), "retrieval": [],
              "vqa": vocabulary.answers if vocabulary is not None else []}[config.task]
    model = build_model(config, labels)
    parameters = model.parameter_counts()
    logger.info("model: %s", ", ".join(f"{k} {v:,}" for k, v in parameters.items()))
    optimizers, schedulers = build_optimizers(model, config.optim, train.max_steps)
    model, *prepared = accelerator.prepare(model, *optimizers, *schedulers)
    optimizers, schedulers = prepared[:len(optimizers)], prepared[len(optimizers):]
    unwrapped = accelerator.unwrap_model(model)
    step, positions = 0, {}
    if resume_from is not None:
        step, positions = load_checkpoint(accelerator, resume_from)
        logger.info("resumed from %s at step %d", resume_from, step)
    batches = training_batches(config, processor, accelerator, vocabulary, positions)
    inputs = RETRIEVAL_INPUTS if config.task == "retrieval" else MODEL_INPUTS + ("labels",)

    if train.trackers:
        accelerator.init_trackers(f"soho-finetune-{config.task}",
                                  config={k: str(v) for k, v in to_dict(config).items()})

    def log(record: Dict[str, Any]) -> None:
        if accelerator.is_main_process:
            with (output_dir / "metrics.jsonl").open("a") as stream:
                stream.write(json.dumps(record) + "\n")
        if train.trackers:
            accelerator.log(flat_scalars({k: v for k, v in record.items() if k != "step"}), step=record["step"])

    window: Dict[str, List[float]] = defaultdict(list)
    skipped, seen = Counter(), 0
    progress = tqdm(total=train.max_steps, initial=step, disable=not accelerator.is_local_main_process,
                    desc=config.task)
    started = window_start = time.perf_counter()
    examples_in_window = 0
    model.train()
    while step < train.max_steps:
        batch = next(batches)
        positions[batch["worker"]] = batch["position"]
        skipped.update(batch["skipped"])
        seen += batch["samples"] + sum(batch["skipped"].values())
        if not batch["samples"]:
            continue
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(**{name: batch[name].to(accelerator.device) for name in inputs if name in batch})
            accelerator.backward(out.loss)
            optimizer_step(accelerator, model, optimizers, config.optim.grad_clip)
        for name, value in _step_values(config, out, batch).items():
            window[name].append(value)
        examples_in_window += batch["samples"]
        if not accelerator.sync_gradients:
            continue
        for scheduler in schedulers:
            scheduler.step()
        step += 1
        progress.update(1)
        if step % train.log_every == 0 or step == train.max_steps:
            counts = accelerator.reduce(torch.tensor([sum(skipped.values()), seen], device=accelerator.device),
                                        reduction="sum")
            skip_fraction = counts[0].item() / max(1, counts[1].item())
            elapsed = time.perf_counter() - window_start
            record = {"step": step, **{k: sum(v) / len(v) for k, v in window.items()},
                      "lr": schedulers[0].get_last_lr()[0],
                      "examples_per_second": examples_in_window * accelerator.num_processes / elapsed,
                      "skipped_samples": int(counts[0].item()), "skip_fraction": skip_fraction,
                      "elapsed_seconds": time.perf_counter() - started}
            log(record)
            progress.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "accuracy", "itm_acc") if k in record})
            check_skip_fraction(int(counts[0].item()), int(counts[1].item()), config.data.max_skip_fraction)
            window.clear()
            window_start, examples_in_window = time.perf_counter(), 0
        if train.eval_every and step % train.eval_every == 0:
            name, shards = next(iter(config.data.eval_shards.items()))
            result = evaluate_split(config, unwrapped, shards, processor, accelerator, vocabulary)
            log({"step": step, "eval": {name: result.metrics}})
        out_of_time = train.max_minutes is not None and time.perf_counter() - started > train.max_minutes * 60
        # Every process must agree to stop, or the others would wait in a collective.
        out_of_time = accelerator.reduce(torch.tensor([float(out_of_time)], device=accelerator.device),
                                         reduction="sum").item() > 0
        if (train.save_every and step % train.save_every == 0) or out_of_time:
            save_checkpoint(accelerator, model, output_dir, step, positions, processor, train.keep_last, config,
                            export="model")
        if out_of_time:
            logger.info("stopping at step %d: train.max_minutes=%s reached", step, train.max_minutes)
            break
    progress.close()
    train_seconds = time.perf_counter() - started

    if accelerator.is_main_process:
        # Saved before the final evaluation: an evaluation that fails must not lose the trained weights.
        unwrapped.save_pretrained(output_dir / "model", processor=processor)
    results: Dict[str, Any] = {
        "task": config.task, "init": "scratch" if config.init.from_scratch else config.init.checkpoint,
        "steps": step, "train_seconds": train_seconds, "parameters": parameters, "splits": {},
        "config": to_dict(config)}
    for name, shards in config.data.eval_shards.items():
        eval_start = time.perf_counter()
        result = evaluate_split(config, unwrapped, shards, processor, accelerator, vocabulary)
        results["splits"][name] = {"metrics": result.metrics, "skipped": result.skipped,
                                   "cost": {**result.cost, "seconds": time.perf_counter() - eval_start}}
        if accelerator.is_main_process:
            write_jsonl(output_dir / f"predictions_{name}.jsonl", result.predictions)
    if accelerator.is_main_process:
        log({"step": step, "final": True, "eval": {n: s["metrics"] for n, s in results["splits"].items()}})
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results
