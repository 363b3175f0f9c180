import json
import zipfile

import pytest
from convert_fixtures import read_split, write_corrupt_image, write_image

from soho.cli.convert_flickr30k_entities import main
from soho.data.convert import WriteOptions, convert
from soho.data.convert.flickr30k_entities import flickr30k_entities_conversion, parse_annotation, parse_sentence
from soho.data.samples import decode_captioned_image

# The first image of the official README's example, cut down to fit a 48 x 32 test image.
SENTENCES = "".join(line + "\n" for line in (
    "[/EN#1/people Two young guys] with [/EN#2/bodyparts shaggy hair] look at [/EN#3/bodyparts their hands] "
    "while hanging out in [/EN#8/scene the yard] .",
    "[/EN#1/people Two young , White males] are outside near [/EN#4/scene many bushes] .",
    "[/EN#1/people Two men] in [/EN#5/clothing green shirts] are standing in [/EN#9/scene a yard] .",
    "[/EN#6/people A man] in [/EN#7/clothing/other a blue shirt] standing in [/EN#9/scene a garden] .",
    "[/EN#1/people Two friends] enjoy [/EN#10/other time] spent together .",
))

ANNOTATION = """<annotation>
\t<filename>{image_id}.jpg</filename>
\t<size>
\t\t<width>48</width>
\t\t<height>32</height>
\t\t<depth>3</depth>
\t</size>
\t<object>
\t\t<name>1</name>
\t\t<bndbox>
\t\t\t<xmin>5</xmin>
\t\t\t<ymin>3</ymin>
\t\t\t<xmax>20</xmax>
\t\t\t<ymax>30</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>4</name>
\t\t<bndbox>
\t\t\t<xmin>1</xmin>
\t\t\t<ymin>1</ymin>
\t\t\t<xmax>48</xmax>
\t\t\t<ymax>32</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>1</name>
\t\t<name>6</name>
\t\t<bndbox>
\t\t\t<xmin>25</xmin>
\t\t\t<ymin>9</ymin>
\t\t\t<xmax>40</xmax>
\t\t\t<ymax>28</ymax>
\t\t</bndbox>
\t</object>
\t<object>
\t\t<name>8</name>
\t\t<name>9</name>
\t\t<scene>1</scene>
\t\t<nobndbox>0</nobndbox>
\t</object>
\t<object>
\t\t<name>10</name>
\t\t<scene>0</scene>
\t\t<nobndbox>1</nobndbox>
\t</object>
</annotation>
"""

NOTVISUAL = "[/EN#0/notvisual Someone] watches [/EN#3/people a woman] .\n"

# split -> [(image id, image file, Sentences text or None for no annotation files)]
PLAN = {
    "train": [("1000092795", "ok", SENTENCES), ("10002456", "ok", SENTENCES),
              ("1000268201", "missing", SENTENCES), ("1000344755", "corrupt", SENTENCES),
              ("1000366164", "ok", None)],
    "val": [("1007129816", "ok", NOTVISUAL * 5)],
    "test": [("1009434119", "ok", SENTENCES), ("101362133", "ok", "[/EN#4/people A man in a hat .\n")],
}
EXPECTED_PROBLEMS = [("entities_test", "101362133", "bad_record"),
                     ("entities_train", "1000268201", "missing_image"),
                     ("entities_train", "1000344755", "corrupt_image"),
                     ("entities_train", "1000366164", "missing_annotation")]


@pytest.fixture
def entities(tmp_path):
    """A flickr30k_entities checkout (split lists, UNRELATED_CAPTIONS, annotations.zip) and flickr30k-images/."""
    root, images = tmp_path / "flickr30k_entities", tmp_path / "flickr30k-images"
    root.mkdir()
    with zipfile.ZipFile(root / "annotations.zip", "w") as archive:
        for split, items in PLAN.items():
            (root / f"{split}.txt").write_text("".join(f"{image_id}\n" for image_id, _, _ in items))
            for seed, (image_id, kind, sentences) in enumerate(items):
                if kind == "ok":
                    write_image(images / f"{image_id}.jpg", 48, 32, seed=seed)
                elif kind == "corrupt":
                    write_corrupt_image(images / f"{image_id}.jpg")
                if sentences is not None:
                    archive.writestr(f"Sentences/{image_id}.txt", sentences)
                    archive.writestr(f"Annotations/{image_id}.xml", ANNOTATION.format(image_id=image_id))
    (root / "UNRELATED_CAPTIONS").write_text("# format: <imageID> <sentence number>\n1000092795 5\n10002456 2\n")
    return root, images


def decoded_split(root, split):
    return {record["image_id"]: (record, captions, image)
            for record, captions, image in map(decode_captioned_image, read_split(root, split))}


def test_parse_sentence_gives_the_official_words_and_positions():
    caption, phrases = parse_sentence(SENTENCES.splitlines()[0])
    assert caption == "Two young guys with shaggy hair look at their hands while hanging out in the yard ."
    assert [(p["first_word"], p["text"], p["entity_id"], p["types"]) for p in phrases] == [
        (0, "Two young guys", "1", ["people"]), (4, "shaggy hair", "2", ["bodyparts"]),
        (8, "their hands", "3", ["bodyparts"]), (14, "the yard", "8", ["scene"])]
    words = caption.split()
    assert all(words[p["first_word"]:p["first_word"] + len(p["text"].split())] == p["text"].split() for p in phrases)
    _, phrases = parse_sentence(SENTENCES.splitlines()[3])
    assert phrases[1] == {"first_word": 3, "text": "a blue shirt", "entity_id": "7", "types": ["clothing", "other"]}


def test_parse_annotation_boxes_names_and_flags():
    entities = parse_annotation(ANNOTATION.format(image_id="1").encode())
    assert entities["1"] == {"boxes": [{"box": [4, 2, 20, 30]}, {"box": [24, 8, 40, 28]}], "scene": False,
                             "no_box": False}
    assert entities["6"]["boxes"] == [{"box": [24, 8, 40, 28]}]  # the second <name> of a shared box
    assert entities["4"]["boxes"] == [{"box": [0, 0, 48, 32]}]  # the whole image in pixel edges
    assert entities["8"] == entities["9"] == {"boxes": [], "scene": True, "no_box": False}
    assert entities["10"] == {"boxes": [], "scene": False, "no_box": True}


def test_conversion_counts_problems_records_and_box_rescaling(entities, tmp_path):
    manifest = convert(flickr30k_entities_conversion(*entities), tmp_path / "out", shard_size=2,
                       options=WriteOptions(max_short_side=16))
    assert {split: entry["samples"] for split, entry in manifest["splits"].items()} == {
        "entities_train": 2, "entities_val": 1, "entities_test": 1}
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == EXPECTED_PROBLEMS
    assert "Sentences/1000366164.txt is not in" in " ".join(p["detail"] for p in manifest["problems"])
    assert manifest["inputs"]["ids"] == {"entities_train": 5, "entities_val": 1, "entities_test": 2}

    train = decoded_split(tmp_path / "out", "entities_train")
    record, captions, image = train["1000092795"]
    assert image.size == (record["width"], record["height"]) == (24, 16)  # resized by 1/2 ...
    assert record["entities"]["1"]["boxes"] == [{"box": [2.0, 1.0, 10.0, 15.0]}, {"box": [12.0, 4.0, 20.0, 14.0]}]
    assert record["entities"]["4"]["boxes"] == [{"box": [0.0, 0.0, 24.0, 16.0]}]  # ... and so are the boxes
    assert captions[1] == "Two young , White males are outside near many bushes ."
    assert record["phrases"][4] == {"caption": 1, "first_word": 0, "text": "Two young , White males",
                                    "entity_id": "1", "types": ["people"]}
    assert len(record["phrases"]) == 14 and {p["caption"] for p in record["phrases"]} == set(range(5))
    # Chains named only in the sentences are entities too, with nothing annotated.
    assert record["entities"]["5"] == {"boxes": [], "scene": False, "no_box": False}
    assert set(record["entities"]) == {str(i) for i in range(1, 11)}
    assert record["unrelated_captions"] == [4] and train["10002456"][0]["unrelated_captions"] == [1]
    assert record["source"] == "flickr30k_entities"

    (record, captions, _), = decoded_split(tmp_path / "out", "entities_val").values()
    assert captions == ["Someone watches a woman ."] * 5
    assert record["phrases"][0]["entity_id"] == "0" and record["phrases"][0]["types"] == ["notvisual"]
    assert "0" not in record["entities"] and record["unrelated_captions"] == []


def test_command_line_on_extracted_folders(entities, tmp_path, capsys):
    root, images = entities
    with zipfile.ZipFile(root / "annotations.zip") as archive:
        archive.extractall(root)
    (root / "annotations.zip").unlink()
    out = tmp_path / "out"
    main(
        ["--entities", str(root), "--images", str(images), "--out", str(out), "--workers", "2"])
    assert "entities_train" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted((p["split"], p["key"], p["reason"]) for p in manifest["problems"]) == EXPECTED_PROBLEMS
    record, _, image = decoded_split(out, "entities_test")["1009434119"]
    assert image.size == (48, 32) and record["entities"]["1"]["boxes"][0] == {"box": [4, 2, 20, 30]}


def test_missing_inputs_fail_before_any_work(entities, tmp_path):
    root, images = entities
    with pytest.raises(NotADirectoryError, match="nowhere"):
        flickr30k_entities_conversion(root, tmp_path / "nowhere")
    (root / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        flickr30k_entities_conversion(root, images)
    assert flickr30k_entities_conversion(root, images, splits=["entities_test"]).tasks == {
        "entities_test": "phrase_grounding"}
    (root / "annotations.zip").unlink()
    with pytest.raises(FileNotFoundError, match="annotations.zip"):
        flickr30k_entities_conversion(root, images, splits=["entities_test"])
