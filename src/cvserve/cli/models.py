"""``cvserve models``: build, list, show and add models in the model store."""

from __future__ import annotations

import argparse

from cvserve.cli._common import add_cache_arg, add_renamed, csv_floats, say


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="build, list, add and show models in the model store")
    msub = p.add_subparsers(dest="models_command", required=True)

    b = msub.add_parser(
        "build", help="build a zoo model, a HF folder or hub id, or a timm model to ONNX"
    )
    b.add_argument("name", nargs="?", help="zoo model name (see `cvserve models list`)")
    src = b.add_mutually_exclusive_group()
    src.add_argument(
        "--from-dir",
        help="a local HuggingFace save_pretrained folder (real weights; the task comes from "
        "its config: classify, segment, detect, depth or embed) (default: none)",
    )
    src.add_argument(
        "--from-hub",
        metavar="ID[@REVISION]",
        help="a HuggingFace hub id, through the HF cache (HF_HUB_OFFLINE=1: the cache only) "
        "(default: none)",
    )
    src.add_argument(
        "--from-timm",
        metavar="NAME|DIR",
        help="a timm model name (random weights) or a timm checkpoint folder (default: none)",
    )
    b.add_argument(
        "--as", dest="store_name",
        help="store name for --from-* (default: the folder's, repo's or timm model's name)",
    )  # fmt: skip
    b.add_argument("--force", action="store_true", help="rebuild a model that is built")
    b.add_argument(
        "--version", type=int, default=None, metavar="N",
        help="build a zoo model (fresh random weights) as version N of it (default: the "
        "model itself, version 1)",
    )  # fmt: skip
    b.add_argument(
        "--fold-normalize", action="store_true",
        help="also store NAME-u8: the same model taking uint8 pixels, normalizing in its graph",
    )  # fmt: skip
    add_cache_arg(b)
    b.set_defaults(func=_cmd_models_build)

    ls = msub.add_parser("list", help="every zoo model, built or not, and every stored model")
    add_cache_arg(ls)
    ls.set_defaults(func=_cmd_models_list)

    sh = msub.add_parser(
        "show", help="a model's metadata: input, preprocessing, num_labels, parameters, GFLOPs"
    )
    sh.add_argument(
        "--labels", action="store_true",
        help="also list every label, one a line (default: only their number)",
    )  # fmt: skip
    sh.add_argument("name")
    add_cache_arg(sh)
    sh.set_defaults(func=_cmd_models_show)

    a = msub.add_parser("add", help="register your own ONNX file")
    a.add_argument("file", help="the .onnx file (one NCHW image input)")
    a.add_argument("--name", help="store name (default: the file's stem)")
    a.add_argument(
        "--task",
        default="classify",
        choices=["classify", "segment", "detect", "depth", "embed"],
        help="what the model does (default: classify)",
    )
    a.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="ROLE=NAME",
        help="which graph output is which (classify/segment: logits; detect: logits and "
        "pred_boxes; depth: predicted_depth; embed: embedding); repeat per role "
        "(default: by name, else in order when the counts match)",
    )
    a.add_argument(
        "--score",
        choices=["softmax", "sigmoid"],
        help="detect: how logits become scores (default: softmax with a last no-object class)",
    )
    a.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    a.add_argument(
        "--resize",
        type=int,
        help="shortest edge before the center crop (default size/0.875); 0 = direct resize",
    )
    a.add_argument("--mean", type=csv_floats, default=None, help="3 values (default ImageNet)")
    a.add_argument("--std", type=csv_floats, default=None, help="3 values (default ImageNet)")
    a.add_argument("--interpolation", default="bilinear", metavar="FILTER",
                   choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
                   help="resize filter of the preprocessing: nearest, bilinear, bicubic, "
                   "lanczos, box or hamming")  # fmt: skip
    a.add_argument("--labels", help="a text file with one label per line")
    a.add_argument("--force", action="store_true", help="replace a stored model of that name")
    add_renamed(a, "--overwrite", "--force", "force", switch=True)
    a.add_argument(
        "--version", type=int, default=None, metavar="N",
        help="store the file as version N of --name (default: version 1, the model itself)",
    )  # fmt: skip
    a.add_argument(
        "--fold-normalize", action="store_true",
        help="also store NAME-u8, taking uint8 pixels and normalizing in its graph",
    )  # fmt: skip
    add_cache_arg(a)
    a.set_defaults(func=_cmd_models_add)


def _cmd_models_build(args: argparse.Namespace) -> int:
    from cvserve.models import store

    own = [(k, getattr(args, f"from_{k}")) for k in ("dir", "hub", "timm")]
    own = [(k, v) for k, v in own if v]
    if args.from_dir:
        meta = store.build_from_dir(args.from_dir, args.store_name, args.cache_dir, progress=say)
    elif args.name and args.version is not None:
        from cvserve.models.versions import build_version

        meta = build_version(args.name, args.version, args.cache_dir, progress=say)
        path = store.version_dir(meta.name, args.version, args.cache_dir) / meta.onnx_file
        print(f"{meta.name} version {args.version}: {path}")
        return 0
    elif own:
        kind, ref = own[0]
        name = args.store_name or store.default_name(kind, ref)
        meta = store.build_from(kind, ref, name, args.cache_dir, progress=say)
    elif args.name:
        meta = store.ensure_built(args.name, args.cache_dir, progress=say, force=args.force)
    else:
        say("name a zoo model (cvserve models list) or pass --from-dir, --from-hub or --from-timm")
        return 2
    print(f"{meta.name}: {store.model_path(meta, args.cache_dir)}")
    if args.fold_normalize:
        _print_folded(meta.name, args.cache_dir)
    return 0


def _print_folded(name: str, cache_dir: str | None) -> None:
    from cvserve.models import store

    folded = store.fold_normalize(name, cache=cache_dir, overwrite=True)
    print(f"{folded.name}: {store.model_path(folded, cache_dir)} (uint8 input, normalize folded)")


def _cmd_models_list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from cvserve.models import store

    table = Table(title=f"models in {store.cache_dir(args.cache_dir)}")
    for col in ("name", "task", "built", "weights", "source"):
        table.add_column(col)
    for e in store.list_models(args.cache_dir):
        table.add_row(e.name, e.task, "yes" if e.built else "no", e.weights, e.source)
    Console().print(table)
    return 0


def _cmd_models_show(args: argparse.Namespace) -> int:
    import json

    from cvserve.models import store

    meta = store.load_meta(args.name, args.cache_dir)
    d = store.describe(meta, args.cache_dir)
    labels = d.pop("labels", None) or []
    print(json.dumps(d, indent=2, default=str))
    if args.labels:
        print("\n".join(f"{i}\t{label}" for i, label in enumerate(labels)))
    return 0


def _cmd_models_add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cvserve.images.spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
    from cvserve.models import store

    for key in ("mean", "std"):
        v = getattr(args, key)
        if v is not None and len(v) != 3:
            say(f"--{key} needs 3 comma-separated values")
            return 2
    resize = args.resize if args.resize is not None else int(args.size / 0.875)
    spec = PreprocessSpec(
        height=args.size,
        width=args.size,
        resize_mode="direct" if resize == 0 else "shortest_edge_crop",
        resize_shortest=resize or None,
        interpolation=args.interpolation,
        mean=tuple(args.mean or IMAGENET_MEAN),
        std=tuple(args.std or IMAGENET_STD),
    )
    from cvserve.models.outputs import OutputMismatch, parse_mapping

    try:
        mapping = parse_mapping(args.output) or None
    except OutputMismatch as e:
        say(str(e))
        return 2
    labels = None
    if args.labels:
        labels = [ln.strip() for ln in Path(args.labels).read_text().splitlines() if ln.strip()]
    meta = store.add_model(
        args.file,
        name=args.name,
        task=args.task,
        spec=spec,
        labels=labels,
        cache=args.cache_dir,
        overwrite=args.force,
        version=args.version,
        outputs=mapping,
        extra={"score": args.score} if args.score else None,
    )
    if args.version is not None:
        print(f"added {meta.name} version {args.version}: input {meta.input_name} "
              f"{meta.input_shape} {meta.input_dtype}")  # fmt: skip
        return 0
    print(f"added {meta.name}: input {meta.input_name} {meta.input_shape} {meta.input_dtype}")
    if args.fold_normalize:
        _print_folded(meta.name, args.cache_dir)
    return 0
