"""A faster accelerator (simulated): the host becomes the bottleneck."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvserve.study.experiments._common import PRE, Experiment, finding, rounded, share
from cvserve.study.plan import SIZES, ServerSpec, StudyPoint
from cvserve.study.results import ExperimentResult

if TYPE_CHECKING:
    from cvserve.study.context import StudyContext


def _accel_prepare(ctx: StudyContext, result: ExperimentResult) -> None:
    s = ctx.settings
    profiles: dict[str, dict[str, Any]] = {}
    old = result.derived.get("profiles", {})  # from a resumed run: the same files
    for k in s.speedups:
        name = f"{k}x"
        if name in old and Path(old[name]["file"]).exists():
            profiles[name] = old[name]
            continue
        path = ctx.write_profile(s.model, ctx.dnn_alone(s.model), k, name)
        profiles[name] = {
            "file": str(path),
            "speedup": k,
            "latency_ms": ctx.profile_latencies(path),
        }
    for given in ctx.extra_profiles:
        name = Path(given).stem if Path(given).exists() else given
        profiles[name] = {
            "file": given,
            "speedup": None,
            "latency_ms": ctx.profile_latencies(given),
        }
    for p in profiles.values():
        p["inference_alone_rps"] = rounded(ctx.inference_alone_rps(p["file"], s.accel_max_batch), 2)
    result.derived["profiles"] = profiles
    if "cpu_ms_per_image" not in result.derived:
        result.derived["cpu_ms_per_image"] = ctx.cpu_cost_per_image(s.model)


def _accel_plans(ctx: StudyContext, result: ExperimentResult) -> list[StudyPoint]:
    s = ctx.settings
    profiles = result.derived.get("profiles", {})
    models = "\n".join(
        f"  - {{name: {s.model}-{name}, model: {s.model}, runtime: simulated, "
        f'sim_profile: "{p["file"]}", max_batch_size: {s.accel_max_batch}, max_queue: 512, '
        f"max_queue_wait_ms: 0}}"
        for name, p in profiles.items()
    )
    server = ServerSpec(key="accelerator", config=f"models:\n{models}\n")
    return [
        StudyPoint(
            id=f"{name}-{size}",
            labels={
                "model": s.model,
                "speedup": name,
                "size": size,
                "concurrency": s.accel_concurrency,
            },
            server=server,
            target=f"{s.model}-{name}",
            images=size,
            concurrency=s.accel_concurrency,
            simulated=True,
        )
        for name in profiles
        for size in SIZES
    ]


def _accel_metrics(plan, metrics, ctx, result) -> None:
    p = result.derived["profiles"][plan.labels["speedup"]]
    metrics["inference_alone_rps"] = p["inference_alone_rps"]
    metrics["e2e_vs_inference_pct"] = rounded(
        100.0 * metrics["throughput_rps"] / p["inference_alone_rps"], 2
    )
    metrics["preprocess_share_pct"] = rounded(share(metrics, PRE), 2)


def _accel_finish(ctx: StudyContext, result: ExperimentResult) -> None:
    cost = result.derived.get("cpu_ms_per_image", {})
    # cores = images/s x CPU seconds per image; per 1,000 images/s that is the CPU ms/image
    result.derived["cores_per_1000_rps"] = {
        size: {who: rounded(ms, 2) for who, ms in c.items()} for size, c in cost.items()
    }
    result.derived["cores_needed"] = {
        name: {
            size: {who: rounded(p["inference_alone_rps"] * ms / 1000.0, 2) for who, ms in c.items()}
            for size, c in cost.items()
        }
        for name, p in result.derived.get("profiles", {}).items()
    }
    for k in sorted(ctx.settings.speedups):
        pts = {size: result.ok_points(speedup=f"{k}x", size=size) for size in SIZES}
        if k == 1 or not all(pts.values()):
            continue
        result.findings.append(
            finding(
                f"accelerator-{k}x",
                "With an accelerator {k}x faster than this CPU, end to end reaches {s}% of "
                "what the accelerator alone sustains on small photos, {m}% on medium and "
                "{l}% on large ones: the host's decoding and resizing, not the DNN, set the "
                "throughput.",
                k=k,
                s=rounded(pts["small"][0].metrics["e2e_vs_inference_pct"], 0),
                m=rounded(pts["medium"][0].metrics["e2e_vs_inference_pct"], 0),
                l=rounded(pts["large"][0].metrics["e2e_vs_inference_pct"], 0),
            )
        )
    top = max(ctx.settings.speedups)
    for size in ("medium", "large"):
        pts = result.ok_points(speedup=f"{top}x", size=size)
        c = cost.get(size)
        if not pts or not c:
            continue
        m = pts[0].metrics
        f = finding(
            f"accelerator-{size}",
            "With an accelerator {k}x faster than this CPU, {size} photos are served end to "
            "end at {thr} req/s, {pct}% of the {alone} images/s the accelerator alone "
            "sustains; preprocessing needs {cv} host cores per 1,000 images/s with cvserve "
            "against {bl} with the baseline's and {fl} for the JPEG decode alone, the floor "
            "(so {need} cores to feed this accelerator).",
            {"size": size}, k=top, thr=rounded(m["throughput_rps"]), pct=rounded(m["e2e_vs_inference_pct"], 0),
            alone=rounded(m["inference_alone_rps"], 0), cv=rounded(c["cvserve"], 1),
            bl=rounded(c["baseline"], 1), fl=rounded(c.get("floor", float("nan")), 1),
            need=rounded(result.derived["cores_needed"][f"{top}x"][size]["cvserve"], 1),
        )  # fmt: skip
        result.findings.append(f)


EXPERIMENT = Experiment(
    "accelerator",
    "A faster accelerator (simulated): the host becomes the bottleneck",
    {
        "figure": "Fig. 1 / headline",
        "claim": "On a GPU server, preprocessing and data movement, not the DNN, limit "
        "end-to-end throughput: up to ~80% of it is lost on large images.",
    },  # fmt: skip
    plans=_accel_plans,
    finish=_accel_finish,
    prepare=_accel_prepare,
    metrics=_accel_metrics,
    params=lambda s: {
        "model": s.model,
        "speedups": list(s.speedups),
        "concurrency": s.accel_concurrency,
        "max_batch": s.accel_max_batch,
    },  # fmt: skip
)
