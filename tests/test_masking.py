import torch

from soho.models.losses import IGNORE_INDEX
from soho.models.masking import keyed_uniform, mask_tokens, sample_mvm_mask, visible_entries

CLS, SEP, PAD, MASK = 2, 3, 0, 4


def make_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 100, (64, 20), generator=generator)
    ids[:, 0] = CLS
    lengths = torch.randint(5, 21, (64,), generator=generator)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = SEP
        ids[row, length:] = PAD
    maskable = (ids != CLS) & (ids != SEP) & (ids != PAD)
    return ids, maskable


def test_mlm_never_masks_special_or_padding_tokens():
    ids, maskable = make_batch()
    corrupted, labels = mask_tokens(ids, maskable, MASK, 100, probability=0.5,
                                    generator=torch.Generator().manual_seed(1), random_token_ids=range(10, 100))
    picked = labels != IGNORE_INDEX
    assert not picked[~maskable].any()
    torch.testing.assert_close(corrupted[~maskable], ids[~maskable])
    torch.testing.assert_close(labels[picked], ids[picked])
    # Unpicked tokens are untouched; random replacements never introduce special tokens.
    torch.testing.assert_close(corrupted[~picked], ids[~picked])
    assert ((corrupted >= 10) | (corrupted == MASK) | ~maskable).all()


def test_mlm_80_10_10_split():
    ids, maskable = make_batch()
    ids = ids.repeat(40, 1)
    maskable = maskable.repeat(40, 1)
    corrupted, labels = mask_tokens(ids, maskable, MASK, 100, probability=0.15,
                                    generator=torch.Generator().manual_seed(2))
    picked = labels != IGNORE_INDEX
    rate = picked.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.01
    as_mask = (corrupted[picked] == MASK).float().mean()
    kept = (corrupted[picked] == ids[picked]).float().mean()
    assert abs(as_mask - 0.8) < 0.02
    # Kept = the 10 % left alone plus random draws that hit the same token (1 %).
    assert abs(kept - 0.1) < 0.02


def test_mvm_masks_every_cell_sharing_the_sampled_entry():
    indices = torch.tensor([[[1, 2, 1], [3, 1, 2]],
                            [[5, 5, 6], [6, 5, 7]]])
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, 1, 2] = False
    valid[1, 1, 1] = False  # a padded cell with entry 5 must stay unmasked
    for seed in range(20):
        masked = sample_mvm_mask(indices, valid, probability=1.0, seeds=torch.tensor([seed, seed + 100]))
        for image in range(2):
            chosen = indices[image][masked[image]].unique()
            assert chosen.numel() == 1, "exactly one entry is masked per picked image"
            expected = (indices[image] == chosen) & valid[image]
            torch.testing.assert_close(masked[image], expected)


def test_mvm_probability_zero_and_empty_images():
    indices = torch.zeros(3, 2, 2, dtype=torch.long)
    valid = torch.ones(3, 2, 2, dtype=torch.bool)
    assert not sample_mvm_mask(indices, valid, 0.0, torch.arange(3)).any()
    valid[1] = False
    masked = sample_mvm_mask(indices, valid, 1.0, torch.arange(3))
    assert not masked[1].any() and masked[0].all() and masked[2].all()


def test_visible_entries_never_contain_a_masked_cells_entry():
    indices = torch.tensor([[[1, 2, 1], [3, 1, 2]],
                            [[5, 5, 6], [6, 5, 7]]])
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, 1, 2] = False  # entry 7 sits only in padding: not visible
    masked = torch.zeros(2, 2, 3, dtype=torch.bool)
    masked[0] = indices[0] == 1
    visible = visible_entries(indices, valid, masked, num_entries=8)
    assert visible[0].nonzero().flatten().tolist() == [2, 3]
    assert visible[1].nonzero().flatten().tolist() == [5, 6]
    for seed in range(10):
        masked = sample_mvm_mask(indices, valid, 1.0, torch.tensor([seed, seed + 100]))
        visible = visible_entries(indices, valid, masked, num_entries=8)
        for image in range(2):
            assert not visible[image, indices[image][masked[image]]].any()


def test_keyed_draws_are_uniform_and_depend_on_the_seed_alone():
    draws = keyed_uniform(torch.arange(2000), 50)
    assert draws.shape == (2000, 50) and draws.min() >= 0 and draws.max() < 1
    assert abs(draws.mean().item() - 0.5) < 0.01 and abs(draws.var().item() - 1 / 12) < 0.002
    # Neighbouring seeds and columns are not correlated.
    assert abs(torch.corrcoef(torch.stack([draws[:-1, 0], draws[1:, 0]]))[0, 1]) < 0.05
    assert abs(torch.corrcoef(torch.stack([draws[:, 0], draws[:, 1]]))[0, 1]) < 0.05
    # A row is the same whatever batch it sits in: splitting a batch over ranks draws the same.
    seeds = torch.tensor([7, -3, 1 << 61, 12])
    torch.testing.assert_close(keyed_uniform(seeds, 9)[2:], keyed_uniform(seeds[2:], 9))


def test_mvm_masks_of_an_image_do_not_depend_on_the_rest_of_the_batch():
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 5, (6, 4, 4), generator=generator)
    valid = torch.ones(6, 4, 4, dtype=torch.bool)
    seeds = torch.arange(6) * 1000
    whole = sample_mvm_mask(indices, valid, 0.5, seeds)
    halves = torch.cat([sample_mvm_mask(indices[:3], valid[:3], 0.5, seeds[:3]),
                        sample_mvm_mask(indices[3:], valid[3:], 0.5, seeds[3:])])
    assert torch.equal(whole, halves) and whole.any()


def test_rare_anchors_mask_every_entry_present_alike():
    # 15 background cells of entry 0 and one object cell of entry 7, in 4,000 images.
    indices = torch.zeros(4000, 4, 4, dtype=torch.long)
    indices[:, 0, 0] = 7
    valid = torch.ones(4000, 4, 4, dtype=torch.bool)
    seeds = torch.arange(4000)
    object_masked = {anchor: sample_mvm_mask(indices, valid, 1.0, seeds, anchor)[:, 0, 0].float().mean().item()
                     for anchor in ("uniform", "rare")}
    assert abs(object_masked["uniform"] - 1 / 16) < 0.015  # SOHO: one cell in 16
    assert abs(object_masked["rare"] - 1 / 2) < 0.03  # one entry in 2
    # Either way a whole entry is masked, and padding never is.
    valid[:, 3] = False
    masked = sample_mvm_mask(indices, valid, 1.0, seeds, "rare")
    assert not masked[:, 3].any() and ((masked.sum((1, 2)) == 1) | (masked.sum((1, 2)) == 11)).all()
