"""Accuracy of the built-in task models on the labelled samples in tests/data
(docs/tasks.md): each text goes through ``modelfleet serve`` and the official
``openai`` SDK, exactly as a client sends it.

    .venv/bin/python bench/task_accuracy.py

- zero-shot classification (tests/data/tasks_classification.json): the share
  of texts whose top label is the gold one;
- NER (tests/data/tasks_ner.json): entity-level precision, recall and F1, an
  entity counting when its text and its type both match;
- PII (tests/data/tasks_pii.json, usecase "general", ``mask: true``): the
  share of gold items that a reported entity overlaps (recall), the share of
  reported entities that overlap a gold item (precision), and gold values
  still readable in ``masked_text`` (leaks).

tests/test_tasks.py scores the same samples with these functions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
CLASSIFIER, NER, PII = "modelfleet/zero-shot-minilm", "modelfleet/ner-en-core-web-sm", \
    "modelfleet/pii-presidio"
# Sends one text to a task model with its metadata; returns the task's JSON result.
Ask = Callable[[str, str, dict[str, Any]], dict[str, Any]]


def samples(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / f"tasks_{name}.json").read_text())
    return data


def classification(ask: Ask) -> dict[str, Any]:
    data = samples("classification")
    misses = []
    for sample in data["samples"]:
        result = ask(CLASSIFIER, sample["text"], {"labels": data["labels"]})
        if result["label"] != sample["label"]:
            misses.append((sample["text"], sample["label"], result["label"]))
    n = len(data["samples"])
    return {"n": n, "accuracy": (n - len(misses)) / n, "misses": misses}


def ner(ask: Ask) -> dict[str, Any]:
    data = samples("ner")
    hits = gold_count = found_count = 0
    for sample in data["samples"]:
        result = ask(NER, sample["text"], {})
        found = {(e["text"], e["type"]) for e in result["entities"]}
        gold = {(text, kind) for text, kind in sample["entities"]}
        hits += len(found & gold)
        gold_count += len(gold)
        found_count += len(found)
    precision, recall = hits / max(found_count, 1), hits / max(gold_count, 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"n": len(data["samples"]), "entities": gold_count, "precision": precision,
            "recall": recall, "f1": f1}


def _overlaps(entity: dict[str, Any], span: tuple[int, int]) -> bool:
    return bool(entity["start"] < span[1] and entity["end"] > span[0])


def pii(ask: Ask) -> dict[str, Any]:
    data = samples("pii")
    found = gold_count = reported = false_alarms = 0
    leaks: list[str] = []
    for sample in data["samples"]:
        text = sample["text"]
        result = ask(PII, text, {"mask": True, "usecase": "general"})
        spans = [(text.index(value), text.index(value) + len(value)) for value, _ in sample["pii"]]
        gold_count += len(spans)
        found += sum(any(_overlaps(e, span) for e in result["entities"]) for span in spans)
        reported += len(result["entities"])
        false_alarms += sum(not any(_overlaps(e, span) for span in spans)
                            for e in result["entities"])
        leaks += [value for value, _ in sample["pii"] if value in result["masked_text"]]
    return {"n": len(data["samples"]), "items": gold_count, "recall": found / gold_count,
            "precision": (reported - false_alarms) / max(reported, 1), "leaks": leaks}


def main() -> None:
    import openai

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from metering import Server  # the same server harness as the other benchmarks

    server = Server(metering=True)
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                           timeout=120) as client:

            def ask(model: str, text: str, metadata: dict[str, Any]) -> dict[str, Any]:
                reply = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": text}],
                    metadata=metadata)  # type: ignore[arg-type]  # values beyond strings
                out: dict[str, Any] = json.loads(reply.choices[0].message.content or "{}")
                return out

            cls, ents, found = classification(ask), ner(ask), pii(ask)
    finally:
        server.stop()
    print(f"classification  {CLASSIFIER}: accuracy {cls['accuracy']:.1%} on {cls['n']} texts")
    for text, gold, got in cls["misses"]:
        print(f"    miss: {gold} -> {got}: {text}")
    print(f"NER             {NER}: precision {ents['precision']:.1%}, recall {ents['recall']:.1%}, "
          f"F1 {ents['f1']:.1%} on {ents['entities']} entities in {ents['n']} texts")
    print(f"PII             {PII}: recall {found['recall']:.1%}, precision {found['precision']:.1%} "
          f"on {found['items']} items in {found['n']} texts; leaks in masked_text: "
          f"{len(found['leaks'])}")


if __name__ == "__main__":
    main()
