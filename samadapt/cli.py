"""``samadapt``: the console script, one subcommand per job.

The entry layer: it parses every command's arguments, loads the root config
(``samadapt/config.py``) and calls library functions of ``sharding``, ``pipeline`` and ``launch``,
which take plain keyword arguments and the config section they read. Each command imports what
it uses when it runs, so ``samadapt shard`` and ``samadapt inspect`` do not import torch and
DeepSpeed. A config error anywhere ends the command with one line,
``samadapt CMD: config error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

from configtree import ConfigError
from pipeline.redact import RedactFilter, redact_uri
from samadapt.config import Config, load_config

__all__ = ["COMMANDS", "main", "parse_range", "sharding_overrides", "train_worker"]

TRAIN_ENTRY = "samadapt.cli:train_worker"
"""What ``launch`` runs once per rank for ``samadapt train``."""


# --------------------------------------------------------------------------------------------
# samadapt shard
# --------------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """``"i:j"`` -> (i, j), half-open; either side may be empty (0 / no limit)."""
    if ":" not in text:
        raise ValueError(f"--shard-range must be i:j (half-open), got {text!r}")
    lo_s, hi_s = text.split(":", 1)
    try:
        lo = int(lo_s) if lo_s.strip() else 0
        hi = int(hi_s) if hi_s.strip() else sys.maxsize
    except ValueError:
        raise ValueError(f"--shard-range must be two integers i:j, got {text!r}") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"--shard-range needs 0 <= i <= j, got {text!r}")
    return lo, hi


def sharding_overrides(items: list[str]) -> list[str]:
    """``x=1`` -> ``sharding.x=1``; ``sharding.x=1`` kept; other sections refused."""
    out = []
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"command line: override {item!r} is not of the form key=value")
        if key.startswith("sharding."):
            out.append(item)
        elif "." in key:
            raise ConfigError(
                f"command line: {key}: samadapt shard only takes sharding.* keys "
                "(write sharding.KEY=VALUE or KEY=VALUE)"
            )
        else:
            out.append(f"sharding.{item}")
    return out


def _shard_parser() -> argparse.ArgumentParser:
    from sharding.readers import FORMATS

    p = argparse.ArgumentParser(
        prog="samadapt shard",
        description="Corpus -> WebDataset tar shards (+ Zarr v3 volumes for 3D inputs).",
    )
    p.add_argument("--format", required=True, choices=FORMATS, help="input layout")
    p.add_argument("input", help="corpus root folder")
    p.add_argument("output", help="output folder (created; reruns resume it)")
    p.add_argument("overrides", nargs="*", help="sharding.KEY=VALUE or KEY=VALUE")
    p.add_argument("--config", default=None, help="YAML config (its sharding section is used)")
    p.add_argument("--workers", type=int, default=None, help="processes (0 = all cores)")
    p.add_argument("--shard-range", default=None, help="i:j, half-open, global shard indices")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite shards written from other inputs or settings (else the run stops)",
    )
    p.add_argument(
        "--verify-content",
        action="store_true",
        help="compare the inputs of complete shards by content hash, not modification time",
    )
    return p


def _shard(argv: list[str]) -> int:
    """``samadapt shard --format FMT INPUT OUTPUT [key=value ...] [--config YAML] [--workers N]
    [--shard-range i:j] [--no-progress] [--overwrite] [--verify-content]``: see
    ``sharding/run.py``. Exit 2 for bad arguments, input or output (a changed corpus without
    --overwrite, a set without any sample), 1 when writing failed (complete shards are kept:
    rerun to finish)."""
    args = _shard_parser().parse_intermixed_args(argv)
    from concurrent.futures.process import BrokenProcessPool

    from sharding.manifest import REJECTED_FILE
    from sharding.plan import PlanMismatch
    from sharding.run import run_shard
    from sharding.writer import ShardError

    try:
        shard_range = parse_range(args.shard_range) if args.shard_range else None
        cfg = load_config(args.config, sharding_overrides(args.overrides)).sharding
        if args.workers is not None and args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        result = run_shard(
            args.format,
            args.input,
            args.output,
            cfg=cfg,
            workers=args.workers,
            shard_range=shard_range,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            verify_content=args.verify_content,
        )
    except ConfigError:
        raise  # main's one-line "config error" (a ConfigError is also a ValueError)
    except (ValueError, PlanMismatch) as err:
        return _fail("shard", err, 2)
    except ShardError as err:
        return _fail("shard", err, 1)
    except BrokenProcessPool as err:
        return _fail(
            "shard",
            f"a worker process died ({err}); out of memory? Complete shards are kept: rerun "
            "(maybe with fewer --workers) to finish",
            1,
        )
    if result.manifest is None:
        print(
            f"wrote {result.written} shards; {result.complete} of {result.planned} shards of the "
            f"plan are complete (manifest.json is written when all are)"
        )
        return 0
    totals = result.manifest["totals"]
    print(
        f"{totals['samples']} samples in {totals['shards']} shards, {totals['rejected']} rejected "
        f"(see {Path(args.output) / REJECTED_FILE})"
    )
    return 0


def _fail(command: str, message: object, code: int) -> int:
    print(redact_uri(f"samadapt {command}: {message}"), file=sys.stderr)
    return code


# --------------------------------------------------------------------------------------------
# samadapt inspect
# --------------------------------------------------------------------------------------------


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samadapt inspect",
        description="``samadapt inspect``: what a shard set holds, and a picture to check it "
        "before training.",
    )
    p.add_argument("output", help="output folder of samadapt shard")
    p.add_argument("--sheet", default=None, help="contact sheet PNG (default OUTPUT/sheet.png)")
    p.add_argument("--samples", type=int, default=16, help="samples on the sheet")
    p.add_argument("--no-sheet", action="store_true", help="only print the summary")
    p.add_argument(
        "--verify", action="store_true", help="check every shard's size and sha256 first"
    )
    return p


def _inspect(argv: list[str]) -> int:
    """``samadapt inspect OUTPUT [--sheet PNG] [--samples N] [--no-sheet] [--verify]``: print the
    report (``sharding/inspect.py``), then draw the contact sheet. ``--verify`` re-hashes every
    shard against the manifest first and exits 1 naming each bad one."""
    args = _inspect_parser().parse_args(argv)
    from sharding.inspect import format_report, write_contact_sheet
    from sharding.manifest import load_manifest, load_summary, verify_shards

    try:
        manifest = load_manifest(args.output)
        summary = load_summary(args.output)
    except (OSError, ValueError) as err:
        return _fail("inspect", err, 2)
    print(format_report(args.output, manifest, summary))
    if args.verify:
        bad = verify_shards(args.output)
        for line in bad:
            print(f"samadapt inspect: damaged shard {line}", file=sys.stderr)
        if bad:
            n = len(manifest.shards)
            return _fail("inspect", f"{len(bad)} of {n} shards fail the manifest check", 1)
        print(f"verified: {len(manifest.shards)} shards match the manifest (size, sha256)")
    if args.no_sheet:
        return 0
    if args.samples < 1:
        return _fail("inspect", "--samples must be >= 1", 2)
    sheet_path = Path(args.sheet) if args.sheet else Path(args.output) / "sheet.png"
    try:
        drawn = write_contact_sheet(args.output, manifest, samples=args.samples, path=sheet_path)
    except OSError as err:
        return _fail("inspect", err, 1)
    if not drawn:
        print("no samples to draw (the shard set is empty)")
        return 0
    print(f"contact sheet of {drawn} samples: {sheet_path}")
    return 0


# --------------------------------------------------------------------------------------------
# samadapt train
# --------------------------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt train",
        description="Fine-tune SAM: interactive (SAM-Med2D) or prompt-free (SAMed/MA-SAM/AutoSAM).",
    )
    parser.add_argument("config", help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    return parser


def _train(argv: list[str]) -> int:
    """``samadapt train CONFIG [key=value ...]``: load the config, check it against the files,
    then train in this process (``launch.mode=local``, ``launch.ranks=1``), as N local ranks
    (``launch.ranks=N``) or through submitit (``launch.mode=submitit_local|slurm``); each rank
    runs ``train_worker``. A job requeued after preemption gets ``train.resume=auto``."""
    args = _train_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)  # fail here, before any process starts
    from pipeline.model import WeightsError
    from pipeline.preflight import check_config

    try:
        # the base checkpoint too: a file that does not fit is one line
        check_config(cfg, world_size=cfg.launch.ranks * cfg.launch.nodes)
    except WeightsError as err:
        return _fail("train", err, 2)
    if cfg.launch.mode == "local" and cfg.launch.ranks == 1:
        return _run_rank(cfg)
    from launch import run

    return run(
        cfg=cfg.launch,
        entry=TRAIN_ENTRY,
        argv=argv,
        run_dir=cfg.run_dir,
        requeue_argv=["train.resume=auto"],
    )


def train_worker(argv: list[str]) -> int:
    """One rank of ``samadapt train`` (``argv`` = the command's own arguments), started by
    ``launch`` with the torch.distributed variables in its environment."""
    args = _train_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    return _run_rank(cfg)


def _run_rank(cfg: Config) -> int:
    """``run_rank``, with a base checkpoint that does not fit the model (``WeightsError``, raised
    before the model is built, so before any step or MLflow run) as one line naming the file."""
    from pipeline.model import WeightsError
    from pipeline.train import run_rank

    try:
        return run_rank(cfg)
    except WeightsError as err:
        return _fail("train", err, 2)


# --------------------------------------------------------------------------------------------
# samadapt model-info, samadapt export
# --------------------------------------------------------------------------------------------


def _model_info(argv: list[str]) -> int:
    """``samadapt model-info CONFIG [key=value ...] [--json]``."""
    parser = argparse.ArgumentParser(
        prog="samadapt model-info",
        description="Total / trainable parameters per part for a config (no weights loaded).",
    )
    parser.add_argument("config", help="config YAML")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides).model
    from pipeline.model.info import describe, format_table, parameter_table

    rows = parameter_table(cfg)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=1))
    else:
        print(describe(cfg))
        print(format_table(rows))
    sys.stdout.flush()
    return 0


def _export_parser(dtypes: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt export",
        description="Write the trained tensors of a model (PEFT, trained SAM parts, head), its "
        "config and its base (the checkpoint's path and sha256, or the random base's tensors) "
        "to a file; load it with pipeline.model.load_exported.",
    )
    parser.add_argument("config", help="the run's config YAML (e.g. RUN_DIR/config.yaml)")
    parser.add_argument("state", help="trained weights: a torch.save file or DeepSpeed checkpoint")
    parser.add_argument("out", help="output file (.pt)")
    parser.add_argument("--dtype", choices=dtypes, default="fp32")
    parser.add_argument(
        "--merged",
        default=None,
        metavar="FILE",
        help="also write a full state dict with LoRA/FacT folded into the base weights (needs "
        "model.checkpoint); with only LoRA/FacT and head=sam it loads into stock SAM",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def _export(argv: list[str]) -> int:
    """``samadapt export CONFIG STATE OUT [--dtype bf16] [--merged FILE] [key=value ...]``."""
    from pipeline.model import WeightsError
    from pipeline.model.export import DTYPES, export_state, write_merged

    args = _export_parser(sorted(DTYPES)).parse_intermixed_args(argv)
    root = load_config(args.config, args.overrides)
    cfg = root.model
    try:
        out = export_state(cfg, args.state, args.out, dtype=args.dtype, seed=root.seed)
    except WeightsError as err:
        raise SystemExit(f"samadapt export: {err}") from None
    if args.merged:
        if not cfg.checkpoint:
            raise SystemExit(
                "samadapt export: --merged needs the base weights: set model.checkpoint"
            )
        write_merged(out, args.merged)
    return 0


# --------------------------------------------------------------------------------------------
# samadapt eval
# --------------------------------------------------------------------------------------------


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt eval",
        description="Score a trained promptable 2D model on a shard split with SAM-Med2D's and "
        "the CVPR 2025 challenge's protocols, beside its untrained base and trivial baselines; "
        "tables, a Markdown report, plots and overlays to --out and to MLflow.",
    )
    parser.add_argument("config", help="the run's config YAML (RUN_DIR/config.yaml)")
    parser.add_argument("model", help="checkpoint folder (RUN_DIR/checkpoints/step-N) or export")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    parser.add_argument("--split", default="test", help="train, val or test (default test)")
    parser.add_argument("--shards", default=None, help="shard folder (default data.shards)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/eval/...)")
    parser.add_argument("--max-samples", type=int, default=0, help="images (0 = all)")
    parser.add_argument("--clicks", type=int, default=5, help="CVPR protocol clicks (5)")
    parser.add_argument(
        "--iter-point", type=int, default=5, help="SAM-Med2D point protocol passes (5)"
    )
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance, mm")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if any)")
    parser.add_argument("--no-mlflow", action="store_true", help="write files only")
    return parser


def _eval(argv: list[str]) -> int:
    """``samadapt eval CONFIG MODEL [key=value ...] [--split S] [--shards DIR] [--out DIR]
    [--max-samples N] ...``: see ``pipeline/eval/run.py``. Exit 2 with one line for a bad
    model file, split or shard folder."""
    args = _eval_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    if args.max_samples < 0:
        return _fail("eval", "--max-samples must be >= 0", 2)
    cfg = load_config(args.config, overrides)
    from pipeline.data.samples import SampleError
    from pipeline.eval.run import evaluate
    from pipeline.model import WeightsError

    try:
        result = evaluate(
            cfg,
            args.model,
            split=args.split,
            out=args.out,
            max_samples=args.max_samples,
            clicks=args.clicks,
            iter_point=args.iter_point,
            tolerance=args.nsd_tolerance,
            track=not args.no_mlflow,
            device=args.device,
        )
    except ConfigError:
        raise  # main's one-line "config error"
    except (ValueError, WeightsError, SampleError, OSError) as err:
        return _fail("eval", err, 2)
    from pipeline.eval.report import box_table

    base = "zero-shot" if cfg.model.checkpoint else "untrained"
    print("\n".join(box_table(result.summary, untrained=base)))
    print(f"evaluation report: {result.report}")
    if result.run_id:
        print(f"MLflow run {result.run_id} (evaluation of {cfg.run_dir})")
    return 0


# --------------------------------------------------------------------------------------------
# samadapt predict
# --------------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


def _predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samadapt predict",
        description="Label NIfTI files, DICOM series folders and PNG/JPEG images with a trained "
        "model: a label volume in each input's geometry (NIfTI), or PNG masks of the original "
        "size, plus optional overlays.",
    )
    parser.add_argument("config", help="the run's config YAML (RUN_DIR/config.yaml)")
    parser.add_argument("model", help="checkpoint folder (RUN_DIR/checkpoints/step-N) or export")
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="NIfTI file, DICOM series folder, image, or a folder of NIfTI files / images; "
        "key=value arguments (that are not files) override the config",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prompts", default=None, help="prompts JSON (promptable heads)")
    parser.add_argument("--overlays", action="store_true", help="also write overlay PNGs")
    parser.add_argument(
        "--classes", default=None, help="prompt-free heads: class ids to write, e.g. 1,3"
    )
    parser.add_argument("--modality", default="", help="ct, mr, ... for inputs that state none")
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: GPU if any)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _predict(argv: list[str]) -> int:
    """``samadapt predict CONFIG MODEL INPUT... --out DIR [--prompts JSON] [--overlays] ...``:
    see ``pipeline/predict/run.py``. Exit 2 with one line for a bad model, prompts file or
    option; 1 when some inputs failed (each listed with one line, the others written)."""
    args = _predict_parser().parse_intermixed_args(argv)
    overrides = [a for a in args.inputs if _OVERRIDE.match(a) and not Path(a).exists()]
    inputs = [a for a in args.inputs if a not in overrides]
    if not inputs:
        return _fail("predict", "no INPUT given", 2)
    try:
        classes = [int(c) for c in args.classes.split(",")] if args.classes else None
    except ValueError:
        return _fail("predict", f"--classes: expected ids like 1,3, got {args.classes!r}", 2)
    cfg = load_config(args.config, overrides)
    from pipeline.model import WeightsError
    from pipeline.predict.run import predict

    try:
        result = predict(
            cfg,
            args.model,
            inputs,
            sharding=cfg.sharding,
            out=args.out,
            prompts=args.prompts,
            overlays=args.overlays,
            classes=classes,
            modality=args.modality,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
        )
    except ConfigError:
        raise  # main's one-line "config error"
    except (ValueError, WeightsError, OSError) as err:
        return _fail("predict", err, 2)
    print(f"{len(result.written)} labelled, written to {result.out}")
    for failure in result.failures:
        print(f"samadapt predict: {failure.message}", file=sys.stderr)
    if result.failures:
        n = len(result.failures)
        return _fail("predict", f"{n} of {n + len(result.written)} inputs failed (listed above)", 1)
    return 0


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

# name -> (function, one-line help)
COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "shard": (_shard, "corpus -> WebDataset shards + Zarr volumes"),
    "inspect": (_inspect, "print a shard set's summary, draw a contact sheet"),
    "train": (_train, "train SAM (interactive or prompt-free), tracked in MLflow"),
    "model-info": (_model_info, "parameters per model part (total / trainable)"),
    "export": (_export, "write a model's trained tensors + config (small)"),
    "eval": (_eval, "score a trained model: protocols, baselines, report, MLflow"),
    "predict": (_predict, "label NIfTI / DICOM / images with a trained model"),
}


def _usage() -> str:
    lines = ["usage: samadapt COMMAND [ARGS ...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "samadapt COMMAND -h shows a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``samadapt COMMAND [ARGS ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactFilter())  # no URI password in any log line
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"samadapt: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(COMMANDS[name][0](rest) or 0)
    except ConfigError as err:
        print(redact_uri(f"samadapt {name}: config error: {err}"), file=sys.stderr)
        return 2
