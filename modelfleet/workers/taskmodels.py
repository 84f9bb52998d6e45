"""The three task models of the task worker (docs/tasks.md).

Each one loads from what is installed (a sentence-transformers folder, a
spaCy pipeline package) and never reaches for the network, and each ``run``
takes a text and its checked parameters (``openai/taskchat.py``) and returns
the result, the text's tokens and the result's items (the usage).  ``run``
is called on the worker's one model thread, one request at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from modelfleet.openai.taskchat import PII_ENTITIES

log = logging.getLogger("modelfleet.workers.tasks")

# all-MiniLM-L6-v2 reads 256 word pieces (special tokens included): a longer
# text is embedded in windows of this many and their embeddings averaged.
WINDOW_TOKENS = 254
# Zero-shot scores: softmax over the cosine similarities at this temperature
# (one label), or each similarity through a logistic centred on MULTI_CENTRE
# with MULTI_SCALE (multi_label: a score above 0.5 means "applies").  On the
# sample in tests/data the right label's similarity has a median of 0.18 (10th
# percentile 0.09), the wrong ones' a median of 0.005 (90th percentile 0.09).
TEMPERATURE = 0.05
MULTI_CENTRE = 0.1
MULTI_SCALE = 0.03
# What the label is embedded as: a short sentence ranks better than the bare word.
HYPOTHESIS = "This text is about {}."
LABEL_CACHE = 4096  # label embeddings kept between requests


@dataclass
class Result:
    body: dict[str, Any]
    prompt_tokens: int
    items: int


class TaskModel(Protocol):
    def run(self, text: str, params: dict[str, Any]) -> Result: ...


def _offline() -> None:
    """Nothing a task model loads may go to the network: Hugging Face stays
    offline, and tldextract (Presidio's email check) uses the public suffix
    list snapshot it ships instead of fetching the current one."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS"] = ""


class ZeroShotClassifier:
    """Zero-shot classification by embedding similarity: the text and each
    label (as ``HYPOTHESIS``) are embedded with a sentence-transformers model,
    and labels are ranked by cosine similarity."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        _offline()
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.utils.logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
        self.model.eval()
        self.tokenizer: Any = self.model.tokenizer
        self._labels: OrderedDict[str, np.ndarray] = OrderedDict()
        self.model.encode(["warm up"], show_progress_bar=False)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=False))

    def _text_vector(self, text: str) -> tuple[np.ndarray, int]:
        ids = self.tokenizer(text, add_special_tokens=False, truncation=False,
                             verbose=False)["input_ids"]
        windows = [text] if len(ids) <= WINDOW_TOKENS else [
            self.tokenizer.decode(ids[start:start + WINDOW_TOKENS])
            for start in range(0, len(ids), WINDOW_TOKENS)]
        vector = self._encode(windows).mean(axis=0)
        return vector / (np.linalg.norm(vector) or 1.0), len(ids)

    def _label_vectors(self, labels: list[str]) -> np.ndarray:
        missing = [label for label in labels if label not in self._labels]
        if missing:
            for label, vector in zip(missing, self._encode([HYPOTHESIS.format(m) for m in missing]),
                                     strict=True):
                self._labels[label] = vector
        for label in labels:
            self._labels.move_to_end(label)
        while len(self._labels) > LABEL_CACHE:
            self._labels.popitem(last=False)
        return np.stack([self._labels[label] for label in labels])

    def run(self, text: str, params: dict[str, Any]) -> Result:
        labels: list[str] = params["labels"]
        vector, tokens = self._text_vector(text)
        similarity = self._label_vectors(labels) @ vector
        if params["multi_label"]:
            scores = 1.0 / (1.0 + np.exp(-(similarity - MULTI_CENTRE) / MULTI_SCALE))
        else:
            shifted = np.exp((similarity - similarity.max()) / TEMPERATURE)
            scores = shifted / shifted.sum()
        order = np.argsort(-scores, kind="stable")
        ranked = [labels[i] for i in order]
        body = {"label": ranked[0], "labels": ranked,
                "scores": [round(float(scores[i]), 4) for i in order],
                "multi_label": params["multi_label"]}
        return Result(body, tokens, len(labels))


def load_spacy(package: str, **kwargs: Any) -> Any:
    """An installed spaCy pipeline package, by import name (never downloaded)."""
    import spacy

    if not spacy.util.is_package(package):
        raise RuntimeError(f"the spaCy pipeline package {package!r} is not installed")
    return spacy.load(package, **kwargs)


class EntityRecognizer:
    """Named entities from a spaCy pipeline (OntoNotes types for en_core_web_sm)."""

    def __init__(self, package: str) -> None:
        _offline()
        # Only what NER needs: its own tok2vec is inside the ner component.
        self.nlp = load_spacy(package, exclude=["tagger", "parser", "attribute_ruler",
                                                "lemmatizer", "senter"])
        self.nlp("warm up")

    def run(self, text: str, params: dict[str, Any]) -> Result:
        doc = self.nlp(text)
        wanted = params["entity_types"]
        entities = [{"text": ent.text, "type": ent.label_, "start": ent.start_char,
                     "end": ent.end_char} for ent in doc.ents
                    if wanted is None or ent.label_ in wanted]
        return Result({"entities": entities}, len(doc), len(entities))


class PiiDetector:
    """Presidio's analyzer on a spaCy pipeline, and its anonymizer for ``mask``."""

    def __init__(self, package: str) -> None:
        _offline()
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.nlp_engine import SpacyNlpEngine
        from presidio_anonymizer import AnonymizerEngine

        # Presidio warns once per recognizer of another language: not news.
        logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
        nlp = load_spacy(package)
        engine: Any = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": package}])
        # The loaded pipeline, handed over: engine.load() would run Presidio's
        # own loader, which downloads a model it does not find.
        engine.nlp = {"en": nlp}
        self.tokenizer = nlp.tokenizer
        self.analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
        self.anonymizer = AnonymizerEngine()
        missing = set(PII_ENTITIES) - set(self.analyzer.get_supported_entities("en"))
        if missing:  # the gateway accepts these names: this Presidio must know them
            raise RuntimeError(f"Presidio does not detect {', '.join(sorted(missing))} here")
        self.analyzer.analyze("warm up jane@example.com", language="en")

    def run(self, text: str, params: dict[str, Any]) -> Result:
        found = self.analyzer.analyze(text, language="en", entities=params["entities"],
                                      score_threshold=params["score_threshold"])
        kept = _without_overlaps(found)
        entities = [{"text": text[r.start:r.end], "type": r.entity_type, "start": r.start,
                     "end": r.end, "score": round(float(r.score), 4)} for r in kept]
        body: dict[str, Any] = {"entities": entities}
        if params["mask"]:
            body["masked_text"] = self.anonymizer.anonymize(text=text, analyzer_results=kept).text
        return Result(body, len(self.tokenizer(text)), len(entities))


def _without_overlaps(found: list[Any]) -> list[Any]:
    """Presidio may report overlapping spans (a URL inside an email address):
    keep the highest score, then the longest span, and drop what it overlaps."""
    kept: list[Any] = []
    for result in sorted(found, key=lambda r: (-r.score, -(r.end - r.start), r.start)):
        if all(result.end <= k.start or result.start >= k.end for k in kept):
            kept.append(result)
    return sorted(kept, key=lambda r: r.start)


def load(task: str, *, model_dir: Path | None, spacy_model: str | None,
         threads: int) -> TaskModel:
    started = time.perf_counter()
    model: TaskModel
    if task == "classification":
        assert model_dir is not None
        model = ZeroShotClassifier(model_dir, threads)
    elif task == "ner":
        assert spacy_model is not None
        model = EntityRecognizer(spacy_model)
    else:
        assert spacy_model is not None
        model = PiiDetector(spacy_model)
    log.info("%s model loaded in %.2fs", task, time.perf_counter() - started)
    return model
