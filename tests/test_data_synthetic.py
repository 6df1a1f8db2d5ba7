"""Synthetic faces: determinism, coverage of the schema, captions and answers consistent with labels."""
import json
import random
from collections import defaultdict

import numpy as np
import pytest

from unif2ace.data import synthetic as syn

N_COVERAGE = 400


@pytest.fixture(scope="module")
def samples():
    return [syn.generate_sample(i, seed=3, resolution=32) for i in range(N_COVERAGE)]


def test_schema_shape():
    assert len(syn.SCHEMA) >= 20
    assert set(syn.FAMILIES.values()) == {"appearance", "emotion", "action"}
    assert all(len(v) >= 2 for v in syn.SCHEMA.values())
    assert set(syn.IDENTITY_ATTRIBUTES) < set(syn.SCHEMA)


def test_render_is_deterministic_and_seed_dependent():
    labels = syn.sample_attributes(random.Random(7))
    a = np.asarray(syn.render_face(labels, 64, seed=11))
    b = np.asarray(syn.render_face(labels, 64, seed=11))
    c = np.asarray(syn.render_face(labels, 64, seed=12))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    s1, s2 = syn.generate_sample(5, seed=1), syn.generate_sample(5, seed=1)
    assert np.array_equal(np.asarray(s1["image"]), np.asarray(s2["image"]))
    assert s1["caption"] == s2["caption"] and s1["vqa"] == s2["vqa"]


def test_render_any_resolution():
    labels = syn.sample_attributes(random.Random(0))
    for r in (32, 64, 300):
        assert syn.render_face(labels, r).size == (r, r)


@pytest.mark.parametrize("attr", ["glasses", "hat", "background", "hair_color", "mouth_action", "head_tilt"])
def test_attribute_changes_pixels(attr):
    """Changing one visible attribute changes the picture noticeably at 64 px."""
    labels = syn.sample_attributes(random.Random(1))
    labels.update(mask="no", glasses="none", hat="none", hair_length="short", hair_color="black",
                  hair_type="straight", emotion="neutral", mouth_action="closed")
    base = np.asarray(syn.render_face(labels, 64, seed=0)).astype(int)
    for v in syn.SCHEMA[attr]:
        if v == labels[attr] or (attr == "hair_color" and v == "none"):
            continue
        other = np.asarray(syn.render_face({**labels, attr: v}, 64, seed=0)).astype(int)
        assert np.abs(other - base).sum(-1).astype(bool).mean() > 0.004, (attr, v)


def test_every_value_appears(samples):
    seen = defaultdict(set)
    for s in samples:
        syn.validate_attributes(s["attributes"])
        for k, v in s["attributes"].items():
            seen[k].add(v)
    for k, values in syn.SCHEMA.items():
        assert seen[k] == set(values), (k, set(values) - seen[k])


def test_identity_fixes_stable_traits(samples):
    by_id = defaultdict(list)
    for s in samples:
        by_id[s["identity"]].append(s["attributes"])
    varied = False
    for renders in by_id.values():
        for a in syn.IDENTITY_ATTRIBUTES:
            assert len({r[a] for r in renders}) == 1
        varied |= len({tuple(sorted((k, r[k]) for k in r if k not in syn.IDENTITY_ATTRIBUTES)) for r in renders}) > 1
    assert varied


def _keyword_hits(attr, value, text):
    return [k for k in syn.CAPTION_KEYWORDS[attr][value] if k in text]


def test_captions_match_labels(samples):
    counts = []
    for s in samples:
        labels, cap = s["attributes"], s["caption"]
        _, mentions = syn.make_caption(labels, random.Random(len(cap)))  # a fresh caption for the same labels
        assert cap.count(".") >= 3  # several sentences
        counts.append(len(s["mentioned"]))
        assert not set(s["mentioned"]) & set(s["hidden"])
        for attr, phrase in mentions.items():
            true = _keyword_hits(attr, labels[attr], phrase)
            assert true, (attr, labels[attr], phrase)
            for other, kws in syn.CAPTION_KEYWORDS[attr].items():
                if other == labels[attr]:
                    continue
                for k in kws:  # a wrong value's keyword may only occur inside the right one ("no mask" ⊃ "mask")
                    assert k not in phrase or any(k in t for t in true), (attr, labels[attr], other, phrase)
    assert sum(counts) / len(counts) >= 12


def test_stored_caption_mentions_value_words(samples):
    """Each attribute recorded as mentioned has one of its value keywords in the stored caption."""
    for s in samples:
        for attr in s["mentioned"]:
            assert _keyword_hits(attr, s["attributes"][attr], s["caption"]), (attr, s["caption"])


def test_answers_match_labels(samples):
    for s in samples:
        L = s["attributes"]
        assert len(s["vqa"]) >= 6
        assert len({q["question"] for q in s["vqa"]}) == len(s["vqa"])
        for q in s["vqa"]:
            a, t = q["attribute"], q["type"]
            if t == "what":
                assert q["answer"] == syn.value_text(a, L[a]), q
                assert a not in s["hidden"]
            elif t == "yesno":
                expected = {
                    "Is the person wearing glasses?": L["glasses"] != "none",
                    "Is the person wearing a hat?": L["hat"] != "none",
                    "Is the person wearing earrings?": L["earrings"] == "yes",
                    "Is the person wearing a face mask?": L["mask"] == "yes",
                    "Does the person have bangs?": L["bangs"] == "yes",
                    "Does the person have a beard?": L["beard"] in ("goatee", "full"),
                    "Does the person have a mustache?": L["mustache"] == "yes",
                    "Does the person have sideburns?": L["sideburns"] == "yes",
                    "Is the person wearing lipstick?": L["lipstick"] != "none",
                    "Is the person bald?": L["hair_length"] == "bald",
                    "Does the person have freckles?": L["skin_texture"] == "freckles",
                    "Is the person smiling?": L["mouth_action"] in ("smile", "laugh"),
                    "Is the person winking?": L["eye_action"] == "wink",
                    "Is the person's mouth open?": L["mouth_action"] in ("laugh", "open_mouth"),
                }[q["question"]]
                assert q["answer"] == ("yes" if expected else "no"), q
            elif t == "count":
                n = {"accessories": syn.count_accessories(L), "earrings": 2 * (L["earrings"] == "yes"),
                     "eye_action": {"wink": 1, "closed": 2}.get(L["eye_action"], 0)}[a]
                assert q["answer"] == syn.NUMBER_WORDS[n]
            else:
                assert t == "describe"
                if q["question"] == "Describe the hair.":
                    if L["hair_length"] == "bald":
                        assert q["answer"] == "bald"
                    else:
                        assert L["hair_color"] in q["answer"] and L["hair_type"] in q["answer"]
                else:
                    assert (q["answer"] == "none") == (syn.count_accessories(L) == 0)


def test_bad_inputs():
    labels = syn.sample_attributes(random.Random(0))
    with pytest.raises(ValueError, match="unknown attribute"):
        syn.render_face({**labels, "tattoo": "yes"})
    with pytest.raises(ValueError, match="unknown value"):
        syn.render_face({**labels, "hat": "crown"})
    with pytest.raises(ValueError, match="missing"):
        syn.make_caption({k: v for k, v in labels.items() if k != "hat"}, random.Random(0))
    with pytest.raises(ValueError, match="resolution"):
        syn.render_face(labels, 4)


def test_write_dataset(tmp_path):
    index = syn.write_synthetic_dataset(str(tmp_path), 40, resolution=32, seed=1, images_per_identity=4, progress=False)
    records = [json.loads(line) for line in open(index)]
    assert len(records) == 40
    schema = json.load(open(tmp_path / "schema.json"))
    assert list(schema["attributes"]) == list(syn.SCHEMA)
    split_of = {}
    for r in records:
        assert (tmp_path / r["image"]).is_file()
        assert split_of.setdefault(r["identity"], r["split"]) == r["split"]  # identities never cross splits
        assert set(r) >= {"image", "identity", "split", "caption", "vqa", "attributes"}
    assert set(split_of.values()) == {"train", "validation", "test"}
    # same seed -> same files
    syn.write_synthetic_dataset(str(tmp_path / "again"), 40, resolution=32, seed=1, progress=False)
    assert open(tmp_path / "again" / "index.jsonl").read() == open(index).read()


def test_cli(tmp_path, capsys):
    syn.main([str(tmp_path), "--num-images", "3", "--resolution", "16", "--quiet"])
    assert capsys.readouterr().out.strip().endswith("index.jsonl")
    assert len(open(tmp_path / "index.jsonl").readlines()) == 3
