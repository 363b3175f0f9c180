import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soho.models import visual_dictionary as vd_module
from soho.models.config import VisualDictionaryConfig
from soho.models.visual_dictionary import VisualDictionary

SENTINEL = 1000.0  # value of padded rows: any leak into the dictionary would be obvious


def make_vd(size=3, dim=2, **config):
    torch.manual_seed(0)
    return VisualDictionary(VisualDictionaryConfig(size=size, **config), dim)


def rows_in(rows, pool):
    """Whether every row of ``rows`` is (exactly) a row of ``pool``."""
    return bool((rows[:, None, :] == pool[None, :, :]).all(-1).any(1).all())


def test_lookup_equals_brute_force(monkeypatch):
    vd = make_vd(size=50, dim=16)
    x = torch.randn(300, 16)
    expected = torch.cdist(x, vd.embedding).argmin(1)
    assert torch.equal(vd.lookup(x), expected)
    monkeypatch.setattr(vd_module, "_LOOKUP_CHUNK_ELEMENTS", 7 * 50)  # 7 rows per chunk
    assert torch.equal(vd.lookup(x), expected)


def test_one_ema_update_by_hand():
    vd = make_vd(size=3, dim=2, momentum=0.5, epsilon=0.1)
    vd.embedding.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    vd.ema_sum.copy_(vd.embedding)  # ema_count starts at 1
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # -> entries 0, 0, 1; entry 2 unused
    out = vd.train()(x)
    assert out.indices.tolist() == [0, 0, 1]
    # counts = [2, 1, 0]; n = 0.5 * 1 + 0.5 * counts
    n = [1.5, 1.0, 0.5]
    torch.testing.assert_close(vd.ema_count, torch.tensor(n))
    # sums = [(1, 1), (9, 1), (0, 0)]; s = 0.5 * old sum (= old entry) + 0.5 * sums
    s = [[0.0 + 0.5, 0.0 + 0.5], [5.0 + 4.5, 0.0 + 0.5], [0.0, 5.0]]
    torch.testing.assert_close(vd.ema_sum, torch.tensor(s))
    # Laplace: total = 3, K * eps = 0.3, n~ = (n + 0.1) / 3.3 * 3
    smoothed = [(1.5 + 0.1) / 3.3 * 3, (1.0 + 0.1) / 3.3 * 3, (0.5 + 0.1) / 3.3 * 3]
    expected = [[s[k][0] / smoothed[k], s[k][1] / smoothed[k]] for k in range(3)]
    torch.testing.assert_close(vd.embedding, torch.tensor(expected))
    assert vd.num_updates.item() == 1
    assert vd.usage(out.indices)["used_fraction"].item() == pytest.approx(2 / 3)


def test_unused_entries_keep_their_value():
    # The release would send entry 1 to the origin; here its sum and count decay together.
    vd = make_vd(size=2, dim=2, momentum=0.4)
    vd.embedding.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0]]))
    vd.ema_sum.copy_(vd.embedding)
    for _ in range(3):
        vd.train()(torch.randn(8, 2))
    torch.testing.assert_close(vd.embedding[1], torch.tensor([50.0, 50.0]), rtol=1e-3, atol=0)


def test_straight_through_gradient_and_no_update_in_eval():
    vd = make_vd(size=8, dim=4)
    x = torch.randn(10, 4, requires_grad=True)
    weights = torch.randn(10, 4)
    out = vd.train()(x)
    (out.quantized * weights).sum().backward()
    torch.testing.assert_close(x.grad, weights)  # d loss / d quantized, passed straight through
    assert list(vd.parameters()) == [] and vd.embedding.grad is None

    state = {k: v.clone() for k, v in vd.state_dict().items()}
    vd.eval()(torch.randn(10, 4))
    for key, value in vd.state_dict().items():
        assert torch.equal(state[key], value), key


def test_quantized_values_are_the_pre_update_entries():
    vd = make_vd(size=8, dim=4)
    before = vd.embedding.clone()
    out = vd.train()(torch.randn(6, 4))
    assert torch.equal(out.quantized, before[out.indices])
    assert not torch.equal(vd.embedding, before)


def test_masked_rows_do_not_update():
    a, b = make_vd(size=4, dim=3), make_vd(size=4, dim=3)
    x = torch.randn(6, 3)
    mask = torch.tensor([True, True, False, True, False, True])
    x[~mask] = SENTINEL
    out = a.train()(x, mask)
    b.train()(x[mask])
    for key in ("embedding", "ema_count", "ema_sum"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key))
    assert out.indices.shape == (6,)  # padded rows are still quantised, just not counted


def test_a_non_finite_batch_leaves_the_dictionary_as_it_was():
    vd = make_vd(size=4, dim=3, init="data").train()
    vd(torch.randn(8, 3))
    before = {name: buffer.clone() for name, buffer in vd.named_buffers()}
    features = torch.randn(8, 3)
    features[2, 1] = float("nan")
    vd(features)
    for name, buffer in vd.named_buffers():
        assert torch.equal(buffer, before[name]), name
    # Seeding from data takes finite features only.
    fresh = make_vd(size=2, dim=3, init="data").train()
    features[5] = float("inf")
    fresh(features)
    assert fresh.initialized.item() and torch.isfinite(fresh.embedding).all()


def test_momentum_ramp():
    vd = make_vd(momentum=0.9, momentum_schedule="ramp", momentum_start=0.1, ramp_steps=4)
    values = []
    for _ in range(6):
        values.append(vd.current_momentum())
        vd.train()(torch.randn(3, 2))
    assert values == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 0.9])
    assert make_vd(momentum=0.7).current_momentum() == 0.7


def test_data_init_seeds_from_valid_features_only():
    vd = make_vd(size=4, dim=2, init="data")
    assert not vd.initialized
    vd.eval()(torch.randn(5, 2))
    assert not vd.initialized  # only training seeds

    x = torch.tensor([[5.0, 5.0], [6.0, 6.0], [SENTINEL, 0.0], [7.0, 7.0], [8.0, 8.0]])
    mask = torch.tensor([True, True, False, True, True])
    out = vd.train()(x, mask)
    assert vd.initialized
    # The four valid features became the four entries (in some order) before the lookup.
    assert sorted(out.indices[mask].tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(out.quantized[mask], x[mask])


def test_dead_entries_are_restarted_from_current_features():
    vd = make_vd(size=4, dim=2, restart_dead=True, restart_every=2, dead_threshold=0.5, momentum=0.4)
    vd.embedding.copy_(torch.tensor([[100.0, 100.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]))
    vd.ema_sum.copy_(vd.embedding)
    far = torch.tensor([[100.0, 100.0], [101.0, 100.0], [100.0, 101.0], [101.0, 101.0]])
    vd.train()(far)
    # Entries 1-3 are dead after one update (count 0.4 < 0.5) but restarts run every 2nd.
    torch.testing.assert_close(vd.ema_count[1:], torch.full((3,), 0.4))
    vd.train()(far)
    # Second update: entries 1-3 (count 0.16) were re-seeded with distinct batch features,
    # weighing like one feature; entry 0 kept its statistics.
    assert vd.ema_count[0].item() == pytest.approx(0.4 * (0.4 + 0.6 * 4) + 0.6 * 4)
    assert rows_in(vd.embedding[1:], far) and len({tuple(r) for r in vd.embedding[1:].tolist()}) == 3
    torch.testing.assert_close(vd.ema_count[1:], torch.ones(3))
    torch.testing.assert_close(vd.ema_sum[1:], vd.embedding[1:])


def test_usage_statistics():
    vd = make_vd(size=4, dim=2).eval()
    usage = vd.usage(torch.tensor([0, 0, 1, 1, 3]), torch.tensor([True, True, True, True, False]))
    # p = (1/2, 1/2, 0, 0): H = log 2, perplexity 2; 2 of 4 entries used; all counts are 1 >= 1e-3
    assert usage["perplexity"].item() == pytest.approx(2.0)
    assert usage["used_fraction"].item() == pytest.approx(0.5)
    assert usage["live_fraction"].item() == pytest.approx(1.0)
    vd.ema_count[3] = 0.0
    assert vd.usage(torch.tensor([0, 1, 2, 3]))["perplexity"].item() == pytest.approx(4.0)
    assert vd.usage(torch.tensor([0]))["live_fraction"].item() == pytest.approx(0.75)


def test_bf16_autocast_keeps_fp32_buffers_and_math():
    vd = make_vd(size=8, dim=4).train()
    reference = make_vd(size=8, dim=4).train()
    x = torch.randn(10, 4).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vd(x)
    assert out.quantized.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in (vd.embedding, vd.ema_sum, vd.ema_count))
    assert torch.equal(out.quantized, reference.embedding[out.indices].bfloat16())
    out.quantized.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, torch.ones_like(x.grad))
    # Same update as fp32 arithmetic on the upcast features.
    reference(x.detach().float())
    torch.testing.assert_close(vd.embedding, reference.embedding)


def test_state_dict_round_trip():
    vd = make_vd(size=8, dim=4, init="data").train()
    vd(torch.randn(20, 4))
    other = make_vd(size=8, dim=4, init="data")
    other.load_state_dict(vd.state_dict())
    assert set(vd.state_dict()) == {"embedding", "ema_count", "ema_sum", "num_updates", "initialized"}
    x = torch.randn(30, 4)
    assert torch.equal(vd.lookup(x), other.lookup(x))
    assert other.num_updates.item() == 1 and other.initialized


def test_shape_errors():
    vd = make_vd(size=4, dim=3)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        vd(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="mask"):
        vd(torch.randn(5, 3), torch.ones(4, dtype=torch.bool))


# Two gloo processes. Each scenario is (config, steps); a step holds one (features, mask)
# per rank. Padded rows hold SENTINEL values so any leak into the dictionary shows.

def _batch(generator, rows, padded=0, shift=0.0, scale=1.0, dim=3):
    x = torch.randn(rows + padded, dim, generator=generator) * scale + shift
    mask = torch.arange(rows + padded) < rows
    x[~mask] = SENTINEL
    return x, mask


def _scenarios():
    g = torch.Generator().manual_seed(1)
    return {
        # Plain EMA with a momentum ramp, unequal local batches and padding.
        "ema": ({"momentum_schedule": "ramp", "momentum_start": 0.2, "momentum": 0.6, "ramp_steps": 2},
                [[_batch(g, 5), _batch(g, 6, padded=2)] for _ in range(3)]),
        # Data init from both ranks' valid features, then EMA.
        "data": ({"init": "data"},
                 [[_batch(g, 6, padded=1, shift=5.0), _batch(g, 7, padded=2, shift=-5.0)] for _ in range(3)]),
        # Data init with rank 1 entirely padded, then a restart of dead entries from a far cluster.
        "restart": ({"init": "data", "restart_dead": True, "restart_every": 2, "dead_threshold": 5.0,
                     "momentum": 0.4},
                    [[_batch(g, 6), _batch(g, 0, padded=4)],
                     [_batch(g, 6, shift=100.0, scale=0.1), _batch(g, 8, shift=100.0, scale=0.1)]]),
    }


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = {}
    for name, (config, steps) in _scenarios().items():
        vd = make_vd(size=6, dim=3, **config).train()
        torch.manual_seed(100 + rank)  # ranks draw different local samples, as they would in training
        outputs = []
        for step in steps:
            out = vd(*step[rank])
            outputs.append({"indices": out.indices, "quantized": out.quantized.detach(),
                            "usage": vd.usage(out.indices, step[rank][1])})
        results[name] = {"state": vd.state_dict(), "outputs": outputs}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _single_process(config, steps, embedding=None):
    """Reference: one process updating on the concatenated valid rows of every step."""
    vd = make_vd(size=6, dim=3, **config).train()
    if embedding is not None:
        vd.embedding.copy_(embedding)
        vd.ema_sum.copy_(embedding)
    for step in steps:
        out = vd(torch.cat([x[m] for x, m in step]))
    return vd, out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vd_dist")
    mp.spawn(_worker, args=(2, str(tmp / "pg_init"), str(tmp)), nprocs=2, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["ema", "data", "restart"])
def test_ranks_hold_identical_dictionaries(two_ranks, scenario):
    (a, b) = (two_ranks[r][scenario] for r in range(2))
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), f"ranks disagree on {key}"
    for key in a["outputs"][-1]["usage"]:
        assert torch.equal(a["outputs"][-1]["usage"][key], b["outputs"][-1]["usage"][key])
    assert a["state"]["initialized"] and a["state"]["num_updates"].item() == len(_scenarios()[scenario][1])
    assert (a["state"]["embedding"].abs() < SENTINEL / 2).all()


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks):
    config, steps = _scenarios()["ema"]
    single, out = _single_process(config, steps)
    state = two_ranks[0]["ema"]["state"]
    for key in ("embedding", "ema_count", "ema_sum", "num_updates"):
        torch.testing.assert_close(state[key], getattr(single, key), atol=1e-6, rtol=1e-6)
    usage = single.usage(out.indices)
    for key, value in two_ranks[0]["ema"]["outputs"][-1]["usage"].items():
        torch.testing.assert_close(value, usage[key])


@pytest.mark.slow
def test_data_init_across_ranks(two_ranks):
    config, steps = _scenarios()["data"]
    first = [two_ranks[r]["data"]["outputs"][0] for r in range(2)]
    indices = torch.cat([o["indices"] for o in first])
    quantized = torch.cat([o["quantized"] for o in first])
    # Every seeded entry is its source feature's nearest entry, so step 1 shows all of them.
    assert sorted(set(indices.tolist())) == list(range(6))
    seeded = torch.stack([quantized[indices == k][0] for k in range(6)])
    valid = torch.cat([x[m] for x, m in steps[0]])
    assert rows_in(seeded, valid) and len({tuple(r) for r in seeded.tolist()}) == 6
    assert (seeded[:, 0] > 0).any() and (seeded[:, 0] < 0).any()  # drawn from both ranks

    # From the seeded entries on, the updates match one process on the concatenated batch.
    single, _ = _single_process({k: v for k, v in config.items() if k != "init"}, steps, seeded)
    state = two_ranks[0]["data"]["state"]
    for key in ("embedding", "ema_count", "ema_sum"):
        torch.testing.assert_close(state[key], getattr(single, key), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_restart_across_ranks_with_an_empty_rank(two_ranks):
    _, steps = _scenarios()["restart"]
    first = two_ranks[0]["restart"]["outputs"][0]
    # Rank 1 had no valid rows: the 6 entries are exactly rank 0's 6 features.
    x0, _ = steps[0][0]
    assert sorted(first["indices"].tolist()) == list(range(6))
    torch.testing.assert_close(first["quantized"], x0)

    state = two_ranks[0]["restart"]["state"]
    far = torch.cat([x[m] for x, m in steps[1]])
    # All 14 far features went to one entry (count >= 0.6 * 14 > 5); the other five fell
    # below the threshold and were re-seeded with distinct far features.
    hot = state["ema_count"].argmax()
    restarted = torch.arange(6) != hot
    assert state["ema_count"][hot] > 5.0
    torch.testing.assert_close(state["ema_count"][restarted], torch.ones(5))
    assert rows_in(state["embedding"][restarted], far)
    assert len({tuple(r) for r in state["embedding"][restarted].tolist()}) == 5
