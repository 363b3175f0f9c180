import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from test_pretraining import COLOURS, run_config, write_world

import soho.train.ablation as ablation_module
from soho.cli.ablate import main as ablate
from soho.config import ConfigError, to_dict
from soho.models.soho import SohoForPretraining
from soho.tokenizer import train_wordpiece_tokenizer
from soho.train.ablation import format_table, load_ablation, run_ablation, summarize

ROOT = Path(__file__).resolve().parents[1]
RSUM = "zero_shot/itm_all/rsum"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny world, a 2-step pre-training config on it and a sweep file of two variants."""
    root = tmp_path_factory.mktemp("ablation")
    write_world(root / "train", num_shards=2)
    write_world(root / "val", num_shards=1, per_shard=6, broken=False)
    corpus = [f"a {n} picture the image is {n} something {n}" for n in COLOURS]
    train_wordpiece_tokenizer(corpus * 5, root / "tokenizer", vocab_size=100)
    base = to_dict(run_config(root, root / "unused", max_steps=2, save_every=1000, eval_batches=1))
    (root / "pretrain.yaml").write_text(yaml.safe_dump(base))
    finetune = {"task": "retrieval", "data": {"train_shards": str(root / "train"), "captions_per_image": 2,
                                             "shuffle_buffer": 4, "num_workers": 0, "max_skip_fraction": 0.2},
                "retrieval": {"objectives": {"itm": 1.0}}, "optim": {"warmup_steps": 1},
                "train": {"max_steps": 2, "batch_size": 4, "eval_batch_size": 8, "log_every": 1}}
    (root / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    spec = {"pretrain_config": str(root / "pretrain.yaml"),
            "variants": {"merged": [], "itm_contrastive": ["model.itm.loss=contrastive",
                                                            "model.itm.contrastive_negatives=2"]},
            "seeds": [0, 1],
            "evaluation": {"shards": str(root / "val"), "max_images": 5},
            "finetune": {"config": str(root / "finetune.yaml"), "overrides": []}}
    (root / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def cells_of(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def by_hand(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_summary_is_the_mean_and_sample_std_over_seeds():
    runs = [{"variant": "a", "seed": 0, "metrics": {"m": 1.0}}, {"variant": "a", "seed": 1, "metrics": {"m": 4.0}},
            {"variant": "a", "seed": 2, "metrics": {"m": float("nan")}}, {"variant": "b", "seed": 0, "metrics": {}},
            {"variant": "b", "seed": 1, "metrics": {"m": 2.0}}]
    summary = summarize(runs, ["m"])
    assert summary["a"]["m"] == {"mean": 2.5, "std": pytest.approx(math.sqrt(4.5)), "n": 2}
    assert summary["b"]["m"]["mean"] == 2.0 and math.isnan(summary["b"]["m"]["std"])
    table = format_table(summary, ["m"], {"m": 0.5}).splitlines()
    assert table[2] == "| a | 2 | 2.50 ± 2.12 |" and table[3] == "| b | 1 | 2.00 |"
    assert table[4] == "| chance | | 0.50 |"


def test_sweep_runs_every_variant_and_seed_tabulates_and_resumes(sweep, tmp_path, monkeypatch, capsys):
    ablation = load_ablation(sweep / "sweep.yaml")
    result = run_ablation(ablation, tmp_path / "out")
    assert result.ran == ["merged/seed_0", "merged/seed_1", "itm_contrastive/seed_0", "itm_contrastive/seed_1"]

    runs = {(r["variant"], r["seed"]): r for r in result.runs}
    for (variant, seed), record in runs.items():
        saved = json.loads((tmp_path / "out" / variant / f"seed_{seed}" / "results.json").read_text())
        assert saved["metrics"] == record["metrics"]
        assert (tmp_path / "out" / variant / f"seed_{seed}" / "pretrain" / "pretrained" / "config.json").is_file()
        assert record["pretrain"]["steps"] == 2
    contrastive = runs[("itm_contrastive", 0)]["metrics"]
    # 4 images of 2 captions per batch: 2 negatives each, so ITM picks among 3 candidates.
    assert contrastive["pretrain/chance_itm_acc"] == pytest.approx(1 / 3)
    assert runs[("merged", 0)]["metrics"]["pretrain/chance_itm_acc"] >= 0.5
    # Different seeds train different models.
    assert runs[("merged", 0)]["metrics"]["pretrain/itm"] != runs[("merged", 1)]["metrics"]["pretrain/itm"]

    lines = result.table.splitlines()
    columns = cells_of(lines[0])
    assert columns[:3] == ["variant", "seeds", RSUM]
    for row, variant in zip(lines[2:4], ("merged", "itm_contrastive")):
        cells = cells_of(row)
        for column in (RSUM, "zero_shot/itm_all/img_r1", "pretrain/itm_acc"):
            mean, std = by_hand([runs[(variant, seed)]["metrics"][column] for seed in (0, 1)])
            assert cells[columns.index(column)] == f"{mean:.2f} ± {std:.2f}"
        assert cells[:2] == [variant, "2"]
        parameters = runs[(variant, 0)]["metrics"]["model/parameters_total"]
        assert parameters == sum(p.numel() for p in SohoForPretraining.from_pretrained(
            tmp_path / "out" / variant / "seed_0" / "pretrain" / "pretrained").parameters())
        assert cells[columns.index("model/parameters_total")] == f"{parameters:,} ± 0"
    chance = cells_of(lines[4])
    assert chance[:2] == ["chance", ""]
    assert chance[columns.index(RSUM)] == f"{runs[('merged', 0)]['metrics']['zero_shot/chance/rsum']:.2f}"
    assert chance[columns.index("pretrain/itm_acc")] == ""
    assert (tmp_path / "out" / "table.md").read_text().strip() == result.table
    with (tmp_path / "out" / "results.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["variant"], r["seed"]) for r in rows] == [("merged", "0"), ("merged", "1"), ("itm_contrastive", "0"),
                                                         ("itm_contrastive", "1")]
    assert float(rows[3][RSUM]) == pytest.approx(runs[("itm_contrastive", 1)]["metrics"][RSUM])
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]
    assert summary["merged"][RSUM]["mean"] == pytest.approx(by_hand([runs[("merged", s)]["metrics"][RSUM]
                                                                     for s in (0, 1)])[0])

    # A second call trains nothing: the CLI prints the same table from the finished runs.
    monkeypatch.setattr(ablation_module, "train", lambda config: pytest.fail("a finished run was trained again"))
    assert ablate(["--sweep", str(sweep / "sweep.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == result.table
    # --variants: a subset (as one of several processes splitting a sweep would run it).
    assert ablate(["--sweep", str(sweep / "sweep.yaml"), "--out", str(tmp_path / "out"),
                  "--variants", "itm_contrastive"]) == 0
    rows = [cells_of(line)[0] for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert rows == ["itm_contrastive", "chance"]
    with pytest.raises(SystemExit):
        ablate(["--sweep", str(sweep / "sweep.yaml"), "--out", str(tmp_path / "out"), "--variants", "nope"])
    assert "nope not in" in capsys.readouterr().err
    # A finished run is only reused by the sweep that made it.
    with pytest.raises(ConfigError, match="different sweep"):
        run_ablation(load_ablation(sweep / "sweep.yaml", ["evaluation.max_images=4"]), tmp_path / "out")


def test_fine_tuned_retrieval_is_scored_on_the_zero_shot_split(sweep, tmp_path):
    ablation = load_ablation(sweep / "sweep.yaml", ["seeds=[3]", "finetune.enabled=true"])
    # Contrastive ITM: fine-tuning and both evaluations go through its score head.
    ablation.variants = {"merged": ablation.variants["itm_contrastive"]}
    result = run_ablation(ablation, tmp_path / "out")
    assert result.runs[0]["pretrain"]["splits"]["val"]["metrics"]["chance_itm_acc"] == pytest.approx(1 / 3)
    metrics = result.runs[0]["metrics"]
    assert metrics["finetuned/chance/rsum"] == metrics["zero_shot/chance/rsum"]
    assert result.runs[0]["finetune"]["steps"] == 2
    assert "finetuned/itm_all/rsum" in result.table.splitlines()[0]
    finetuned = json.loads((tmp_path / "out" / "merged" / "seed_3" / "finetune" / "results.json").read_text())
    assert finetuned["config"]["init"]["checkpoint"] == str(tmp_path / "out" / "merged" / "seed_3" / "pretrain"
                                                            / "pretrained")
    assert finetuned["config"]["retrieval"]["max_eval_images"] == 5


def test_bad_sweeps_fail_before_any_run(sweep, tmp_path):
    with pytest.raises(ConfigError, match="variants"):
        load_ablation(sweep / "sweep.yaml", ["variants={}"])
    with pytest.raises(ConfigError, match="variants.a/b"):
        load_ablation(sweep / "sweep.yaml", ["variants={a/b: []}"])
    ablation = load_ablation(sweep / "sweep.yaml", ["variants={typo: [model.encoder.fusion=stacked]}"])
    with pytest.raises(ConfigError, match="encoder.fusion"):
        run_ablation(ablation, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_shipped_sweep_validates(monkeypatch):
    monkeypatch.chdir(ROOT)  # its paths are relative to the repository, as the tools run
    ablation = load_ablation(ROOT / "configs" / "ablations" / "decoupling.yaml")
    assert "merged" in ablation.variants and ablation.variants["merged"] == []
    for variant in ablation.variants:
        ablation_module.pretrain_config(ablation, variant, 0, Path("unused"))
