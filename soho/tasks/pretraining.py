"""Pre-training: MLM, ITM, MVM and ITC on image-caption shards, evaluated on held-out captions."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
from accelerate.utils import gather_object
from torch import nn

from soho.config import ConfigError
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.eval.tasks import SplitEvaluation
from soho.models.config import SohoConfig
from soho.models.soho import SohoForPretraining
from soho.processing import SohoProcessor
from soho.tasks.base import RunConfig, StepOutput, Task, check_shards, register_task
from soho.tokenizer import load_tokenizer
from soho.train.config import OptimConfig, TrainConfig
from soho.train.signals import stop_requested

PRETRAINING_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids",
                      "mlm_input_ids", "mlm_labels", "image_index", "image_ids", "image_seeds", "itm_image_index",
                      "itm_labels", "caption_truth", "caption_near_miss")


@dataclass
class PretrainConfig(RunConfig):
    task: str = "pretraining"
    model: SohoConfig = field(default_factory=SohoConfig)
    data: PretrainingDataConfig = field(default_factory=PretrainingDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    synthetic_root: Optional[str] = None
    """If set, the synthetic world is generated here first when it is missing."""

    def __post_init__(self):
        if self.data.shards is None:
            raise ConfigError("data.shards is required: the image-caption shards to pre-train on")
        if self.data.tokenizer is None:
            raise ConfigError("data.tokenizer is required: the tokenizer directory for the captions")


def model_inputs(batch: Dict[str, Any], device: torch.device, names=PRETRAINING_INPUTS) -> Dict[str, torch.Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in names if k in batch}


def step_output(out, batch: Dict[str, Any]) -> StepOutput:
    losses = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.losses.items()}}
    return StepOutput(loss=out.loss, losses=losses, metrics=out.metrics,
                      counts={"images": batch["pixel_values"].shape[0], "pairs": batch["input_ids"].shape[0]})


@torch.no_grad()
def held_out_metrics(model: nn.Module, dataset: PretrainingDataset, accelerator, max_batches: Optional[int],
                     seed: int) -> Dict[str, float]:
    """Mean losses and accuracies of the pre-training objectives on one pass of held-out shards.

    Each rank evaluates its own disjoint slice (at most ``max_batches`` batches) with ITM swaps and MVM
    masks fixed by ``seed``; every value is averaged over the batches where it is defined (MVM needs
    masked cells), over all ranks. Each accuracy comes with its chance level, ``chance_<name>``: the
    accuracy of always answering the most frequent label of the evaluated set (matched/mismatched for
    ITM, the commonest masked token for MLM, the commonest dictionary entry of the masked cells for MVM),
    which is what a model that ignores its input can reach. MVM also gets ``chance_mvm_hidden_acc``: the
    commonest entry among those not visible in the image, a baseline that looks only at which entries
    the unmasked cells have. Where the data names near misses, ``itm_near_miss_rank_acc`` is how often ITM
    scores a caption higher with its own image than with an image it misses by one attribute (chance 0.5).
    """
    was_training = model.training
    model.eval()
    sums: Dict[str, float] = defaultdict(float)
    counts: Dict[str, int] = defaultdict(int)
    unwrapped = accelerator.unwrap_model(model)
    num_classes = {name: objective.num_classes for name, objective in unwrapped.objectives.items()
                   if objective.num_classes is not None}
    histograms = {name: torch.zeros(n, dtype=torch.float64, device=accelerator.device)
                  for name, n in num_classes.items()}
    hidden_choices = []
    batches = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + accelerator.process_index)
        for batch in dataset:
            # A stop signal ends this rank's loop; the collectives below still run on every rank.
            if max_batches is not None and batches >= max_batches or stop_requested():
                break
            if not batch["samples"]:
                continue
            with accelerator.autocast():
                out = model(**model_inputs(batch, accelerator.device))
            values = {name: float(value) for name, value in {"loss": out.loss, **out.losses}.items()}
            values.update({name: float(value) for name, value in out.metrics.items() if not torch.isnan(value)})
            for name, value in values.items():
                sums[name] += value
                counts[name] += 1
            for name, labels in out.labels.items():
                if name in histograms:
                    histograms[name] += torch.bincount(labels, minlength=num_classes[name]).to(torch.float64)
            if out.mvm_visible is not None:
                hidden_choices.append((out.labels["mvm"], out.mvm_visible))
            if "caption_near_miss" in batch and "itm" in unwrapped.objectives:
                ranked = near_miss_ranking(unwrapped, batch, accelerator)
                if ranked is not None:
                    sums["itm_near_miss_rank_acc"] += ranked
                    counts["itm_near_miss_rank_acc"] += 1
            batches += 1
    model.train(was_training)
    # Every rank must send the same keys in the same order, also one that saw no batch.
    names = sorted(set(gather_object(sorted(sums))))
    totals = torch.tensor([[sums.get(k, 0.0), counts.get(k, 0)] for k in names] + [[batches, 0]],
                          device=accelerator.device, dtype=torch.float64)
    totals = accelerator.reduce(totals, reduction="sum")
    results = {name: (totals[i, 0] / totals[i, 1]).item() if totals[i, 1] > 0 else float("nan")
               for i, name in enumerate(names)}
    results["batches"] = int(totals[-1, 0].item())
    histograms = {name: accelerator.reduce(histogram, reduction="sum") for name, histogram in histograms.items()}
    for name, histogram in histograms.items():
        if histogram.sum() > 0:
            results[f"chance_{name}_acc"] = (histogram.max() / histogram.sum()).item()
    # A stronger MVM baseline that needs only the unmasked cells' entries: the commonest target entry
    # among those not visible in the cell's image.
    prior = histograms.get("mvm")
    hits = 0
    for targets, visible in hidden_choices:
        hits += int((prior.expand(len(targets), -1).masked_fill(visible, -1.0).argmax(1) == targets).sum())
    tally = accelerator.reduce(torch.tensor([hits, sum(len(t) for t, _ in hidden_choices)],
                                            device=accelerator.device, dtype=torch.float64), reduction="sum")
    if tally[1] > 0:
        results["chance_mvm_hidden_acc"] = (tally[0] / tally[1]).item()
    return results


@torch.no_grad()
def near_miss_ranking(model: nn.Module, batch: Dict[str, Any], accelerator) -> Optional[float]:
    """The fraction of captions (with a near miss in the batch) that ITM scores higher with their own image than
    with one near miss of theirs; None when no caption has one."""
    near_miss = batch["caption_near_miss"]
    rows = near_miss.any(1).nonzero(as_tuple=True)[0]
    if not rows.numel():
        return None
    # The first near miss of each caption: a fixed choice, so the metric compares across runs.
    others = near_miss[rows].float().argmax(1)
    inputs = model_inputs(batch, accelerator.device, ("pixel_values", "pixel_mask"))
    texts = {name: batch[name][rows].to(accelerator.device) for name in ("input_ids", "attention_mask")}
    grid = model.soho.embed_image(**inputs)
    with accelerator.autocast():
        scores = [model.match_scores(model.soho(**texts, grid=grid, image_index=images.to(accelerator.device)).pooled)
                  for images in (batch["image_index"][rows], others)]
    return (scores[0] > scores[1]).float().mean().item()


@register_task
class PretrainingTask(Task):
    name = "pretraining"
    config_class = PretrainConfig
    export_name = "pretrained"
    progress_keys = ("loss", "itm_acc", "mlm_acc", "mvm_acc")

    def setup(self, accelerator) -> None:
        config = self.config
        if config.synthetic_root is not None and accelerator.is_main_process:
            from soho.data.synthetic import SyntheticWorldConfig, ensure_world

            ensure_world(config.synthetic_root, SyntheticWorldConfig())
        accelerator.wait_for_everyone()
        check_shards("data.shards", config.data.shards)
        check_shards("data.eval_shards", config.data.eval_shards)
        try:
            self.tokenizer = load_tokenizer(config.data.tokenizer)
        except OSError as error:
            raise ConfigError(f"data.tokenizer: {error}") from None
        if len(self.tokenizer) > config.model.encoder.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens but model.encoder.vocab_size is "
                              f"{config.model.encoder.vocab_size}")
        self.processor = SohoProcessor(self.tokenizer, config.data.image, config.data.max_text_length)

    def build_model(self) -> nn.Module:
        return SohoForPretraining(self.config.model)

    def train_stream(self, rank: int, world_size: int, positions: Dict[int, int]) -> PretrainingDataset:
        return PretrainingDataset(self.config.data, self.tokenizer, self.config.train.batch_size,
                                  seed=self.config.train.seed, rank=rank, world_size=world_size,
                                  start_positions=positions)

    def train_step(self, model: nn.Module, batch: Dict[str, Any], device: torch.device) -> StepOutput:
        return step_output(model(**model_inputs(batch, device)), batch)

    def evaluate(self, model: nn.Module, accelerator, name: str, shards: Union[str, List[str]]) -> SplitEvaluation:
        data = dataclasses.replace(self.config.data, shuffle_buffer=0)
        dataset = PretrainingDataset(data, self.tokenizer, self.config.train.batch_size, seed=self.config.train.seed,
                                     rank=accelerator.process_index, world_size=accelerator.num_processes,
                                     repeat=False, shards=shards)
        metrics = held_out_metrics(model, dataset, accelerator, self.config.train.eval_batches, self.config.train.seed)
        return SplitEvaluation(metrics=metrics, predictions=[])
