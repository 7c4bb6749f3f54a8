"""How closely served models brought by a user answer as their own library does.

Builds the tiny HF folders of ``tests/models/test_own_models.py`` (classifier, SegFormer,
RT-DETR, Depth Anything, CLIP and DINOv2 encoders) and a timm checkpoint folder, serves
them (``decoder="pil"``), and on every shared photo (small and medium) compares cvserve's
answer with the library's: transformers' image processor + model + ``post_process_*``,
timm's ``create_transform`` + model. Agreement, not speed: one pass, no timing.

    python benchmarks/own_models_agreement.py     # -> benchmarks/results/own_models_agreement.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cvserve.models import torchvision_compat  # noqa: E402

torchvision_compat.install()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cvserve.config import ModelConfig, ServerConfig  # noqa: E402
from cvserve.machine import machine_info  # noqa: E402
from cvserve.models import build  # noqa: E402
from cvserve.serving.process import ServerThread, free_port  # noqa: E402
from cvserve.tasks.encode import decode_array, decode_npz  # noqa: E402
from tests.models import test_own_models as t  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "images"
OUT = ROOT / "benchmarks" / "results" / "own_models_agreement.json"


def photos() -> list[tuple[str, Path]]:
    return [(f"{p.parent.name}/{p.name}", p) for d in ("small", "medium")
            for p in sorted((DATA / d).glob("*.jpg"))]  # fmt: skip


def hf_families(own, rel_photos) -> dict:
    res: dict[str, dict] = {k: {} for k in ("classify", "segment", "detect", "depth", "embed")}
    for key, path in rel_photos:
        data_dir = path.parents[2]
        name = f"../{key}"  # the test helper reads images/small/NAME
        _, _, out, r = t.both(own, data_dir, name, "classify", "?top_k=5")
        probs = torch.softmax(out.logits[0].double(), -1).numpy()
        top = r.json()["top_k"]
        res["classify"][key] = {
            "top1_equal": top[0]["index"] == int(probs.argmax()),
            "max_score_diff": max(abs(x["score"] - probs[x["index"]]) for x in top),
        }
        im, proc, out, r = t.both(own, data_dir, name, "segment")
        want = proc.post_process_semantic_segmentation(out, target_sizes=[im.size[::-1]])[0]
        res["segment"][key] = {
            "pixel_agreement": float((decode_array(r.json()["mask"]) == want.numpy()).mean())
        }
        im, proc, out, r = t.both(own, data_dir, name, "detect", "?threshold=0&top_k=5")
        ref = proc.post_process_object_detection(out, threshold=0.0,
                                                 target_sizes=[im.size[::-1]])[0]  # fmt: skip
        order = torch.argsort(ref["scores"], descending=True)[:5].tolist()
        got = r.json()["detections"]
        res["detect"][key] = {
            "labels_equal": all(
                g["index"] == int(ref["labels"][i]) for g, i in zip(got, order, strict=True)
            ),  # fmt: skip
            "max_box_px": max(
                float(np.abs(np.array(g["box"]) - ref["boxes"][i].numpy()).max())
                for g, i in zip(got, order, strict=True)
            ),  # fmt: skip
            "max_score_diff": max(
                abs(g["score"] - float(ref["scores"][i])) for g, i in zip(got, order, strict=True)
            ),  # fmt: skip
        }
        im, proc, out, r = t.both(own, data_dir, name, "depth",
                                  headers={"accept": "application/x-npz"})  # fmt: skip
        want = proc.post_process_depth_estimation(out, target_sizes=[im.size[::-1]])
        want = want[0]["predicted_depth"].numpy()
        got = decode_npz(r.content)[1]["depth"]
        res["depth"][key] = {"max_rel_error": float(np.abs(got - want).max() / np.abs(want).max())}
        cos = {}
        for kind, attr in (("embed", "image_embeds"), ("embed-dinov2", "pooler_output")):
            _, _, out, r = t.both(own, data_dir, name, kind)
            want = getattr(out, attr)[0].double().numpy()
            cos[kind] = float(np.array(r.json()["embedding"]) @ (want / np.linalg.norm(want)))
        res["embed"][key] = {"cosine_clip": cos["embed"], "cosine_dinov2": cos["embed-dinov2"]}
    return res


def timm_family(rel_photos, root: Path) -> dict:
    import timm
    import timm.data

    from cvserve.images.preprocess import Preprocessor
    from cvserve.models import timm_build

    out: dict[str, dict] = {"input": {}, "answers": {}}
    for name in ("resnet50", "vit_base_patch16_224", "convnext_tiny", "test_efficientnet"):
        model = timm.create_model(name, pretrained=False)
        cfg = timm_build.data_config(model)
        spec = timm_build.spec_from_timm(cfg)
        tf = timm.data.create_transform(**cfg)
        pre = Preprocessor(spec, decoder="pil")
        worst, psnr = 0.0, []
        for _, path in rel_photos:
            got = np.zeros(spec.input_shape, np.float32)
            pre.run(path.read_bytes(), got)
            want = tf(Image.open(path).convert("RGB")).numpy()
            worst = max(worst, float(np.abs(got - want).max()))
            err = (got - want) * np.array(spec.std, np.float32).reshape(3, 1, 1) * 255
            psnr.append(10 * np.log10(255**2 / max(float((err**2).mean()), 1e-12)))
        out["input"][name] = {
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "max_abs": worst,
            "one_8bit_level": 1 / 255 / min(spec.std),
            "min_psnr_db": min(psnr),
            "median_psnr_db": float(np.median(psnr)),
        }
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=5).eval()
    folder = root / "my-timm"
    timm.models.save_for_hf(model, folder, model_config={"label_names": list("abcde")})
    meta = build.build_from_timm(str(folder), None, root / "cache")
    tf = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    cfg = ServerConfig(port=free_port(), cache_dir=str(root / "cache"),
                       models=(ModelConfig(meta.name, decoder="pil"),))  # fmt: skip
    with ServerThread(cfg) as srv:
        for key, path in rel_photos:
            with torch.no_grad():
                probs = torch.softmax(model(tf(Image.open(path).convert("RGB"))[None])[0].double(),
                                      -1).numpy()  # fmt: skip
            r = t._post(srv, meta.name, path.read_bytes(), "?top_k=5").json()["top_k"]
            out["answers"][key] = {
                "top1_equal": r[0]["index"] == int(probs.argmax()),
                "max_score_diff": max(abs(x["score"] - probs[x["index"]]) for x in r),
            }
    return out


def summary(res: dict) -> dict:
    def agg(rows: dict, field: str, how) -> float:
        return how(float(v[field]) for v in rows.values())

    return {
        "classify": {"top1_equal_all": agg(res["classify"], "top1_equal", min) == 1.0,
                     "max_score_diff": agg(res["classify"], "max_score_diff", max)},
        "segment": {"min_pixel_agreement": agg(res["segment"], "pixel_agreement", min)},
        "detect": {"labels_equal_all": agg(res["detect"], "labels_equal", min) == 1.0,
                   "max_box_px": agg(res["detect"], "max_box_px", max),
                   "max_score_diff": agg(res["detect"], "max_score_diff", max)},
        "depth": {"max_rel_error": agg(res["depth"], "max_rel_error", max)},
        "embed": {"min_cosine_clip": agg(res["embed"], "cosine_clip", min),
                  "min_cosine_dinov2": agg(res["embed"], "cosine_dinov2", min)},
        "timm": {"input": {k: {"max_abs": v["max_abs"], "min_psnr_db": v["min_psnr_db"]}
                           for k, v in res["timm"]["input"].items()},
                 "top1_equal_all": agg(res["timm"]["answers"], "top1_equal", min) == 1.0,
                 "max_score_diff": agg(res["timm"]["answers"], "max_score_diff", max)},
    }  # fmt: skip


def main() -> None:
    rel = photos()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = t.make_folders(root / "src")
        metas = {k: build.build_from_hf_dir(f, f.name, root / "cache") for k, f in folders.items()}
        cfg = ServerConfig(port=free_port(), cache_dir=str(root / "cache"),
                           models=tuple(ModelConfig(m.name, decoder="pil")
                                        for m in metas.values()))  # fmt: skip
        with ServerThread(cfg) as srv:
            res = hf_families((srv, folders, metas), rel)
        res["timm"] = timm_family(rel, root)
    doc = {
        "what": "served answers of user-brought models vs their own library, per photo",
        "command": "python benchmarks/own_models_agreement.py",
        "photos": [k for k, _ in rel],
        "decoder": "pil",
        "summary": summary(res),
        "per_photo": res,
        "machine": machine_info(),
    }
    OUT.write_text(json.dumps(doc, indent=1, default=float))
    print(json.dumps(doc["summary"], indent=1))


if __name__ == "__main__":
    main()
