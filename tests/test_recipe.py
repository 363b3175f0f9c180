"""The paper recipe end to end at unit-test size: configs/pretrain/coco_vg_r101.yaml pre-trains (without ITC, as
the paper), then configs/finetune/retrieval_{coco,flickr30k}.yaml fine-tune its checkpoint (with ITC) and evaluate.

Only sizes, paths and run lengths are overridden; every other setting is the shipped configs'."""
import logging
from pathlib import Path

import pytest

from soho.data.synthetic import SyntheticWorldConfig, generate_world
from soho.models.pretrained import read_config
from soho.tasks import load_run_config
from soho.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"pretrain": 8, "retrieval_train": 8, "retrieval_val": 4, "retrieval_test": 4}
TINY = ["model.backbone.name=resnet10t", "model.backbone.pretrained_path=null", "model.encoder.pretrained_path=null",
        "model.encoder.hidden_size=32", "model.encoder.num_hidden_layers=2", "model.encoder.num_attention_heads=4",
        "model.encoder.intermediate_size=64", "model.encoder.vocab_size=300", "model.visual_dictionary.size=16",
        "data.image.min_size=128", "data.image.max_size=128"]
SHORT = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.save_every=0", "train.trackers=[]",
         'train.mixed_precision="no"', "optim.warmup_steps=1", "data.num_workers=0", "data.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    generate_world(SyntheticWorldConfig(image_size=64, split_sizes=SPLITS, shard_size=4, num_workers=1,
                                        tokenizer_vocab_size=300), root / "data")
    config = load_run_config(ROOT / "configs" / "pretrain" / "coco_vg_r101.yaml", [
        *TINY, *SHORT, f"data.shards={root / 'data' / 'pretrain'}", f"data.tokenizer={root / 'data' / 'tokenizer'}",
        f"data.eval_shards={{val: {root / 'data' / 'retrieval_val'}}}", "train.eval_batches=1",
        f"train.output_dir={root / 'pretrain'}"], default_task="pretraining")
    assert train(config)["steps"] == 2
    return root


def test_the_recipe_pre_trains_without_itc_as_the_paper(pretrained):
    assert not read_config(pretrained / "pretrain" / "pretrained").itc.enabled


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_retrieval_fine_tuning_adds_itc_to_the_recipe_checkpoint(pretrained, tmp_path, dataset, caplog):
    data = pretrained / "data"
    config = load_run_config(ROOT / "configs" / "finetune" / f"retrieval_{dataset}.yaml", [
        *SHORT, f"init.checkpoint={pretrained / 'pretrain' / 'pretrained'}",
        f"data.train_shards={data / 'retrieval_train'}", f"data.eval_shards={{test: {data / 'retrieval_test'}}}",
        "train.eval_batch_size=4", "retrieval.k=2", f"train.output_dir={tmp_path}"])
    assert config.retrieval.objectives["itc"] > 0 and config.retrieval.hard_negatives
    with caplog.at_level(logging.WARNING, logger="soho.tasks.retrieval"):
        results = train(config)
    assert "has no ITC heads (pre-trained without ITC); retrieval fine-tuning adds them" in caplog.text
    metrics = results["splits"]["test"]["metrics"]
    assert {"itc/rsum", "itc_itm/rsum", "chance/rsum"} <= set(metrics)
    assert read_config(tmp_path / "model").itc.enabled
