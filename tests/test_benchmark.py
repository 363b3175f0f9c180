import json

import pytest
import torch
import yaml

from soho.cli.benchmark import main as benchmark
from soho.config import from_dict, to_dict
from soho.data.synthetic import SyntheticWorldConfig, generate_world
from soho.models.soho import SohoForPretraining
from soho.processing import ImageTransformConfig, SohoProcessor
from soho.tasks import PretrainConfig
from soho.tokenizer import load_tokenizer

IMAGE = {"min_size": 32, "max_size": 32, "size_divisor": 8}
MEASURED_STAGES = ("backbone", "visual_dictionary", "embeddings", "encoder", "heads", "backward_backbone",
                   "backward_rest", "optimizer")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny synthetic world, a tiny pre-training config reading it, and a random checkpoint with ITC."""
    root = tmp_path_factory.mktemp("benchmark")
    generate_world(SyntheticWorldConfig(image_size=32, split_sizes={"pretrain": 16, "retrieval_test": 6},
                                        shard_size=8, num_workers=1, tokenizer_vocab_size=300), root / "data")
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    model = {"backbone": {"name": "resnet10t", "out_index": 2, "frozen_stages": 0},
             "encoder": {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 40,
                         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
             "visual_dictionary": {"size": 16, "init": "data"}, "mvm": {"probability": 0.5},
             "itc": {"enabled": True}}
    config = from_dict(PretrainConfig, {
        "model": model,
        "data": {"shards": str(root / "data" / "pretrain"), "tokenizer": str(root / "data" / "tokenizer"),
                 "image": IMAGE, "max_text_length": 16, "captions_per_image": 2, "shuffle_buffer": 8,
                 "num_workers": 0},
        "optim": {"warmup_steps": 2, "backbone": {"name": "adamw", "lr": 1e-3}, "rest": {"lr": 1e-3}},
        "train": {"output_dir": str(root / "run"), "batch_size": 4, "max_steps": 100, "log_every": 2}})
    config_file = root / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    torch.manual_seed(0)
    SohoForPretraining(config.model).save_pretrained(
        root / "pretrained", processor=SohoProcessor(tokenizer, ImageTransformConfig(**IMAGE), max_text_length=16))
    return root, config_file


def run(setup, *argv):
    root, config_file = setup
    output = root / f"{argv[0]}.json"
    threads = torch.get_num_threads()
    try:
        # One thread: two would crawl whenever other jobs share the machine's cores.
        assert benchmark([*argv, "--config", str(config_file), "--json", str(output), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(output.read_text())
    assert result.get("threads", 1) == 1
    return result


def test_step_stages_are_positive_and_add_up_to_the_step(setup, capsys):
    result = run(setup, "step", "--steps", "3", "--warmup", "1", "--batches", "2")["step"]
    stages = result["stages"]
    for name in MEASURED_STAGES:
        assert stages[name]["ms"] > 0, name
    step_ms = result["profiled_step_ms_mean"]
    # Measured stages never exceed the step they are part of; the remainders are what is left.
    assert sum(stages[name]["ms"] for name in MEASURED_STAGES) <= step_ms * 1.001
    assert stages["forward_other"]["ms"] > 0 and stages["loop_other"]["ms"] >= 0
    assert sum(s["ms"] for s in stages.values()) == pytest.approx(step_ms, rel=1e-6)
    assert result["steps_in_split"] == 3
    assert sum(s["percent"] for s in stages.values()) == pytest.approx(100, rel=1e-6)
    assert result["batch_images"] == 4 and result["pairs_per_second"] > 0 and result["step_ms_median"] > 0
    assert result["memory"]["peak_mib"] > 0 and "getrusage" in result["memory"]["memory_measure"]
    assert "| stages" in capsys.readouterr().out


def test_data_rates_per_worker_count_against_the_model(setup):
    result = run(setup, "data", "--workers", "0", "1", "--data-batches", "2", "--steps", "2", "--warmup", "1",
                 "--batches", "2")["data"]
    assert result["model_images_per_second"] > 0 and result["default_workers"] == 0
    assert sorted(result["loaders"]) == ["0", "1"]
    model_rate = result["model_images_per_second"]
    for loader in result["loaders"].values():
        assert loader["samples_per_second"] == pytest.approx(4 * loader["batches_per_second"])
        assert loader["ratio_to_model"] == pytest.approx(loader["samples_per_second"] / model_rate)
        assert loader["fed_step_ms_median"] > 0 and loader["fed_wait_ms_mean"] >= 0


def test_retrieval_protocols_on_a_synthetic_split(setup):
    root, _ = setup
    result = run(setup, "retrieval", "--checkpoint", str(root / "pretrained"), "--shards",
                 str(root / "data" / "retrieval_test"), "--images", "6", "--k", "3", "--naive-pairs", "40",
                 "--fusion-batch-size", "16")["retrieval"]
    protocols = result["protocols"]
    assert sorted(protocols) == ["itc", "itc_itm", "itm_all", "itm_all_naive"]
    texts = result["texts"]
    assert result["images"] == 6 and texts >= 6
    assert protocols["itm_all"]["fusion_passes"] == protocols["itm_all_naive"]["fusion_passes"] == 6 * texts
    assert protocols["itc"]["fusion_passes"] == 0 and protocols["itc_itm"]["fusion_passes"] == 3 * (6 + texts)
    for entry in protocols.values():
        assert entry["seconds"] > 0 and 0 <= entry["img_r1"] <= 100 and 0 <= entry["txt_r1"] <= 100
    # Naive and cached score the same pairs alike: only the cost differs.
    assert protocols["itm_all_naive"]["max_score_difference"] < 1e-4
    assert protocols["itm_all_naive"]["measured_pairs"] == 40
    assert result["itc_itm_speedup_over_itm_all"] == pytest.approx(
        protocols["itm_all"]["seconds"] / protocols["itc_itm"]["seconds"])
    assert result["cached_speedup_over_naive"] > 0
    assert result["cached_speedup_per_pair"] == pytest.approx(
        protocols["itm_all_naive"]["ms_per_pair"] / protocols["itm_all"]["ms_per_pair"])
    assert protocols["itm_all"]["ms_per_pair"] == pytest.approx(
        1000 * protocols["itm_all"]["score_seconds"] / protocols["itm_all"]["fusion_passes"])
    assert set(result["itc_itm_r1_drop"]) == {"txt_r1", "img_r1"}


def test_retrieval_on_random_tensors(setup):
    result = run(setup, "retrieval", "--random", "--images", "4", "--captions-per-image", "2",
                 "--protocols", "itm_all", "itc")["retrieval"]
    assert result["images"] == 4 and result["texts"] == 8
    assert sorted(result["protocols"]) == ["itc", "itm_all"] and "cached_speedup_over_naive" not in result


def test_overhead_runs_both_loops_on_the_same_work(setup):
    result = run(setup, "overhead", "--steps", "3", "--warmup", "1", "--batches", "2")["overhead"]
    assert result["bare_step_ms_median"] > 0 and result["framework_step_ms_median"] > 0
    assert result["overhead_percent"] == pytest.approx(
        100 * (result["framework_step_ms_median"] / result["bare_step_ms_median"] - 1))
    assert "paired_overhead_percent" in result
    # Same seeds, batches and optimizers: the two loops compute the same losses.
    assert result["max_loss_difference"] < 1e-4


def test_model_and_params_still_work(setup):
    assert run(setup, "params")["parameters"]["total"] > 0
    result = run(setup, "model", "--steps", "1", "--warmup", "0", "--batch-size", "2")
    assert result["training_step"]["forward_backward_ms_median"] > 0
