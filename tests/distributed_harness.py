"""One training step of each task on this process's share of a fixed global batch, through the real trainer;
saves every logged loss, every parameter gradient (as the optimizer receives it) and the dictionary after the
step. tests/test_distributed.py starts it with 1 and with 2 processes and compares.

The global batch is the same whatever the process count; a process gets its contiguous slice of the images
and of their captions. Everything random is fixed by the batch: MLM masks, each image's MVM draws
(``image_seeds``) and the image each caption is shown with for ITM (``itm_image_index``, drawn among the
caption's own block of images: the images of one process when there are two, as ITM draws under DDP).

    accelerate launch --config_file configs/accelerate/cpu.yaml --num_processes 2 \\
        tests/distributed_harness.py --configs pretraining.yaml ve.yaml --out OUT [--local-gather]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import torch

import soho.models.losses
from soho.distributed import all_gather
from soho.tasks import load_run_config
from soho.train.trainer import Trainer

IMAGES, CAPTIONS, LENGTH, SIZE, VOCAB = 8, 2, 9, 32, 60


def global_batch(task: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = IMAGES * (2 if task == "nlvr2" else 1)
    texts = IMAGES * (CAPTIONS if task in ("pretraining", "retrieval") else 1)
    input_ids = torch.randint(5, VOCAB, (texts, LENGTH), generator=generator)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(texts, LENGTH, dtype=torch.long)
    attention_mask[1::3, 6:] = 0
    batch = {"pixel_values": torch.randn(images, 3, SIZE, SIZE, generator=generator),
             "pixel_mask": torch.ones(images, SIZE, SIZE, dtype=torch.long),
             "input_ids": input_ids.masked_fill(attention_mask == 0, 0), "attention_mask": attention_mask,
             "token_type_ids": torch.zeros_like(input_ids)}
    if task not in ("pretraining", "retrieval"):
        classes = 3 if task == "ve" else 2
        return {**batch, "labels": torch.randint(0, classes, (texts,), generator=generator)}
    picked = (torch.rand(texts, LENGTH, generator=generator) < 0.3) & (attention_mask == 1)
    picked[:, 0] = False
    image_index = torch.arange(IMAGES).repeat_interleave(CAPTIONS)
    # Every other caption is shown with another image of its block (half of the images).
    block = IMAGES // 2
    offsets = torch.randint(1, block, (texts,), generator=generator)
    others = image_index // block * block + (image_index % block + offsets) % block
    return {**batch, "mlm_input_ids": input_ids.masked_fill(picked, 4),
            "mlm_labels": input_ids.masked_fill(~picked, -100), "image_index": image_index,
            "itm_image_index": torch.where(torch.arange(texts) % 2 == 1, others, image_index),
            "image_ids": torch.arange(IMAGES) + 100,
            "image_seeds": torch.randint(0, 1 << 62, (IMAGES,), generator=generator)}


def share(batch: Dict[str, torch.Tensor], task: str, rank: int, world_size: int) -> Dict:
    """This process's slice of the global batch (1 or 2 processes), image indices made local."""
    per_rank = IMAGES // world_size
    images = slice(rank * per_rank, (rank + 1) * per_rank)
    if task not in ("pretraining", "retrieval"):
        pixels = slice(images.start * 2, images.stop * 2) if task == "nlvr2" else images
        local = {k: (v[pixels] if k in ("pixel_values", "pixel_mask") else v[images]) for k, v in batch.items()}
        return {**local, "worker": 0, "position": 0, "skipped": {}, "samples": per_rank}
    texts = slice(images.start * CAPTIONS, images.stop * CAPTIONS)
    local = {k: v[images] if k in ("pixel_values", "pixel_mask", "image_ids", "image_seeds") else v[texts]
             for k, v in batch.items()}
    local["image_index"] = local["image_index"] - images.start
    local["itm_image_index"] = local["itm_image_index"] - images.start
    return {**local, "worker": 0, "position": 0, "skipped": {}, "samples": per_rank}


def local_slice_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The gather soho had before: only the local slice keeps its gradient (a negative control)."""
    gathered = list(all_gather(tensor).chunk(torch.distributed.get_world_size()))
    gathered[torch.distributed.get_rank()] = tensor
    return torch.cat(gathered)


def run(config_path: str, out: Path) -> None:
    config = load_run_config(config_path)
    trainer = Trainer(config)
    trainer.setup()
    model = trainer.unwrapped_model
    names = {id(p): n for n, p in model.named_parameters()}
    grads: Dict[str, torch.Tensor] = {}

    def keep_gradients(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().clone()

    for optimizer in trainer.optimizers:
        optimizer.optimizer.register_step_pre_hook(keep_gradients)
    accelerator = trainer.accelerator
    batch = share(global_batch(config.task), config.task, accelerator.process_index, accelerator.num_processes)
    trainer.model.train()
    assert trainer.train_batch(batch)
    output = trainer.last_output
    losses = {k: float(v) for k, v in output.losses.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if "visual_dictionary" in n}
    torch.save({"losses": losses, "grads": grads, "buffers": buffers},
               out / f"{config.task}_rank{accelerator.process_index}.pt")
    trainer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local-gather", action="store_true", help="use the old, wrong ITC gather")
    args = parser.parse_args(argv)
    if args.local_gather:
        soho.models.losses.all_gather_with_grad = local_slice_gather
    for path in args.configs:
        run(path, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
