import torch
from conftest import tiny_batch, tiny_config

from soho.analysis.dictionary import dictionary_report, entry_geometry
from soho.models import SohoForPretraining


def test_entry_geometry_by_hand():
    entries = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    geometry = entry_geometry(entries)
    # Entries 0 and 1 point the same way (cosine 1) but lie 1 apart; entry 2 is orthogonal to both.
    assert geometry["neighbour_cosine_p90"] == torch.tensor(1.0).item()
    assert geometry["neighbour_distance_p10"] == torch.tensor(1.0).item()


def test_dictionary_report_on_a_tiny_model():
    torch.manual_seed(0)
    model = SohoForPretraining(tiny_config(**{"mvm.score": "classifier"}))
    model.train()(**tiny_batch())  # seeds the dictionary from data
    batches = [tiny_batch(seed=s) for s in range(2)]
    for batch in batches:
        batch["pixel_mask"][:] = 1
    before = model.soho.visual_dictionary.embedding.clone()
    report = dictionary_report(model, batches, reference=model)
    assert torch.equal(before, model.soho.visual_dictionary.embedding), "measuring must not update the dictionary"
    assert report["reference_agreement"] == 1.0
    assert report["cells"] == 2 * 4 * 16 and report["masked_cells"] > 0
    for key in ("train_vs_eval_batchnorm_agreement", "mvm_accuracy", "mvm_accuracy_excluding_visible",
                "chance_commonest_entry", "chance_commonest_hidden_entry", "used_fraction"):
        assert 0.0 <= report[key] <= 1.0, key
    # Ruling out entries that cannot be the answer never hurts.
    assert report["mvm_accuracy_excluding_visible"] >= report["mvm_accuracy"]
    assert 1.0 <= report["perplexity"] <= model.soho.visual_dictionary.size
