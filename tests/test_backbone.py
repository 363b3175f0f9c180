import pytest
import torch
import torchvision
from safetensors.torch import save_file

from soho.config import ConfigError
from soho.models.backbone import Backbone
from soho.models.config import BackboneConfig


def test_shapes_and_strides():
    torch.manual_seed(0)
    for out_index, pool, stride in ((3, 1, 16), (4, 1, 32), (4, 2, 64)):
        backbone = Backbone(BackboneConfig(name="resnet10t", out_index=out_index, extra_pool=pool), 24).eval()
        assert backbone.stride == stride
        out = backbone(torch.randn(2, 3, 96, 160))
        assert out.shape == (2, 24, -(-96 // stride), -(-160 // stride))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        backbone(torch.randn(3, 64, 64))


def test_frozen_stages_keep_weights_and_statistics():
    torch.manual_seed(0)
    backbone = Backbone(BackboneConfig(name="resnet10t", out_index=3, frozen_stages=2), 16).train()
    assert backbone.frozen == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    assert not any(p.requires_grad for p in backbone.cnn.layer1.parameters())
    assert all(p.requires_grad for p in backbone.cnn.layer2.parameters())
    frozen_mean = backbone.cnn.bn1.running_mean.clone()
    trained_mean = backbone.cnn.layer2[0].bn1.running_mean.clone()
    out = backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    (out * torch.randn_like(out)).sum().backward()  # sums and squared sums are constant after BatchNorm
    assert torch.equal(frozen_mean, backbone.cnn.bn1.running_mean)
    assert not torch.equal(trained_mean, backbone.cnn.layer2[0].bn1.running_mean)
    # (timm zero-initialises each block's last BatchNorm, so only some of layer2 gets gradient at first)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.cnn.layer2.parameters())
    assert backbone.proj.weight.grad is not None


def test_loads_torchvision_and_timm_weights_from_local_files(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a missed key would show
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    save_file(reference.state_dict(), str(tmp_path / "resnet18.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(h))))
    for name in ("resnet18.pth", "resnet18.safetensors"):
        config = BackboneConfig(name="resnet18", out_index=4, pretrained_path=str(tmp_path / name))
        backbone = Backbone(config, 8).eval()
        with torch.no_grad():
            torch.testing.assert_close(backbone.cnn(x)[-1], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Backbone(BackboneConfig(name="resnet18", pretrained_path=str(tmp_path / "missing.pth")), 8)
    torch.save({"weights": reference.state_dict(), "code": object()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="tensor-only"):
        Backbone(BackboneConfig(name="resnet18", pretrained_path=str(tmp_path / "evil.pth")), 8)


def test_channels_last_and_checkpointing_change_nothing():
    torch.manual_seed(0)
    plain = Backbone(BackboneConfig(name="resnet10t", out_index=3, frozen_stages=1), 16).train()
    variants = [Backbone(BackboneConfig(name="resnet10t", out_index=3, frozen_stages=1, **flags), 16).train()
                for flags in ({"channels_last": True}, {"gradient_checkpointing": True})]
    x = torch.randn(2, 3, 64, 64)
    weights = torch.randn(2, 16, 4, 4)
    (plain(x) * weights).sum().backward()
    for variant in variants:
        variant.load_state_dict(plain.state_dict())  # statistics moved by the first pass; reload them
    plain_again = Backbone(BackboneConfig(name="resnet10t", out_index=3, frozen_stages=1), 16).train()
    plain_again.load_state_dict(plain.state_dict())
    reference = plain_again(x)
    (reference * weights).sum().backward()
    for variant in variants:
        out = variant(x)
        torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
        (out * weights).sum().backward()
        for (name, a), b in zip(variant.named_parameters(), plain_again.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-3, rtol=1e-3, msg=name)


def test_bad_configs_are_clear():
    with pytest.raises(ConfigError, match="unknown timm model"):
        Backbone(BackboneConfig(name="resnet_nonexistent"), 8)
    with pytest.raises(ConfigError, match="feature stages 0..4"):
        Backbone(BackboneConfig(name="resnet10t", out_index=7), 8)
