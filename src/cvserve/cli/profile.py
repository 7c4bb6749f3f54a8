"""``cvserve profile``: a model's latency per batch size, for the simulated runtime."""

from __future__ import annotations

import argparse

from cvserve.cli._common import add_cache_arg, add_renamed, csv_ints, say


def add_profile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="measure a model's latency per batch size here: a profile for --runtime simulated",
        description="Runs the model with onnxruntime at each batch size (random inputs, median "
        "of --repeats runs after a warm-up), prints a table and writes a profile JSON "
        "(schema cvserve.profile/1) that `serve --runtime simulated --sim-profile` reads.",
    )
    p.add_argument("model", help="a zoo or stored model name, or a .onnx file")
    p.add_argument("--out", help="profile JSON to write (default: MODEL-profile.json)")
    p.add_argument(
        "--batch-sizes", type=csv_ints, default=[1, 2, 4, 8, 16, 32],
        help="batch sizes to measure (default 1,2,4,8,16,32)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (default 5)")
    p.add_argument(
        "--warmup-runs", type=int, default=1, metavar="N",
        help="untimed runs per batch size first (default 1)",
    )  # fmt: skip
    add_renamed(p, "--warmup", "--warmup-runs", "warmup_runs", int)
    p.add_argument(
        "--intra-op-threads", type=int, default=0,
        help="onnxruntime threads (default: onnxruntime's choice, one per core)",
    )  # fmt: skip
    add_cache_arg(p)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cvserve.runtime.profile import measure_profile, profile_table

    path = Path(args.model)
    if path.suffix == ".onnx" and path.is_file():
        name, item_shape = path.stem, None
    else:
        from cvserve.models import store

        meta = store.ensure_built(args.model, args.cache_dir, progress=say)
        name, path = meta.name, store.model_path(meta, args.cache_dir)
        item_shape = meta.preprocess.input_shape
    say(f"profiling {name}: batch sizes {','.join(map(str, args.batch_sizes))}, "
         f"{args.repeats} runs each")  # fmt: skip
    profile = measure_profile(
        path,
        args.batch_sizes,
        repeats=args.repeats,
        threads=args.intra_op_threads,
        warmup=args.warmup_runs,
        item_shape=item_shape,
        model=name,
        progress=lambda b, s: say(f"  batch {b}: {s * 1000:.2f} ms"),
    )
    print("\n".join(profile_table(profile, f"{name} on {profile.device} ({profile.runtime})")))
    out = profile.save(args.out or f"{name}-profile.json")
    say(f"wrote {out} (serve it with --runtime simulated --sim-profile {out})")
    return 0
