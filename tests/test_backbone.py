import re

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from soho.config import ConfigError
from soho.models.backbone import Backbone
from soho.models.config import BackboneConfig


def backbone(hidden_size=16, seed=0, **config):
    torch.manual_seed(seed)
    return Backbone(BackboneConfig(**{"name": "resnet10t", "out_index": 3, **config}), hidden_size)


def batchnorm_statistics(module):
    return {name: buffer.clone() for name, buffer in module.named_buffers() if "running" in name}


def randomize_batchnorm_statistics(model):
    # Non-trivial statistics, so a BatchNorm buffer that was not loaded shows in the outputs.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model


class NotATensor:
    pass


@pytest.mark.parametrize("out_index, extra_pool, stride", [(3, 1, 16), (4, 1, 32), (4, 2, 64), (3, 2, 32)])
@pytest.mark.parametrize("height, width", [(64, 64), (70, 100)])
def test_output_shape_and_stride(out_index, extra_pool, stride, height, width):
    model = backbone(hidden_size=24, out_index=out_index, extra_pool=extra_pool).eval()
    assert model.stride == stride
    assert model.feature_channels == {3: 256, 4: 512}[out_index]
    assert model.hidden_size == 24
    out = model(torch.randn(2, 3, height, width))
    assert out.shape == (2, 24, -(-height // stride), -(-width // stride))  # partial cells are kept


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 1, 64, 64), (2, 4, 64, 64)])
def test_rejects_input_that_is_not_rgb_batch(shape):
    with pytest.raises(ValueError, match=re.escape(f"(batch, 3, height, width), got shape {shape}")):
        backbone()(torch.randn(*shape))


def test_frozen_stages_keep_weights_and_statistics():
    model = backbone(frozen_stages=2).train()
    cnn = model.cnn
    assert model.frozen_modules == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    frozen = [cnn.conv1, cnn.bn1, cnn.layer1]
    trained = [cnn.layer2, cnn.layer3, model.proj, model.norm]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trained for p in m.parameters())
    model.eval().train()
    assert not any(m.training for m in frozen) and all(m.training for m in trained)

    frozen_before = [batchnorm_statistics(m) for m in frozen]
    trained_before = [batchnorm_statistics(m) for m in trained]
    out = model(torch.randn(2, 3, 64, 64) * 3 + 1)
    (out * torch.randn_like(out)).sum().backward()  # a plain sum has zero gradient through BatchNorm
    for module, before in zip(frozen, frozen_before):
        for name, value in batchnorm_statistics(module).items():
            assert torch.equal(value, before[name]), name
    for module, before in zip(trained, trained_before):
        assert all(not torch.equal(value, before[name]) for name, value in batchnorm_statistics(module).items())

    assert all(p.grad is None for m in frozen for p in m.parameters())
    # timm zero-initialises each residual block's last BatchNorm, so only some tensors of a stage get gradient.
    for module in trained:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_no_frozen_stages_trains_everything():
    model = backbone(frozen_stages=0).train()
    assert model.frozen_modules == []
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_loads_torchvision_weights_from_pth(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorm_statistics(torchvision.models.resnet18()).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = Backbone(BackboneConfig(name="resnet18", out_index=4, frozen_stages=2, pretrained_path=str(path)), 8)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(stem))))
        torch.testing.assert_close(model.cnn(x)[-1], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), model.norm(model.proj(expected)), atol=1e-5, rtol=1e-5)
    assert "state_dict" not in model.cnn.pretrained_cfg  # no second copy of the weights kept around


def test_loads_timm_weights_from_safetensors_and_wrapped_checkpoints(tmp_path):
    torch.manual_seed(0)
    reference = randomize_batchnorm_statistics(timm.create_model("resnet10t")).eval()
    save_file(reference.state_dict(), str(tmp_path / "resnet10t.safetensors"))
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    for name in ("resnet10t.safetensors", "wrapped.pt"):
        model = backbone(pretrained_path=str(tmp_path / name), seed=1).eval()
        with torch.no_grad():
            torch.testing.assert_close(model.cnn(x)[-1], expected, atol=1e-5, rtol=1e-5)


def test_refuses_bad_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        backbone(pretrained_path=str(tmp_path / "missing.pth"))

    state_dict = timm.create_model("resnet10t").state_dict()
    torch.save({"state_dict": state_dict, "payload": NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        backbone(pretrained_path=str(tmp_path / "pickled.pth"))

    torch.save({"module." + key: value for key, value in state_dict.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match=r"do not fit timm model 'resnet10t': \d+ missing .*\d+ unexpected"):
        backbone(pretrained_path=str(tmp_path / "prefixed.pth"))

    # resnet34 has resnet18's tensors and more: timm alone would load it without complaint.
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match=r"unexpected \(e.g. layer1.2"):
        Backbone(BackboneConfig(name="resnet18", pretrained_path=str(tmp_path / "resnet34.pth")), 8)

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match="wrong shape"):
        Backbone(BackboneConfig(name="resnet18", pretrained_path=str(tmp_path / "resnet50.pth")), 8)

    # The classifier is not used, so one for another number of classes (or none) is fine.
    headless = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    backbone(pretrained_path=str(tmp_path / "headless.safetensors"))

    (tmp_path / "weights.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match="unsupported suffix"):
        backbone(pretrained_path=str(tmp_path / "weights.ckpt"))


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_channels_last_and_checkpointing_change_nothing(frozen_stages):
    x = torch.randn(2, 3, 64, 64)
    upstream = torch.randn(2, 16, 4, 4)
    runs = {}
    for variant in ("default", "channels_last", "gradient_checkpointing"):
        flags = {variant: True} if variant != "default" else {}
        model = backbone(frozen_stages=frozen_stages, **flags).train()
        calls = []
        model.cnn.layer3.register_forward_pre_hook(lambda *args: calls.append(1))
        out = model(x)
        (out * upstream).sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        runs[variant] = out, grads, batchnorm_statistics(model), len(calls)

    out, grads, statistics, calls = runs.pop("default")
    assert calls == 1
    for variant, (other_out, other_grads, other_statistics, other_calls) in runs.items():
        # Checkpointed stages really are run again for the backward pass.
        assert other_calls == (2 if variant == "gradient_checkpointing" else 1)
        torch.testing.assert_close(other_out, out, atol=1e-5, rtol=1e-5, msg=variant)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-4, rtol=1e-4, msg=f"{variant}: {name}")
        # Recomputation must not update BatchNorm statistics a second time.
        for name, value in statistics.items():
            torch.testing.assert_close(other_statistics[name], value, atol=1e-6, rtol=1e-6, msg=f"{variant}: {name}")


def test_checkpointing_is_off_in_eval_and_without_grad():
    model = backbone(gradient_checkpointing=True).train()
    calls = []
    model.cnn.layer3.register_forward_pre_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    model.eval()
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert len(calls) == 2


def test_channels_last_memory_format():
    model = backbone(channels_last=True).eval()
    assert model.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert model(torch.randn(1, 3, 64, 64)).is_contiguous(memory_format=torch.channels_last)


def test_bad_configs_name_the_problem():
    with pytest.raises(ConfigError, match="'resnet_nonexistent' is not a timm model"):
        backbone(name="resnet_nonexistent")
    with pytest.raises(ConfigError, match=r"out_index=5 is out of range: 'resnet10t' has feature stages 0\.\.4"):
        backbone(out_index=5)
    with pytest.raises(ConfigError, match="frozen_stages=4 freezes more than the 3 stages"):
        backbone(out_index=2, frozen_stages=4)
    # efficientnet's features_only wrapper holds its stages inside one "blocks" module.
    with pytest.raises(ConfigError, match="set backbone.frozen_stages: 0"):
        backbone(name="efficientnet_b0", frozen_stages=2)
    assert backbone(name="efficientnet_b0", frozen_stages=0).stride == 16


def test_group_norm_backbone_is_independent_of_the_batch():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet10t", out_index=2, frozen_stages=0, norm="group"), 32)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    images = torch.randn(4, 3, 64, 64)
    alone = backbone.train()(images[:1])
    # Same features whatever the rest of the batch and in either mode: no batch statistics.
    torch.testing.assert_close(backbone(images)[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(backbone.eval()(images[:1]), alone, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="norm: group"):
        BackboneConfig(name="resnet10t", norm="group", pretrained_path="weights.pth")


def test_frozen_norm_statistics_make_training_features_match_evaluation():
    torch.manual_seed(0)
    model = backbone(frozen_stages=0).train()
    model(torch.randn(8, 3, 64, 64) * 2 + 1)  # move the running statistics away from their init
    model.freeze_norm_statistics()
    model.eval().train()  # stays frozen through mode switches (evaluation in the training loop)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.cnn.layer2.training
    before = [batchnorm_statistics(m) for m in norms]
    images = torch.randn(4, 3, 64, 64)
    alone = model(images[:1])
    torch.testing.assert_close(model(images)[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.eval()(images[:1]), alone, atol=1e-5, rtol=0)
    for module, stats in zip(norms, before):
        assert all(torch.equal(value, stats[name]) for name, value in batchnorm_statistics(module).items())
    out = model.train()(images)
    (out * torch.randn_like(out)).sum().backward()
    assert model.norm.weight.grad is not None and model.norm.weight.grad.abs().sum() > 0
