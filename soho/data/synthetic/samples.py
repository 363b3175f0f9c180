"""Samples: the records and images made from one drawn image (or image pair, for NLVR2)."""
from __future__ import annotations

import zlib
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from soho.data.convert.writer import EncodedImage, Sample
from soho.data.synthetic.captions import captions_for
from soho.data.synthetic.config import SyntheticWorldConfig, split_task
from soho.data.synthetic.logic import answer, claim_to_json
from soho.data.synthetic.nlvr2 import nlvr2_statement
from soho.data.synthetic.render import encode_image, render
from soho.data.synthetic.scenes import sample_scene
from soho.data.synthetic.ve import ve_hypothesis
from soho.data.synthetic.vocabulary import VE_LABELS
from soho.data.synthetic.vqa import annotator_answers, vqa_question


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # Each split has its own stream, so image pools of different splits are disjoint.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _draw(config: SyntheticWorldConfig, rng: np.random.Generator) -> Tuple[Dict, EncodedImage]:
    scene = sample_scene(rng, config)
    return scene, EncodedImage(encode_image(render(scene, rng, config.supersample), config.image_format),
                               config.image_format)


def _nlvr2_group(config: SyntheticWorldConfig, rng: np.random.Generator, image_id: str) -> List[Tuple[Sample, Any]]:
    (left, left_image), (right, right_image) = _draw(config, rng), _draw(config, rng)
    out = []
    for j, label in enumerate(rng.permutation([True, False]).tolist()):
        sentence, claim = nlvr2_statement(left, right, rng, label)
        identifier = f"{image_id}-{j}"
        record = {"identifier": identifier, "sentence": sentence, "label": label, "left_id": f"{image_id}-left",
                  "right_id": f"{image_id}-right", "source": "synthetic",
                  "scene_graphs": {"left": left, "right": right}}
        out.append((Sample(identifier, record, {"left": left_image, "right": right_image}), claim))
    return out


def _ve_group(config: SyntheticWorldConfig, rng: np.random.Generator, image_id: str) -> List[Tuple[Sample, Any]]:
    scene, image = _draw(config, rng)
    out = []
    for j, label in enumerate(rng.permutation(VE_LABELS).tolist()):
        hypothesis, claim = ve_hypothesis(scene, rng, label)
        record = {"pair_id": f"{image_id}-{j}", "image_id": image_id, "hypothesis": hypothesis, "label": label,
                  "source": "synthetic", "scene_graph": scene}
        out.append((Sample(record["pair_id"], record, {"": image}), claim))
    return out


def _vqa_group(config: SyntheticWorldConfig, rng: np.random.Generator, image_id: str) -> List[Tuple[Sample, Any]]:
    scene, image = _draw(config, rng)
    out, asked = [], set()
    for j in range(config.vqa_questions_per_image):
        for _ in range(20):  # different questions about one image where the scene allows
            question, program, question_type = vqa_question(scene, rng)
            if question not in asked:
                break
        asked.add(question)
        canonical = answer(program, scene)
        record = {"question_id": f"{image_id}-{j}", "image_id": image_id, "question": question,
                  "answers": annotator_answers(canonical, rng, config.vqa_noise_fraction), "answer": canonical,
                  "answer_type": "yes/no" if canonical in ("yes", "no") else
                  "number" if question_type == "count" else "other",
                  "question_type": question_type, "source": "synthetic", "scene_graph": scene}
        out.append((Sample(record["question_id"], record, {"": image}), program))
    return out


def _captioned_group(caption_count: Callable[[np.random.Generator], int], config: SyntheticWorldConfig,
                     rng: np.random.Generator, image_id: str) -> List[Tuple[Sample, Any]]:
    scene, image = _draw(config, rng)
    captions = captions_for(scene, rng, caption_count(rng))
    record = {"image_id": image_id, "captions": [text for text, _ in captions],
              "claims": [claim_to_json(claim) for _, claim in captions], "width": scene["width"],
              "height": scene["height"], "source": "synthetic", "scene_graph": scene}
    return [(Sample(image_id, record, {"": image}), [claim for _, claim in captions])]


GROUP_MAKERS: Dict[str, Callable[[SyntheticWorldConfig, np.random.Generator, str], List[Tuple[Sample, Any]]]] = {
    "nlvr2": _nlvr2_group,
    "ve": _ve_group,
    "vqa": _vqa_group,
    "retrieval": lambda config, rng, image_id: _captioned_group(
        lambda rng: config.retrieval_captions, config, rng, image_id),
    "pretrain": lambda config, rng, image_id: _captioned_group(
        lambda rng: int(rng.integers(config.min_captions, config.max_captions + 1)), config, rng, image_id),
}
"""How a group of each split's task is made (splits are named after their task, ``split_task``)."""


def make_group(config: SyntheticWorldConfig, split: str, index: int) -> List[Tuple[Sample, Any]]:
    """The samples made from group ``index`` of ``split`` (one image, or an image pair for NLVR2).

    Each item is (sample, meaning): ``sample`` as ``soho/data/convert/writer.py`` writes it;
    ``meaning`` is the list of caption claims, the NLVR2/VE claim, or the VQA program the text
    was generated from.
    """
    rng = _rng(config.seed, split, index)
    return GROUP_MAKERS[split_task(split)](config, rng, f"{split}-{index:07d}")


def texts_of(record: Dict) -> List[str]:
    """Every piece of text in a record (what the tokenizer learns from)."""
    texts = list(record.get("captions", []))
    texts += [record[k] for k in ("sentence", "hypothesis", "question") if k in record]
    return texts + sorted(set(record.get("answers", [])))
