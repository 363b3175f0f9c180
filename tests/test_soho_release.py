"""The importer of the original SOHO release's checkpoints, on state dicts generated here with the release's
layout: mmcv's {"meta", "state_dict", "optimizer"}, torchvision ResNet names under backbone., the neck with
its dictionary buffers, BERT under language.bert., the tied MLM decoder and the ITM head."""
import argparse
import functools
import json
from collections import OrderedDict

import pytest
import timm
import torch

from soho.cli.import_soho_checkpoint import main
from soho.models.soho import SohoForPretraining
from soho.models.soho_release import convert_state_dict, infer_config
from soho.processing import SohoProcessor
from soho.tokenizer import train_wordpiece_tokenizer

HIDDEN, LAYERS, VOCAB, POSITIONS, INTERMEDIATE, ENTRIES = 32, 2, 60, 32, 64, 16


def release_state_dict(dictionary=True, gated=True):
    """A SOHOSingleStreamPre (``dictionary``) or SOHOSingleStreamVQA state dict of a ResNet-18 and a tiny BERT."""
    return OrderedDict(_release_state_dict(dictionary, gated))


@functools.lru_cache(maxsize=None)
def _release_state_dict(dictionary, gated, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator)

    state = OrderedDict()
    for key, value in timm.create_model("resnet18").state_dict().items():
        if not key.startswith("fc."):
            state[f"backbone.{key}"] = tensor(*value.shape) if value.is_floating_point() else value
    state["neck.conv.conv.weight"] = tensor(HIDDEN, 512, 1, 1)
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"neck.conv.bn.{name}"] = tensor(HIDDEN)
    state["neck.conv.bn.num_batches_tracked"] = torch.tensor(7)
    state["neck.ln.weight"], state["neck.ln.bias"] = tensor(HIDDEN), tensor(HIDDEN)
    if dictionary:
        state["neck.mask_emb.weight"] = tensor(1, HIDDEN)
        state["neck.vq.embed"], state["neck.vq.embed_avg"] = tensor(ENTRIES, HIDDEN), tensor(ENTRIES, HIDDEN)
        state["neck.vq.cluster_size"], state["neck.vq.cluster_sum"] = tensor(ENTRIES).abs(), tensor(ENTRIES).abs()
        state["neck.pos_line.weight"], state["neck.pos_line.bias"] = tensor(HIDDEN, HIDDEN), tensor(HIDDEN)
        if gated:
            state["neck.gate_fc.conv.weight"] = tensor(2, 2 * HIDDEN, 1, 1)
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"neck.gate_fc.bn.{name}"] = tensor(2)
    bert = "language.bert."
    state[f"{bert}embeddings.word_embeddings.weight"] = tensor(VOCAB, HIDDEN)
    state[f"{bert}embeddings.position_embeddings.weight"] = tensor(POSITIONS, HIDDEN)
    state[f"{bert}embeddings.token_type_embeddings.weight"] = tensor(2, HIDDEN)
    state[f"{bert}embeddings.LayerNorm.weight"] = tensor(HIDDEN)
    state[f"{bert}embeddings.LayerNorm.bias"] = tensor(HIDDEN)
    for layer in range(LAYERS):
        prefix = f"{bert}encoder.layer.{layer}."
        shapes = {"attention.self.query": (HIDDEN, HIDDEN), "attention.self.key": (HIDDEN, HIDDEN),
                  "attention.self.value": (HIDDEN, HIDDEN), "attention.output.dense": (HIDDEN, HIDDEN),
                  "attention.output.LayerNorm": (HIDDEN,), "intermediate.dense": (INTERMEDIATE, HIDDEN),
                  "output.dense": (HIDDEN, INTERMEDIATE), "output.LayerNorm": (HIDDEN,)}
        for name, shape in shapes.items():
            state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = tensor(*shape), tensor(shape[0])
    if dictionary:
        state["mask_l_fc.weight"] = state[f"{bert}embeddings.word_embeddings.weight"]
        state["head.match_class.weight"] = tensor(2, HIDDEN)
    else:
        state["head.vqa.0.weight"], state["head.vqa.0.bias"] = tensor(4 * HIDDEN, HIDDEN), tensor(4 * HIDDEN)
        state["head.vqa.3.weight"], state["head.vqa.3.bias"] = tensor(9, 4 * HIDDEN), tensor(9)
    return state


def save_release(path, state, meta=None):
    """As mmcv's save_checkpoint: meta, the state dict and the optimizer's state."""
    torch.save({"meta": meta or {"epoch": 40, "iter": 31250, "time": "Thu Mar 11 2021", "config": "model = dict()"},
                "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "opt": "sgd"}]}}, path)
    return path


def expected_name(key):
    """The soho name of a release tensor, spelled out independently of the importer's table."""
    bert_layer = {"attention.self.": "attention.", "attention.output.dense.": "attention_output.",
                  "attention.output.LayerNorm.": "attention_norm.", "intermediate.dense.": "intermediate.",
                  "output.dense.": "output.", "output.LayerNorm.": "output_norm."}
    if key.startswith("backbone."):
        return "soho.backbone.cnn." + key[len("backbone."):]
    fixed = {"neck.conv.conv.weight": "soho.backbone.proj.weight",
             "neck.ln.weight": "soho.visual_embeddings.norm.weight", "neck.ln.bias": "soho.visual_embeddings.norm.bias",
             "neck.vq.embed": "soho.visual_dictionary.embedding",
             "neck.vq.embed_avg": "soho.visual_dictionary.ema_sum",
             "neck.vq.cluster_size": "soho.visual_dictionary.ema_count",
             "neck.mask_emb.weight": "soho.visual_embeddings.mask_embedding",
             "language.bert.embeddings.LayerNorm.weight": "soho.text_embeddings.norm.weight",
             "language.bert.embeddings.LayerNorm.bias": "soho.text_embeddings.norm.bias"}
    if key in fixed:
        return fixed[key]
    if key.startswith("neck.conv.bn."):
        return "soho.backbone.norm." + key[len("neck.conv.bn."):]
    if key.startswith("language.bert.embeddings."):
        return "soho.text_embeddings." + key[len("language.bert.embeddings."):]
    layer, rest = key[len("language.bert.encoder.layer."):].split(".", 1)
    part = next(p for p in bert_layer if rest.startswith(p))
    return f"soho.encoder.layers.{layer}.{bert_layer[part]}{rest[len(part):]}"


NOT_IMPORTED = {"neck.vq.cluster_sum", "neck.pos_line.weight", "neck.pos_line.bias", "neck.gate_fc.conv.weight",
                "neck.gate_fc.bn.weight", "neck.gate_fc.bn.bias", "neck.gate_fc.bn.running_mean",
                "neck.gate_fc.bn.running_var", "mask_l_fc.weight", "head.match_class.weight"}


def test_every_tensor_lands_where_it_belongs(tmp_path, capsys):
    state = release_state_dict()
    path = save_release(tmp_path / "epoch_40.pth", state)
    train_wordpiece_tokenizer(["a dog on the grass", "a cat on a sofa"], tmp_path / "bert", vocab_size=VOCAB)
    assert main(["--checkpoint", str(path), "--out", str(tmp_path / "soho"), "--tokenizer", str(tmp_path / "bert"),
                 "--num-attention-heads", "4"]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "soho" / "import_report.json").read_text())
    assert set(report["not_imported"]) == NOT_IMPORTED
    assert summary["imported"] == report["imported"] == len(state) - len(NOT_IMPORTED)
    assert report["architecture"] == {"backbone": "resnet18", "hidden_size": HIDDEN, "layers": LAYERS,
                                      "visual_dictionary": ENTRIES}

    model = SohoForPretraining.from_pretrained(tmp_path / "soho")  # strict: the architecture it was saved as
    own = model.state_dict()
    for key, tensor in state.items():
        if key not in NOT_IMPORTED:
            assert torch.equal(own[expected_name(key)], tensor.reshape(own[expected_name(key)].shape)), key
    assert torch.equal(own["soho.visual_embeddings.mask_embedding"], state["neck.mask_emb.weight"][0])
    # Nothing else of the model was loaded: the rest is what soho initialises afresh.
    assert set(report["initialised"]) == set(own) - {expected_name(k) for k in state if k not in NOT_IMPORTED}
    assert {"soho.pooler.dense.weight", "objectives.itm.head.classifier.weight"} <= set(report["initialised"])

    config = model.config
    assert (config.backbone.name, config.backbone.out_index, config.backbone.extra_pool) == ("resnet18", 4, 2)
    assert (config.encoder.vocab_size, config.encoder.intermediate_size, config.encoder.num_attention_heads) == (
        VOCAB, INTERMEDIATE, 4)
    assert config.use_visual_dictionary and not config.itc.enabled
    processor = SohoProcessor.from_pretrained(tmp_path / "soho")
    inputs = processor(images=[torch.rand(3, 96, 128)], text=["a dog on the grass"])
    assert processor.image_config.min_size == 600 and model.eval().score(**inputs).shape == (1,)


def test_a_vqa_checkpoint_imports_without_a_dictionary(tmp_path):
    state = release_state_dict(dictionary=False)
    converted, skipped = convert_state_dict(state)
    assert set(skipped) == {"head.vqa.0.weight", "head.vqa.0.bias", "head.vqa.3.weight", "head.vqa.3.bias"}
    config = infer_config(state, num_attention_heads=4)
    assert not config.use_visual_dictionary and config.mvm.probability == 0.0
    model = SohoForPretraining(config)
    assert not set(converted) - set(model.state_dict())
    # DistributedDataParallel's prefix is dropped; no tokenizer: no processor.
    path = save_release(tmp_path / "vqa.pth", OrderedDict((f"module.{k}", v) for k, v in state.items()))
    assert main(["--checkpoint", str(path), "--out", str(tmp_path / "soho"), "--num-attention-heads", "4"]) == 0
    assert SohoForPretraining.from_pretrained(tmp_path / "soho").soho.visual_dictionary is None
    assert not (tmp_path / "soho" / "processor_config.json").exists()


def test_pickled_objects_need_an_explicit_opt_in(tmp_path, capsys):
    path = save_release(tmp_path / "epoch_40.pth", release_state_dict(gated=False),
                        meta={"config": argparse.Namespace(total_epochs=40)})
    arguments = ["--checkpoint", str(path), "--out", str(tmp_path / "soho"), "--num-attention-heads", "4"]
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    assert stopped.value.code == 2
    assert "pickles more than tensors" in capsys.readouterr().err and not (tmp_path / "soho").exists()
    assert main(arguments + ["--trust-pickle"]) == 0


def test_layouts_it_does_not_know_are_refused(tmp_path, capsys):
    cases = {
        "unknown": {**release_state_dict(), "neck.something_new.weight": torch.zeros(3)},
        "shapes": {**release_state_dict(), "neck.vq.embed_avg": torch.zeros(ENTRIES + 1, HIDDEN)},
        "backbone": {k: v for k, v in release_state_dict().items() if not k.startswith("backbone.layer4.1.")},
        "heads": release_state_dict(),
    }
    messages = {"unknown": "1 tensors of no known SOHO release layout, e.g. neck.something_new.weight",
                "shapes": "soho.visual_dictionary.ema_sum (17, 32) != (16, 32)",
                "backbone": "backbone with [2, 2, 2, 1] blocks per stage (basic) is none of the torchvision ResNets",
                "heads": "hidden size 32: give the number of attention heads"}
    for name, state in cases.items():
        path = save_release(tmp_path / f"{name}.pth", state)
        with pytest.raises(SystemExit) as stopped:
            main(["--checkpoint", str(path), "--out", str(tmp_path / name)]
                 + ([] if name == "heads" else ["--num-attention-heads", "4"]))
        assert stopped.value.code == 2 and messages[name] in capsys.readouterr().err, name
