import math

import pytest
import torch
import torch.nn.functional as F

from soho.models.losses import accuracy, itc_loss, masked_token_loss


def test_masked_token_loss_ignores_unlabelled_positions():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    labels = torch.tensor([0, -100, 1])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert masked_token_loss(logits, labels).item() == pytest.approx(expected)
    none = masked_token_loss(logits.requires_grad_(), torch.full((3,), -100))
    assert none.item() == 0 and none.requires_grad


def test_accuracy_on_labelled_positions():
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 0, -100])).item() == pytest.approx(0.5)
    assert torch.isnan(accuracy(logits, torch.full((3,), -100)))


def test_itc_loss_single_caption_equals_clip_loss():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(4, 8), dim=-1)
    texts = F.normalize(torch.randn(4, 8), dim=-1)
    temperature = torch.tensor(0.1)
    loss, logits = itc_loss(images, texts, temperature)
    reference = (F.cross_entropy(texts @ images.t() / 0.1, torch.arange(4))
                 + F.cross_entropy(images @ texts.t() / 0.1, torch.arange(4))) / 2
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert logits.shape == (4, 4)


def test_itc_loss_with_several_captions_per_image():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(2, 8), dim=-1)
    texts = F.normalize(torch.randn(4, 8), dim=-1)
    image_ids = torch.tensor([10, 11])
    text_ids = torch.tensor([10, 10, 11, 11])
    loss, _ = itc_loss(images, texts, torch.tensor(0.5), image_ids, text_ids)
    t2i = F.cross_entropy(texts @ images.t() / 0.5, torch.tensor([0, 0, 1, 1]))
    i2t_logp = (images @ texts.t() / 0.5).log_softmax(1)
    i2t = -(i2t_logp[0, :2].mean() + i2t_logp[1, 2:].mean()) / 2
    assert loss.item() == pytest.approx(((t2i + i2t) / 2).item(), rel=1e-6)
