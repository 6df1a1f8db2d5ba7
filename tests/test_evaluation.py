"""The evaluation's judge (attribute classifier): its cache in the output folder is keyed by its settings, code and
training data, and says when it is reused; per-attribute helpers count what they claim."""
import pytest
import torch

from unif2ace.evaluation import (ATTRIBUTES, SCHEMA, cached_classifier, classifier_key, per_attribute_accuracy,
                                 vqa_breakdown)


def tiny_set(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
    labels = torch.stack([torch.randint(0, len(SCHEMA[a]), (n,), generator=g) for a in ATTRIBUTES], dim=1)
    labels[0, 3] = -100  # one hidden attribute
    return images, labels


SETTINGS = dict(steps=3, batch_size=8, lr=1e-3, width=4, shift=1, seed=0)


def test_cached_judge_is_reused_only_under_the_same_key(tmp_path):
    images, labels = tiny_set()
    path = str(tmp_path / "attribute_classifier.pt")
    lines = []
    first = cached_classifier(path, images, labels, SETTINGS, progress=False, log=lines.append)
    assert lines == []  # nothing cached yet: trained quietly (the progress bar is off)
    again = cached_classifier(path, images, labels, SETTINGS, progress=False, log=lines.append)
    assert len(lines) == 1 and "reusing" in lines[0]
    for p, q in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)

    # other settings: retrained, and the message names the setting that changed
    lines.clear()
    other = cached_classifier(path, images, labels, dict(SETTINGS, steps=4), progress=False, log=lines.append)
    assert len(lines) == 1 and "retraining" in lines[0] and "steps 3 → 4" in lines[0]
    assert not all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), other.state_dict().values()))

    # other training data (one pixel, or one label), same settings: retrained
    for changed_images, changed_labels in ((images.clone().index_fill_(0, torch.tensor([5]), 0.0), labels),
                                           (images, labels.clone().index_fill_(0, torch.tensor([2]), 0))):
        lines.clear()
        cached_classifier(path, changed_images, changed_labels, dict(SETTINGS, steps=4), progress=False,
                          log=lines.append)
        assert len(lines) == 1 and "retraining" in lines[0] and "data changed" in lines[0], lines


def test_classifier_key_depends_on_settings_and_data_only():
    images, labels = tiny_set()
    k = classifier_key(images, labels, SETTINGS)
    assert k == classifier_key(images.clone(), labels.clone(), dict(SETTINGS))
    assert k != classifier_key(images, labels, dict(SETTINGS, width=8))
    assert k != classifier_key(tiny_set(seed=1)[0], labels, SETTINGS)


def test_per_attribute_accuracy_skips_hidden_entries():
    labels = torch.zeros(4, len(ATTRIBUTES), dtype=torch.long)
    labels[0, 0] = -100
    preds = torch.zeros_like(labels)
    preds[1, 0] = 1
    acc = per_attribute_accuracy(preds, labels)
    assert acc[ATTRIBUTES[0]][0] == pytest.approx(2 / 3) and acc[ATTRIBUTES[0]][1] == 3  # rows 1..3 visible, 1 wrong
    assert acc[ATTRIBUTES[1]] == (1.0, 4)


def test_vqa_breakdown_counts_hits_and_the_majority_answer():
    train = [{"vqa": [{"question": "Q1", "answer": "yes", "type": "yesno", "attribute": "mask"}]},
             {"vqa": [{"question": "Q1", "answer": "yes", "type": "yesno", "attribute": "mask"}]},
             {"vqa": [{"question": "Q1", "answer": "no", "type": "yesno", "attribute": "mask"}]}]
    items = [{"question": "Q1", "answer": "no", "type": "yesno", "attribute": "mask"},
             {"question": "Q1", "answer": "yes", "type": "yesno", "attribute": "mask"},
             {"question": "Q2", "answer": "blue", "type": "what", "attribute": "background"}]
    out = vqa_breakdown(train, items, [True, False, True], "type")
    assert out == {"what": {"accuracy": 1.0, "majority_per_question": 0.0, "count": 1},
                   "yesno": {"accuracy": 0.5, "majority_per_question": 0.5, "count": 2}}
