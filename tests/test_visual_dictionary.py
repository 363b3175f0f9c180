import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soho.models.config import VisualDictionaryConfig
from soho.models.visual_dictionary import VisualDictionary


def make_vd(size=3, dim=2, **config):
    torch.manual_seed(0)
    return VisualDictionary(VisualDictionaryConfig(size=size, **config), dim)


def test_lookup_equals_brute_force():
    vd = make_vd(size=50, dim=16)
    x = torch.randn(300, 16)
    expected = torch.cdist(x, vd.embedding).argmin(1)
    assert torch.equal(vd.lookup(x), expected)


def test_one_ema_update_by_hand():
    vd = make_vd(momentum=0.5, epsilon=0.1)
    vd.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    vd.ema_sum.copy_(vd.embedding)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # -> entries 0, 0, 1; entry 2 unused
    out = vd.train()(x)
    assert out.indices.tolist() == [0, 0, 1]
    # n = 0.5 * 1 + 0.5 * [2, 1, 0] = [1.5, 1.0, 0.5]
    torch.testing.assert_close(vd.ema_count, torch.tensor([1.5, 1.0, 0.5]))
    # s = 0.5 * e + 0.5 * sums: sums = [(1, 1), (9, 1), (0, 0)]
    torch.testing.assert_close(vd.ema_sum, torch.tensor([[0.5, 0.5], [9.5, 0.5], [0.0, 5.0]]))
    # Laplace: total = 3, n~ = (n + 0.1) / (3 + 0.3) * 3
    smoothed = [(1.5 + 0.1) / 3.3 * 3, (1.0 + 0.1) / 3.3 * 3, (0.5 + 0.1) / 3.3 * 3]
    expected = torch.tensor([[0.5 / smoothed[0], 0.5 / smoothed[0]],
                             [9.5 / smoothed[1], 0.5 / smoothed[1]],
                             [0.0, 5.0 / smoothed[2]]])
    torch.testing.assert_close(vd.embedding, expected)
    assert vd.num_updates.item() == 1


def test_straight_through_gradient_and_no_update_in_eval():
    vd = make_vd(size=8, dim=4)
    x = torch.randn(10, 4, requires_grad=True)
    weights = torch.randn(10, 4)
    out = vd.train()(x)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)  # d loss / d quantized, passed straight through
    assert not any(p.requires_grad for p in vd.parameters()) and vd.embedding.grad is None
    before = vd.embedding.clone()
    vd.eval()(torch.randn(10, 4))
    assert torch.equal(before, vd.embedding)


def test_quantized_values_are_the_pre_update_entries():
    vd = make_vd(size=8, dim=4)
    before = vd.embedding.clone()
    x = torch.randn(6, 4)
    out = vd.train()(x)
    torch.testing.assert_close(out.quantized, before[out.indices])


def test_masked_rows_do_not_update():
    a, b = make_vd(size=4, dim=3), make_vd(size=4, dim=3)
    x = torch.randn(6, 3)
    mask = torch.tensor([True, True, False, True, False, True])
    a.train()(x, mask)
    b.train()(x[mask])
    torch.testing.assert_close(a.embedding, b.embedding)
    torch.testing.assert_close(a.ema_count, b.ema_count)


def test_momentum_ramp():
    vd = make_vd(momentum=0.9, momentum_schedule="ramp", momentum_start=0.1, ramp_steps=4)
    values = []
    for _ in range(6):
        values.append(vd.current_momentum())
        vd.num_updates += 1
    assert values == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 0.9])


def test_data_init_and_dead_restart():
    vd = make_vd(size=4, dim=2, init="data")
    x = torch.tensor([[5.0, 5.0], [6.0, 6.0], [7.0, 7.0], [8.0, 8.0]])
    vd.train()(x)
    assert bool(vd.initialized)
    # Every entry was seeded from the batch, so all four points are found again exactly or nearby.
    assert set(vd.lookup(x).tolist()) == {0, 1, 2, 3}

    vd = make_vd(size=4, dim=2, restart_dead=True, restart_every=1, dead_threshold=0.5, momentum=0.1)
    far = torch.tensor([[100.0, 100.0]] * 8)
    vd.embedding.copy_(torch.tensor([[100.0, 100.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]))
    vd.ema_sum.copy_(vd.embedding)
    vd.train()(far)
    # Entries 1-3 got no features: their counts fell to 0.1 < 0.5 and they were re-seeded
    # from the batch; entry 0 kept its statistics.
    assert vd.ema_count[0] > 0.5
    torch.testing.assert_close(vd.embedding[1:], torch.full((3, 2), 100.0))
    torch.testing.assert_close(vd.ema_count[1:], torch.ones(3))


def test_usage_statistics():
    vd = make_vd(size=4, dim=2).eval()
    usage = vd.usage(torch.tensor([0, 0, 1, 1]))
    assert usage["perplexity"].item() == pytest.approx(2.0)
    assert usage["used_fraction"].item() == pytest.approx(0.5)
    assert usage["live_fraction"].item() == pytest.approx(1.0)


def test_bf16_autocast_keeps_fp32_buffers():
    vd = make_vd(size=8, dim=4).train()
    x = torch.randn(10, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vd(x)
    assert out.quantized.dtype == torch.bfloat16
    assert vd.embedding.dtype == vd.ema_sum.dtype == vd.ema_count.dtype == torch.float32


def test_state_dict_round_trip():
    vd = make_vd(size=8, dim=4).train()
    vd(torch.randn(20, 4))
    other = make_vd(size=8, dim=4)
    other.load_state_dict(vd.state_dict())
    x = torch.randn(30, 4)
    assert torch.equal(vd.lookup(x), other.lookup(x))
    assert other.num_updates.item() == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, batches, init, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    vd = make_vd(size=6, dim=3, init=init).train()
    for step_batches in batches:
        vd(step_batches[rank])
    torch.save(vd.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _run_two_ranks(tmp_path, batches, init):
    mp.spawn(_worker, args=(2, _free_port(), batches, init, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), f"ranks disagree on {key}"
    return states[0]


def test_two_processes_agree_with_one_on_the_concatenated_batch(tmp_path):
    generator = torch.Generator().manual_seed(1)
    # Different local batch sizes per rank, three updates.
    batches = [[torch.randn(5, 3, generator=generator), torch.randn(8, 3, generator=generator)] for _ in range(3)]
    distributed = _run_two_ranks(tmp_path, batches, "normal")
    single = make_vd(size=6, dim=3).train()
    for step_batches in batches:
        single(torch.cat(step_batches))
    for key in ("embedding", "ema_count", "ema_sum", "num_updates"):
        torch.testing.assert_close(single.state_dict()[key], distributed[key], atol=1e-6, rtol=1e-6)


def test_data_init_is_identical_across_ranks(tmp_path):
    generator = torch.Generator().manual_seed(2)
    batches = [[torch.randn(4, 3, generator=generator) + 50, torch.randn(9, 3, generator=generator) - 50]]
    state = _run_two_ranks(tmp_path, batches, "data")
    # Seeded from both ranks' features (far from the N(0, 1) init) before the EMA step.
    assert bool(state["initialized"]) and (state["embedding"].abs() > 20).all()
