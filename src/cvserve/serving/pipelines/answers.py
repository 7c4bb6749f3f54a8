"""A declared pipeline's answer from the values of its steps (``PipelineConfig.answer``).

``graph`` (the default): one key per step whose ``output`` is on. A step on the whole
image gives its answer there; a ``crop`` step gives a list with one entry per crop, in
order (its box and what found it), and every step that ran per crop of it adds its
answer to each entry under its own name::

    {"detect": {"detections": [...]},
     "crops": [{"box": [...], "score": 0.9, "label": "person", "embed": {...}}, ...],
     "whole": {"top_k": [...]}}

``ocr`` and ``detect-classify`` are the shapes those presets have always answered with.
"""

from __future__ import annotations

from typing import Any

from cvserve.config.graph import Graph

#: The built-in ops' values that are not JSON as they are.
_OCR_DET = "ocr_det"


def _value(graph: Graph, name: str, value: Any) -> Any:
    step = graph.step(name)
    if step.kind == "op" and step.target == _OCR_DET:
        return {"regions": [
            {"polygon": [[round(float(x), 1), round(float(y), 1)] for x, y in box],
             "det_score": round(float(sc), 5)}
            for box, sc in zip(value.boxes.boxes, value.boxes.scores, strict=True)
        ]}  # fmt: skip
    return value


def join_answer(shape: str, graph: Graph, values: dict[str, Any]) -> dict:
    if shape == "ocr":
        return _ocr(graph, values)
    if shape == "detect-classify":
        return _objects(graph, values)
    out: dict[str, Any] = {}
    for s in graph.steps:
        if not s.output or graph.scope[s.name]:
            continue  # per-crop answers go inside their crop step's entries
        if s.kind == "crop":
            entries = [c.describe() for c in values[s.name].items]
            for t in graph.steps:
                if t.output and graph.scope[t.name] == s.name:
                    for entry, v in zip(entries, values[t.name], strict=True):
                        entry[t.name] = v
            out[s.name] = entries
        else:
            out[s.name] = _value(graph, s.name, values[s.name])
    return out


def _ocr(graph: Graph, values: dict[str, Any]) -> dict:
    from cvserve.tasks.ocr import OcrConfig, join_lines

    det = next(s.name for s in graph.steps if s.kind == "op" and s.target == _OCR_DET)
    rec = next(s.name for s in graph.steps if s.kind == "op" and s.target == "ocr_rec")
    texts = [(r["text"], r["score"]) for r in values[rec]]
    if not texts:
        return {"lines": [], "regions": 0}
    lines = join_lines(values[det].boxes, texts, OcrConfig().rec.text_score)
    return {"lines": [ln.to_dict() for ln in lines], "regions": len(texts)}


def _objects(graph: Graph, values: dict[str, Any]) -> dict:
    crop = next(s for s in graph.steps if s.kind == "crop")
    cls = next(s.name for s in graph.steps if graph.scope[s.name] == crop.name)
    objects = []
    for c, answer in zip(values[crop.name].items, values[cls], strict=True):
        top = answer["top_k"][0]
        objects.append({"box": c.found["box"], "det_score": round(c.found["score"], 5),
                        "det_label": c.found["index"], "label": top["label"],
                        "score": round(float(top["score"]), 5)})  # fmt: skip
    return {"objects": objects}
