import json

import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from soho.analysis.curves import collect_panels, plot_metrics, read_records  # noqa: E402
from soho.cli.plot_metrics import main  # noqa: E402


def pretraining_records():
    """What the trainer logs for pre-training: window means every 2 steps, an evaluation at step 4, the final one."""
    records = []
    for step in (2, 4, 6):
        records.append({"step": step, "loss": 12.0 - step, "itm": 0.7 - 0.01 * step, "mlm": 7.0 - 0.5 * step,
                        "itm_acc": 0.5 + 0.02 * step, "mlm_acc": 0.01 * step, "mvm_acc": float("nan"),
                        "lr": 1e-4, "grad_norm": 3.0, "images_per_second": 5.0, "skip_fraction": 0.0})
        if step == 4:
            records.append({"step": 4, "eval": {"val": {"loss": 8.5, "itm": 0.66, "itm_acc": 0.6,
                                                        "chance_itm_acc": 0.55, "batches": 2}}})
    records.append({"step": 6, "final": True, "wall_seconds": 9.0,
                    "eval": {"val": {"loss": 7.0, "itm": 0.64, "itm_acc": 0.62, "chance_itm_acc": 0.5,
                                     "mlm_acc": 0.05, "chance_mlm_acc": 0.17}}})
    return records


def write_metrics(path, records, extra_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def test_panels_hold_training_curves_evaluations_and_chance_levels(tmp_path, caplog):
    path = write_metrics(tmp_path / "metrics.jsonl", pretraining_records(), ['{"step": 8, "loss": 1.\n'])
    losses, accuracies = collect_panels(read_records(path))
    assert "skipped 1 lines that are not metrics records (lines 6)" in caplog.text
    assert list(losses) == ["loss", "itm", "mlm"]
    assert losses["loss"].training == [(2, 10.0), (4, 8.0), (6, 6.0)]
    assert dict(losses["itm"].evaluated) == {"val": [(4, 0.66), (6, 0.64)]}
    assert list(accuracies) == ["itm_acc", "mlm_acc"]  # mvm_acc was NaN (undefined) on every step
    assert accuracies["itm_acc"].chance == 0.5 and accuracies["mlm_acc"].chance == 0.17
    assert dict(accuracies["itm_acc"].evaluated) == {"val": [(4, 0.6), (6, 0.62)]}


def test_retrieval_protocols_share_a_panel_and_percent_evaluations_scale_training(tmp_path):
    records = [{"step": 5, "loss": 1.2, "itm": 0.6, "itc": 1.0, "itm_acc": 0.7, "itc_acc": 0.4},
               {"step": 10, "final": True, "eval": {"test": {
                   "itc/txt_r1": 20.0, "itc_itm/txt_r1": 30.0, "chance/txt_r1": 2.5, "itc/rsum": 150.0,
                   "itc_itm/rsum": 180.0, "chance/rsum": 40.0}}},
               {"step": 10, "loss": 0.9, "accuracy": 0.8},
               {"step": 12, "final": True, "eval": {"val": {"accuracy": 75.0, "chance_accuracy": 33.3}}}]
    losses, accuracies = collect_panels(iter(records))
    assert dict(accuracies["txt_r1"].evaluated) == {"test itc": [(10, 20.0)], "test itc_itm": [(10, 30.0)]}
    assert accuracies["txt_r1"].chance == 2.5 and accuracies["rsum"].chance == 40.0
    assert accuracies["accuracy"].training == [(10, 0.8)] and accuracies["accuracy"].chance == 33.3
    written = plot_metrics(write_metrics(tmp_path / "run" / "metrics.jsonl", records), tmp_path / "curves")
    assert [p.name for p in written] == ["losses.png", "accuracy.png"]


def test_plot_metrics_writes_pngs_and_the_cli_names_them(tmp_path, capsys):
    run = tmp_path / "synthetic"
    write_metrics(run / "metrics.jsonl", pretraining_records())
    assert main([str(run)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(run / "curves" / "losses.png"), str(run / "curves" / "accuracy.png")]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 800 and image.height > 300


def test_unusable_metrics_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "nowhere")])
    assert stopped.value.code == 2 and "metrics file not found" in capsys.readouterr().err
    write_metrics(tmp_path / "empty" / "metrics.jsonl", [{"step": 1, "lr": 0.1}], ["not json\n"])
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "empty")])
    assert stopped.value.code == 2 and "no losses or accuracies to plot" in capsys.readouterr().err
