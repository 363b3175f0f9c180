"""What a run promises when things go wrong (docs/RELIABILITY.md): preemption, divergence, unusable data,
concurrent runs, failed saves and damaged checkpoints, and user errors as one line. Behaviour about
processes (signals through ``accelerate launch``, two writers, kill -9 mid-save) runs real subprocesses,
under ``slow``."""
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_pretraining import COLOURS, run_config, write_world

from soho.cli import finetune, pretrain
from soho.config import from_dict, to_dict
from soho.data.pretraining import PretrainingDataset
from soho.data.shards import LOGGED_SKIPS_PER_REASON, DataError, SkipCounter
from soho.data.stream import loader_batches, stream_loader
from soho.errors import Interrupted, TrainingDiverged
from soho.models.soho import SohoForPretraining
from soho.tasks import PretrainConfig
from soho.tasks.pretraining import PretrainingTask
from soho.tokenizer import load_tokenizer, train_wordpiece_tokenizer
from soho.train import signals
from soho.train.checkpoint import CheckpointError, CheckpointSaveError, verify_checkpoint
from soho.train.lock import OutputDirLocked
from soho.train.trainer import json_safe, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    write_world(root / "train")
    write_world(root / "val", num_shards=1, per_shard=16, broken=False)
    corpus = [f"a {n} picture the image is {n} something {n}" for n in COLOURS]
    train_wordpiece_tokenizer(corpus * 5, root / "tokenizer", vocab_size=100)
    return root


def strict_records(path):
    """metrics.jsonl as a strict JSON parser reads it: a bare NaN or Infinity token fails."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return [json.loads(line, parse_constant=refuse) for line in (path / "metrics.jsonl").read_text().splitlines()]


def logged_steps(path):
    """The steps of the training records (not of evaluations or the final record)."""
    return [r["step"] for r in strict_records(path) if "nonfinite_steps" in r]


def on_train_step(monkeypatch, action):
    """Run ``action(call, model)`` before each training step's forward pass (calls count from 1); a function it
    returns rewrites that step's output."""
    original = PretrainingTask.train_step
    calls = itertools.count(1)

    def train_step(self, model, batch, device):
        rewrite = action(next(calls), model)
        out = original(self, model, batch, device)
        return rewrite(out) if rewrite is not None else out

    monkeypatch.setattr(PretrainingTask, "train_step", train_step)


# --- 1. Preemption -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_ends_the_step_writes_a_checkpoint_and_resume_continues(world, tmp_path, monkeypatch, signum):
    on_train_step(monkeypatch, lambda call, model: os.kill(os.getpid(), signum) if call == 3 else None)
    with pytest.raises(Interrupted, match=f"{signum.name} stopped the run at step 3: checkpoint .*step_3") as stopped:
        train(run_config(world, tmp_path, save_every=100))
    assert stopped.value.exit_code == 128 + signum
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_3") is None
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "pretrained").exists()
    assert not (tmp_path / "run.lock").exists()
    monkeypatch.undo()
    results = train(run_config(world, tmp_path, save_every=100, resume="auto"))
    assert results["steps"] == 6 and logged_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_stop_signal_during_evaluation_ends_it_early_and_saves(world, tmp_path, monkeypatch):
    original = PretrainingTask.evaluate
    batches = []

    def evaluate(self, model, accelerator, name, shards):
        os.kill(os.getpid(), signal.SIGINT)
        result = original(self, model, accelerator, name, shards)
        batches.append(result.metrics["batches"])
        return result

    monkeypatch.setattr(PretrainingTask, "evaluate", evaluate)
    with pytest.raises(Interrupted, match="SIGINT stopped the run at step 2") as stopped:
        train(run_config(world, tmp_path, eval_every=2, eval_batches=None, save_every=100))
    assert stopped.value.exit_code == 130 and batches == [0]
    assert not [r for r in strict_records(tmp_path) if "eval" in r], "an evaluation cut short is not recorded"
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_2") is None


def test_signals_together_count_once_and_a_later_one_exits_at_once(monkeypatch):
    exits = []

    class Exited(Exception):
        pass

    def fake_exit(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(signals.os, "_exit", fake_exit)
    with signals.StopSignals():
        # A terminal's Ctrl+C and the launcher's forwarded SIGTERM arrive together: one request.
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.stop_signal() == signal.SIGINT and exits == []
        monkeypatch.setattr(signals, "REPEAT_SECONDS", 0.0)
        with pytest.raises(Exited):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
    assert exits == [143]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the previous handlers are back"


# --- 2. Divergence -------------------------------------------------------------------------------------------

def test_divergence_stops_the_run_and_never_saves_non_finite_weights(world, tmp_path):
    # The largest learning rate the config allows, plain SGD, no clipping: the weights blow up within ten steps.
    data = to_dict(run_config(world, tmp_path, max_steps=200, save_every=2, keep_last=1, max_nonfinite_steps=5))
    data["optim"].update(rest={"name": "sgd", "lr": 10.0}, backbone={"name": "sgd", "lr": 10.0}, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"5 steps in a row .*\(train.max_nonfinite_steps=5\)") as stopped:
        train(from_dict(PretrainConfig, data))
    assert stopped.value.exit_code == 3
    records = strict_records(tmp_path)
    nonfinite = [r for r in records if r.get("nonfinite")]
    assert nonfinite and all(r[name] is None for r in nonfinite for name in r["nonfinite"] if "/" not in name)
    # Divergence shows as a NaN or infinite loss, or a finite loss with a non-finite gradient norm.
    assert {"loss", "grad_norm"} & set(nonfinite[-1]["nonfinite"]) and records[-1]["nonfinite_steps"] >= 1
    saved = list((tmp_path / "checkpoints").iterdir())
    assert saved, "keep_last left the newest finite checkpoint"
    for checkpoint in saved:
        assert verify_checkpoint(checkpoint) is None
        for name, tensor in load_file(checkpoint / "pretrained" / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint, name)
    assert not (tmp_path / "pretrained").exists() and not (tmp_path / "results.json").exists()


def test_a_non_finite_step_is_skipped_on_every_process_and_counted(world, tmp_path, monkeypatch):
    snapshots = {}

    def poison_step_3(call, model):
        if call in (3, 4):
            snapshots[call] = [p.detach().clone() for p in model.parameters()]
        return (lambda out: type(out)(loss=out.loss * float("nan"), losses=out.losses, metrics=out.metrics,
                                      counts=out.counts)) if call == 3 else None

    on_train_step(monkeypatch, poison_step_3)
    results = train(run_config(world, tmp_path, log_every=2, save_every=100))
    assert results["steps"] == 6 and results["nonfinite_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4])), "the optimizer stepped"
    window = next(r for r in strict_records(tmp_path) if r["step"] == 4)
    assert window["nonfinite_steps"] == 1 and window["grad_norm"] is None and window["nonfinite"]["grad_norm"] == "nan"
    exported = load_file(tmp_path / "pretrained" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in exported.values())


def test_non_finite_values_become_null_with_their_reason():
    record = {"step": 3, "loss": float("nan"), "eval": {"val": {"mlm": float("inf"), "itm": 0.5}}, "n": 2}
    text = json.dumps(json_safe(record), allow_nan=False)
    assert json.loads(text) == {"step": 3, "loss": None, "eval": {"val": {"mlm": None, "itm": 0.5}}, "n": 2,
                                "nonfinite": {"loss": "nan", "eval/val/mlm": "inf"}}


# --- 3. Unusable data ----------------------------------------------------------------------------------------

def shards_of(root, kind):
    root.mkdir()
    for index in range(3):
        if kind == "unreadable":
            (root / f"x-{index}.tar").write_bytes(os.urandom(3000))
            continue
        with tarfile.open(root / f"x-{index}.tar", "w") as tar:
            for key in range(10 if kind == "corrupt" else 0):
                for name, payload in ((f"k{index}_{key}.jpg", b"not a jpeg"),
                                      (f"k{index}_{key}.json", b'{"captions": ["a red picture"]}')):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


@pytest.mark.parametrize("kind, reason", [("unreadable", "unreadable_shard 1000"), ("corrupt", "corrupt_image 1000"),
                                          ("empty", "empty shards 1000")])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_without_usable_samples_stops_with_one_line(world, tmp_path, kind, reason, workers):
    shards = shards_of(tmp_path / kind, kind)
    config = run_config(world, tmp_path / "run").data
    config.shards = str(shards)
    dataset = PretrainingDataset(config, load_tokenizer(world / "tokenizer"), batch_size=4)
    with pytest.raises(DataError) as stopped, loader_batches(stream_loader(dataset, workers, 0)) as batches:
        next(batches)
    message = str(stopped.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"3 shards ({shards / 'x-0.tar'}, ") and "no usable sample in 1000 attempts" in message
    assert reason in message


def test_skip_warnings_are_rate_limited_with_summaries(caplog, monkeypatch):
    skips = SkipCounter(source="test shards")
    with caplog.at_level("WARNING", logger="soho.data.shards"):
        for index in range(500):
            skips.skip("corrupt_image", f"key{index}")
        monkeypatch.setattr("soho.data.shards.SKIP_SUMMARY_SECONDS", -1.0)
        skips.skip("corrupt_image", "key500")
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == LOGGED_SKIPS_PER_REASON + 1 and "summarised" in messages[LOGGED_SKIPS_PER_REASON - 1]
    assert messages[-1] == "skipped so far in test shards: corrupt_image 501"


def test_data_that_breaks_mid_run_stops_training(world, tmp_path):
    config = run_config(world, tmp_path, max_steps=1000, save_every=1000)
    config.data.shards = str(shards_of(tmp_path / "corrupt", "corrupt"))
    with pytest.raises(DataError, match="no usable sample in 1000 attempts in a row"):
        train(config)


# --- 4. Two runs, one output directory; failed saves -------------------------------------------------------

def test_a_second_writer_is_refused_and_a_dead_holder_is_taken_over(world, tmp_path, caplog):
    tmp_path.mkdir(exist_ok=True)
    host = socket.gethostname()
    (tmp_path / "run.lock").write_text(json.dumps({"host": host, "pid": os.getppid(), "started": "earlier"}))
    with pytest.raises(OutputDirLocked, match=f"in use by another run \\(host {host}, pid {os.getppid()}, since "
                                              "earlier\\).* remove .*run.lock") as refused:
        train(run_config(world, tmp_path))
    assert refused.value.exit_code == 2 and [p.name for p in tmp_path.iterdir()] == ["run.lock"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(json.dumps({"host": host, "pid": dead.pid, "started": "earlier"}))
    stale = tmp_path / "checkpoints" / "step_9.tmp-0dead0"
    stale.mkdir(parents=True)
    with caplog.at_level("WARNING"):
        assert train(run_config(world, tmp_path, max_steps=2, save_every=1))["steps"] == 2
    assert f"taking over {tmp_path / 'run.lock'}: its holder (pid {dead.pid}" in caplog.text
    assert not stale.exists() and not (tmp_path / "run.lock").exists()


def test_a_failed_save_removes_its_temporary_directory_and_reports_free_space(world, tmp_path, monkeypatch):
    original = SohoForPretraining.save_pretrained
    saves = itertools.count(1)

    def disk_full_on_second_save(self, directory, processor=None):
        if next(saves) == 2:
            Path(directory).mkdir(parents=True)
            (Path(directory) / "model.safetensors").write_bytes(b"half a file")
            raise OSError(28, "No space left on device")
        return original(self, directory, processor)

    monkeypatch.setattr(SohoForPretraining, "save_pretrained", disk_full_on_second_save)
    with pytest.raises(CheckpointSaveError, match=r"step_4: OSError: \[Errno 28\] No space left on device; removed "
                                                  r"the partial step_4.tmp-\w+; [\d.]+ [MG]iB free on "):
        train(run_config(world, tmp_path, save_every=2))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_2"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_2") is None


# --- 5. Resume ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(world, tmp_path_factory):
    """Six steps with checkpoints at steps 2, 4 and 6."""
    output = tmp_path_factory.mktemp("finished")
    train(run_config(world, output, save_every=2, keep_last=3))
    return output


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:999]),
                          "model.safetensors has 999 bytes, its manifest says"),
    "flipped bit in the optimizer": (lambda c: flip_a_bit(c / "optimizer.bin"),
                                     "optimizer.bin does not match its sha256 in manifest.json"),
    "garbage data state": (lambda c: (c / "data_state_rank0.json").write_text('{"positions": {"0": 12}}  '),
                           "data_state_rank0.json has"),
    "no trainer state": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    "save cut short": (lambda c: (c / "manifest.json").unlink(), "no manifest.json: its save did not finish"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_auto_falls_back_past_damaged_checkpoints_and_cuts_the_log(world, finished_run, tmp_path, caplog,
                                                                        damage):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    harm, problem = DAMAGE[damage]
    harm(output / "checkpoints" / "step_6")
    with caplog.at_level("INFO"):
        results = train(run_config(world, output, save_every=2, keep_last=3, resume="auto"))
    assert f"passing over {output / 'checkpoints' / 'step_6'}: {problem}" in caplog.text
    assert f"resumed from {output / 'checkpoints' / 'step_4'} at step 4" in caplog.text
    assert results["steps"] == 6 and verify_checkpoint(output / "checkpoints" / "step_6") is None
    # The stopped run's records past step 4 are kept aside, not repeated.
    records = strict_records(output)
    assert logged_steps(output) == [1, 2, 3, 4, 5, 6] and sum(bool(r.get("final")) for r in records) == 1
    discarded = [json.loads(line) for line in (output / "metrics.discarded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in discarded] == [5, 6, 6] and discarded[-1]["final"]


def test_resume_auto_without_a_checkpoint_says_it_starts_from_scratch(world, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert train(run_config(world, tmp_path, max_steps=1, resume="auto"))["steps"] == 1
    assert f"--resume auto: no checkpoint in {tmp_path / 'checkpoints'}: starting from scratch" in caplog.text


def test_resume_auto_with_only_damaged_checkpoints_is_an_error(world, finished_run, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished_run, output)
    for checkpoint in (output / "checkpoints").iterdir():
        (checkpoint / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*step_6 \\(no manifest.json.*step_2 "):
        train(run_config(world, output, resume="auto"))


# --- 6. User errors: one line, exit code 2, nothing written ------------------------------------------------

def write_config(world, tmp_path, **train_overrides):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(run_config(world, tmp_path / "run", **train_overrides))))
    return path


@pytest.mark.parametrize("arguments, message", [
    (["data.tokenizer={tmp}/nowhere"], "data.tokenizer: tokenizer directory not found: {tmp}/nowhere"),
    (["data.shards={tmp}/nowhere"], "data.shards: shard not found: {tmp}/nowhere"),
    (["data.shards={tmp}"], "data.shards: no .tar shards in directory {tmp}"),
    (["data.eval_shards={{val: {tmp}/nowhere}}"], "data.eval_shards.val: shard not found: {tmp}/nowhere"),
    (["--resume", "{tmp}/nowhere"], "--resume {tmp}/nowhere: no such directory"),
    (["--resume", "{tmp}"], "--resume {tmp}: not a usable checkpoint: no manifest.json: its save did not finish (or "
                            "a soho without manifests wrote it)"),
    (["optim.rest.lr=.nan"], "optim.rest.lr: expected a finite number, got nan"),
])
def test_user_errors_are_one_line_and_exit_code_2_before_anything_is_written(world, tmp_path, capsys, arguments,
                                                                          message):
    config = write_config(world, tmp_path)
    code = pretrain.main(["--config", str(config), *[a.format(tmp=tmp_path) for a in arguments]])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error[-1].endswith(f": error: {message.format(tmp=tmp_path)}"), error
    assert "Traceback" not in "\n".join(error)
    assert not (tmp_path / "run").exists()


def test_a_missing_initial_checkpoint_is_one_line_and_exit_code_2(world, tmp_path, capsys):
    code = finetune.main(["--config", str(ROOT / "configs" / "finetune" / "ve_synthetic.yaml"),
                          f"init.checkpoint={tmp_path / 'nowhere'}", f"data.train_shards={world / 'train'}",
                          f"data.eval_shards={{val: {world / 'val'}}}", f"train.output_dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and error[-1].endswith(f": error: init.checkpoint: no such directory: {tmp_path / 'nowhere'}")
    assert not (tmp_path / "run").exists()


# --- Processes ------------------------------------------------------------------------------------------------

def launch(output, world, *overrides, processes=None):
    """tools/pretrain.py on ``world``'s config, alone or under ``accelerate launch`` with ``processes``."""
    script = [str(ROOT / "tools" / "pretrain.py"), "--config", str(world / "config.yaml"),
              f"train.output_dir={output}", "train.max_steps=100000", "train.log_every=1", *overrides]
    if processes is None:
        argv = [sys.executable, *script]
    elif processes == 1:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", *script]
    else:
        argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "cpu.yaml"), "--num_processes", str(processes), *script]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)


def wait_for_steps(process, output, steps, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (output / "metrics.jsonl").is_file() and len((output / "metrics.jsonl").read_text().splitlines()) >= steps:
            return
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {steps} steps in {timeout} s")


@pytest.fixture(scope="module")
def launch_world(world):
    (world / "config.yaml").write_text(yaml.safe_dump(to_dict(run_config(world, world / "unused"))))
    return world


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_through_accelerate_launch_saves_and_exits_within_seconds(launch_world, tmp_path, processes):
    output = tmp_path / "run"
    run = launch(output, launch_world, f"data.num_workers={2 if processes == 1 else 1}", processes=processes)
    wait_for_steps(run, output, 4)
    if processes == 1:
        # A second run on the same directory is refused, naming the holder; the first runs on.
        second = launch(output, launch_world)
        assert second.wait(timeout=120) == 2
        lock = json.loads((output / "run.lock").read_text())
        assert second.stderr.read().strip().splitlines()[-1].startswith(
            f"pretrain.py: error: train.output_dir {output} is in use by another run (host {lock['host']}, "
            f"pid {lock['pid']}")
        assert run.poll() is None
    descendants = psutil.Process(run.pid).children(recursive=True)  # the ranks and their data workers
    start = time.monotonic()
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=120)[1]
    seconds = time.monotonic() - start
    print(f"{processes} process(es): exit {run.returncode} {seconds:.2f} s after SIGTERM")
    assert run.returncode == 143, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if "stopped: SIGTERM stopped the run" in line]
    assert len(stopped) == processes and "Traceback" not in stderr, stderr[-3000:]
    step = int(stopped[0].split(" at step ")[1].split(":")[0])
    assert verify_checkpoint(output / "checkpoints" / f"step_{step}") is None
    assert len(descendants) >= (3 if processes == 1 else 4)
    assert not [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert seconds < 30 and not (output / "run.lock").exists()


@pytest.mark.slow
def test_kill_9_mid_save_leaves_a_run_that_resumes_from_its_last_complete_checkpoint(launch_world, tmp_path):
    output = tmp_path / "run"
    run = launch(output, launch_world, "train.save_every=1", "train.keep_last=2")
    wait_for_steps(run, output, 3)
    deadline = time.monotonic() + 120
    while not list((output / "checkpoints").glob("step_*.tmp-*")):
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.001)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    left = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert any(".tmp-" in name for name in left) and (output / "run.lock").exists(), left
    complete = [name for name in left if ".tmp-" not in name]
    newest = max(int(name.split("_")[1]) for name in complete)
    resumed = launch(output, launch_world, f"train.max_steps={newest + 2}", "train.save_every=1000", "--resume", "auto")
    stderr = resumed.communicate(timeout=240)[1]
    assert resumed.returncode == 0, stderr[-3000:]
    assert "taking over" in stderr and "left by a save that did not finish" in stderr
    assert f"resumed from {output / 'checkpoints' / f'step_{newest}'} at step {newest}" in stderr
    assert not list((output / "checkpoints").glob("*.tmp-*"))
    steps = logged_steps(output)
    assert steps == sorted(set(steps)) and steps[-1] == newest + 2


@pytest.mark.slow
def test_a_second_signal_exits_at_once_without_a_checkpoint(launch_world, tmp_path):
    # Steps of several seconds, so that the second signal comes while the first still waits for the step's end.
    output = tmp_path / "run"
    run = launch(output, launch_world, "train.save_every=0", "train.batch_size=24", "data.image.min_size=256",
                 "data.image.max_size=256")
    wait_for_steps(run, output, 1)
    run.send_signal(signal.SIGTERM)
    time.sleep(signals.REPEAT_SECONDS + 0.5)
    assert run.poll() is None, "the step ended before the second signal"
    start = time.monotonic()
    run.send_signal(signal.SIGTERM)
    stderr = run.communicate(timeout=60)[1]
    assert run.returncode == 143 and time.monotonic() - start < 5, stderr[-3000:]
    assert "received SIGTERM again: exiting at once, without a checkpoint" in stderr and "stopped:" not in stderr
    assert not (output / "checkpoints").exists()
