"""Image-text retrieval: fine-tune the pre-training objectives that rank pairs (ITM, optionally ITC) and
evaluate recall with any of the protocols of :mod:`soho.eval.retrieval`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from soho.config import ConfigError
from soho.data.pretraining import PretrainingDataConfig, PretrainingDataset
from soho.eval.retrieval import PROTOCOLS
from soho.eval.tasks import SplitEvaluation, evaluate_retrieval, write_jsonl
from soho.models.config import SohoConfig
from soho.models.objectives import OBJECTIVES
from soho.models.soho import SohoForPretraining
from soho.processing import SohoProcessor
from soho.tasks.base import StepOutput, register_task
from soho.tasks.finetuning import FinetuneConfig, FinetuneDataConfig, FinetuneTask
from soho.tasks.pretraining import model_inputs, step_output

logger = logging.getLogger(__name__)


@dataclass
class RetrievalDataConfig(FinetuneDataConfig):
    captions_per_image: int = 1
    """Captions drawn per training image (they share one backbone pass)."""

    def __post_init__(self):
        super().__post_init__()
        if self.captions_per_image < 1:
            raise ConfigError(f"data.captions_per_image must be >= 1, got {self.captions_per_image}")


@dataclass
class RetrievalOptions:
    objectives: Dict[str, float] = field(default_factory=lambda: {"itm": 1.0, "itc": 1.0})
    """The pre-training objectives fine-tuned, with their weights; every other one is off."""
    hard_negatives: bool = False
    """ITM negatives drawn from ITC similarities instead of uniformly."""
    protocols: List[str] = field(default_factory=lambda: ["itc", "itc_itm"])
    k: int = 16
    itc_weight: float = 0.0
    max_eval_images: Optional[int] = None
    """Evaluate on the first N images of each split (all-pairs ITM grows with N²)."""

    def __post_init__(self):
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown:
            raise ConfigError(f"retrieval.protocols: unknown {', '.join(unknown)} (known: {', '.join(PROTOCOLS)})")
        for name, weight in self.objectives.items():
            if not weight >= 0:
                raise ConfigError(f"retrieval.objectives.{name} must be >= 0, got {weight}")
        if self.k < 1:
            raise ConfigError(f"retrieval.k must be >= 1, got {self.k}")


@dataclass
class RetrievalConfig(FinetuneConfig):
    task: str = "retrieval"
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    retrieval: RetrievalOptions = field(default_factory=RetrievalOptions)


@register_task
class RetrievalTask(FinetuneTask):
    name = "retrieval"
    config_class = RetrievalConfig
    model_class = SohoForPretraining
    progress_keys = ("loss", "itm_acc", "itc_acc")

    def model_config(self, checkpoint: SohoConfig) -> SohoConfig:
        options = self.config.retrieval
        for name in options.objectives:
            OBJECTIVES.lookup(name, f"retrieval.objectives.{name}")
        itc = checkpoint.itc
        if options.objectives.get("itc", 0.0) > 0 and not itc.enabled:
            # The paper recipe pre-trains without ITC (configs/pretrain/coco_vg_r101.yaml) and soho's retrieval
            # configs rank with it; its heads are only two projections and a temperature on the pre-trained encoder.
            logger.warning("%s has no ITC heads (pre-trained without ITC); retrieval fine-tuning adds them, "
                           "randomly initialised, and trains them with weight %s (retrieval.objectives.itc=0 "
                           "fine-tunes ITM alone)", self.config.init.checkpoint, options.objectives["itc"])
            itc = dataclasses.replace(itc, enabled=True)
        needing_itc = [protocol for protocol in options.protocols if protocol != "itm_all"]
        if needing_itc and not itc.enabled:
            raise ConfigError(f"retrieval.protocols {needing_itc} need ITC heads, which {self.config.init.checkpoint} "
                              "lacks and retrieval.objectives.itc=0 does not train; use protocols [itm_all] or "
                              "train ITC")
        return dataclasses.replace(
            checkpoint,
            itc=itc,
            loss_weights={name: float(options.objectives.get(name, 0.0)) for name in OBJECTIVES},
            itm=dataclasses.replace(checkpoint.itm, hard_negatives=options.hard_negatives),
        )

    def train_stream(self, rank: int, world_size: int, positions: Dict[int, int]) -> PretrainingDataset:
        data, train = self.config.data, self.config.train
        stream = PretrainingDataConfig(shards=data.train_shards, image=self.processor.image_config,
                                       max_text_length=self.max_text_length,
                                       captions_per_image=data.captions_per_image,
                                       shuffle_buffer=data.shuffle_buffer, num_workers=data.num_workers,
                                       max_skip_fraction=data.max_skip_fraction)
        return PretrainingDataset(stream, self.processor.tokenizer, train.batch_size, seed=train.seed, rank=rank,
                                  world_size=world_size, start_positions=positions)

    def train_step(self, model: nn.Module, batch: Dict[str, Any], device: torch.device) -> StepOutput:
        return step_output(model(**model_inputs(batch, device)), batch)

    def evaluate(self, model: nn.Module, accelerator, name: str, shards: Union[str, List[str]]) -> SplitEvaluation:
        options, train = self.config.retrieval, self.config.train
        return evaluate_retrieval(model, shards, self.processor, options.protocols, options.k, options.itc_weight,
                                  train.eval_batch_size, max_images=options.max_eval_images,
                                  mixed_precision=train.mixed_precision, accelerator=accelerator)

    @classmethod
    def add_evaluate_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=["itc", "itc_itm"])
        parser.add_argument("--k", type=int, default=16, help="itc_itm shortlist size (default: %(default)s)")
        parser.add_argument("--itc-weight", type=float, default=0.0,
                            help="add this multiple of the ITC cosine to the ITM margin in itc_itm")
        parser.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
        parser.add_argument("--fusion-batch-size", type=int, default=512, help="pairs per fusion pass")
        parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                            help="autocast the fusion passes (bf16: ~2.5x faster fusion on a CPU "
                                 "with AVX-512 BF16; scores stay float32)")

    @classmethod
    def evaluate_checkpoint(cls, args, accelerator, output: Path) -> Dict[str, Any]:
        start = time.perf_counter()
        model = SohoForPretraining.from_pretrained(args.checkpoint).to(accelerator.device).eval()
        processor = SohoProcessor.from_pretrained(args.checkpoint)
        result = evaluate_retrieval(model, args.shards, processor, args.protocols, args.k, args.itc_weight,
                                    args.batch_size, args.fusion_batch_size, args.max_images,
                                    args.mixed_precision, accelerator)
        if accelerator.is_main_process:
            write_jsonl(output / "predictions.jsonl", result.predictions)
        return {"metrics": result.metrics, "skipped": result.skipped,
                "cost": {**result.cost, "seconds": time.perf_counter() - start,
                         "processes": accelerator.num_processes}}
