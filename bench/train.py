"""Training images/s and peak memory: our interaction loop vs SAM-Med2D's ``train_one_epoch``.

Both sides train the same model size (ViT-B by default, random weights, SAM-Med2D adapters in
every encoder block), at the same image size (256), masks per image (5) and interaction steps
(1 prompt step + 8 decoder-only re-prompt steps), each step its own optimizer step:

* peer: ``train_one_epoch`` of SAM-Med2D's ``train.py`` (github.com/OpenGVLab/SAM-Med2D, fetched at
  run time into a temporary folder, never stored here), called as its ``main()`` sets it up:
  its own ``parse_args()`` defaults, ``sam_model_registry[model_type](args)`` with
  ``sam_checkpoint=None`` (no weights here), ``optim.Adam(model.parameters(), lr)``,
  ``FocalDiceloss_IoULoss()``, its ``TrainingDataset`` + ``DataLoader(batch_size=2, shuffle)`` on
  a synthetic corpus in the SA-Med2D layout. Its ``from apex import amp`` is satisfied by an
  empty stand-in (only ``--use_amp`` would touch it; the peer's default is fp32).
* ours: ``pipeline.steps.interactive_step`` on the DeepSpeed engine, one rank, as
  ``pipeline.trainer.Trainer.train_step`` calls it (config ``configs/base.yaml``, or
  ``configs/debug.yaml`` for ``--arch tiny``), batches from ``build_train_loader`` on the same
  corpus sharded by ``samadapt shard``; one device -> host transfer of the step losses per batch,
  as the trainer's logging does.

Each side runs in its own worker process (the peer imports its own copy of ``segment_anything``,
we import the installed one; separate processes also give each its own peak memory). The parent
sends "run N batches" to the workers in turn, so the timed windows interleave (peer, ours, peer,
ours ...) after a warm-up, and reports the median images/s per wall-clock second and per CPU
second, the ratios ours / peer, and peak memory: the worker's peak RSS on CPU (whole process,
model build included), ``torch.cuda.max_memory_allocated`` over the timed windows on a GPU.

    python bench/train.py --peer-src /path/to/SAM-Med2D           # CPU, ViT-B, fp32, batch 2
    python bench/train.py --device cuda --precision bf16 --batch-size 16   # GPU: ours at bf16
    python bench/train.py --arch tiny                              # ours only (smoke run)

``--precision``, ``--batch-size`` and ``--set`` change our side only; the peer always runs at its
defaults (fp32, batch 2), which is the comparison the targets are stated against.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CACHE,
    REPO,
    corpus_items,
    ensure_corpus,
    setup_logging,
    shard_with_cli,
    write_json,
)

log = logging.getLogger("bench.train")

PEER_URL = "https://github.com/OpenGVLab/SAM-Med2D"
PEER_FILES = ("train.py", "utils.py", "DataLoader.py", "metrics.py")
PEER_PACKAGE = "segment_anything"
PEER_ARCHS = ("vit_b", "vit_l", "vit_h")
LOG_DIR = CACHE / "train-logs"


# --------------------------------------------------------------------------------------------
# The peer's source
# --------------------------------------------------------------------------------------------


def _git(repo: Path, *args: str, text: bool = True) -> Any:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=text)  # fmt: skip
    return done.stdout


def _describe_source(src: Path) -> str:
    try:
        return f"{src} (commit {_git(src, 'rev-parse', 'HEAD').strip()[:12]})"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return f"{src} (commit unknown)"


def peer_source(peer_src: str | None, dest: Path) -> str:
    """Put SAM-Med2D's train.py, utils.py, DataLoader.py, metrics.py and its ``segment_anything``
    package into ``dest``.

    Arguments:
      peer_src: a checkout holding those files, or a git repository (bare or not) to extract them
        from at HEAD; None = ``git clone --depth 1`` of the public repository into ``.bench/``.
      dest: an empty folder outside the tracked files.

    Returns:
      Where the files came from (path and commit). Exits with a message when they cannot be had.
    """
    if peer_src is None:
        clone = CACHE / "SAM-Med2D"
        if not (clone / ".git").is_dir():
            shutil.rmtree(clone, ignore_errors=True)
            log.info("cloning %s into %s", PEER_URL, clone)
            done = subprocess.run(["git", "clone", "--depth", "1", PEER_URL, str(clone)],
                                  capture_output=True, text=True)  # fmt: skip
            if done.returncode != 0:
                shutil.rmtree(clone, ignore_errors=True)
                raise SystemExit(
                    f"bench/train.py: cannot clone {PEER_URL} (offline? "
                    f"{done.stderr.strip()[-200:]}).\nPass the peer's source with --peer-src "
                    "PATH: a SAM-Med2D checkout, or a git repository of it (bare works)."
                )
        peer_src = str(clone)
    src = Path(peer_src)
    if all((src / name).is_file() for name in PEER_FILES) and (src / PEER_PACKAGE).is_dir():
        for name in PEER_FILES:
            shutil.copy(src / name, dest / name)
        shutil.copytree(src / PEER_PACKAGE, dest / PEER_PACKAGE)
        return _describe_source(src)
    try:
        for name in PEER_FILES:
            (dest / name).write_text(_git(src, "show", f"HEAD:{name}"))
        archive = _git(src, "archive", "--format=tar", "HEAD", PEER_PACKAGE, text=False)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        detail = getattr(err, "stderr", "") or err
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise SystemExit(
            f"bench/train.py: --peer-src {src} is neither a checkout holding "
            f"{', '.join(PEER_FILES)} and {PEER_PACKAGE}/ nor a git repository with them at HEAD "
            f"({str(detail).strip()[-200:]})"
        ) from None
    return _describe_source(src)


def peer_data_dir(corpus: Path, dest: Path) -> Path:
    """``dest/image2label_train.json`` over the corpus in absolute paths (the peer opens paths as
    given, relative to the working directory)."""
    mapping = {str(img): [str(m) for m in masks] for img, masks in corpus_items(corpus)}
    (dest / "image2label_train.json").write_text(json.dumps(mapping))
    return dest


# --------------------------------------------------------------------------------------------
# Workers (separate processes; one JSON line per command and per answer)
# --------------------------------------------------------------------------------------------


def _cpu_seconds() -> float:
    """CPU seconds of this process, its finished children and its live children (DataLoader
    workers)."""
    import psutil

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + children.ru_utime + children.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Side:
    """What a worker runs: ``setup()`` once, then ``batches(n)`` -> images trained."""

    info: dict[str, Any]

    def setup(self, spec: dict) -> None:
        raise NotImplementedError

    def batches(self, n: int) -> int:
        raise NotImplementedError


class _Peer(_Side):
    """SAM-Med2D's train_one_epoch, set up as its main() does."""

    def setup(self, spec: dict) -> None:
        import types

        src = spec["peer_dir"]
        for name in ("train", "utils", "DataLoader", "metrics", "segment_anything"):
            if name in sys.modules:
                raise SystemExit(f"bench/train.py: a module {name!r} is already imported")
        # train.py imports apex.amp at the top but uses it only with --use_amp (default off).
        apex = types.ModuleType("apex")
        apex.amp = types.SimpleNamespace()  # any use fails with AttributeError
        sys.modules["apex"] = apex
        sys.path.insert(0, src)
        import random

        import numpy as np
        import torch

        random.seed(spec["seed"])
        np.random.seed(spec["seed"])
        torch.manual_seed(spec["seed"])
        sys.argv = ["train.py", "--device", spec["device"], "--model_type", spec["arch"],
                    "--image_size", str(spec["image_size"]), "--mask_num", str(spec["mask_num"]),
                    "--iter_point", str(spec["steps"] - 1)]  # fmt: skip
        peer = __import__("train")
        sam = sys.modules["segment_anything"]
        for module in (peer, sam):
            if not Path(module.__file__).resolve().is_relative_to(Path(src).resolve()):
                raise SystemExit(f"bench/train.py: {module.__name__} came from {module.__file__}")
        args = peer.parse_args()
        args.sam_checkpoint = None  # no weights here: random init, as _build_sam allows
        self.args, self.peer = args, peer
        self.model = peer.sam_model_registry[args.model_type](args).to(args.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        self.criterion = peer.FocalDiceloss_IoULoss()
        self.model.train()
        self.dataset = peer.TrainingDataset(
            spec["data_dir"], image_size=args.image_size, mode="train", point_num=1,
            mask_num=args.mask_num, requires_name=False,
        )  # fmt: skip
        self.workers = spec["workers"]
        self.epoch = 0
        self.generator = torch.Generator().manual_seed(spec["seed"])
        n_train = sum(
            p.numel() for n, p in self.model.named_parameters()
            if "Adapter" in n or not n.startswith("image_encoder")
        )  # fmt: skip
        self.info = {
            "batch_size": args.batch_size,
            "precision": "fp16 (apex)" if args.use_amp else "fp32",
            "trainable_params": n_train,
            "params": sum(p.numel() for p in self.model.parameters()),
        }

    def batches(self, n: int) -> int:
        from torch.utils.data import DataLoader, RandomSampler

        bs = self.args.batch_size
        # The epoch's loader, cut to n batches (shuffle=True in the peer's main: a random order).
        sampler = RandomSampler(self.dataset, num_samples=n * bs, generator=self.generator)
        loader = DataLoader(self.dataset, batch_size=bs, sampler=sampler,
                            num_workers=self.workers)  # fmt: skip
        self.peer.train_one_epoch(
            self.args, self.model, self.optimizer, loader, self.epoch, self.criterion
        )
        self.epoch += 1
        return n * bs


class _Ours(_Side):
    """pipeline.steps.interactive_step on the DeepSpeed engine, as the trainer calls it."""

    def setup(self, spec: dict) -> None:
        import torch

        from pipeline.data.stream import build_train_loader
        from pipeline.distributed import dist_env
        from pipeline.engine import build_engine, init_distributed
        from pipeline.model import build_model
        from pipeline.steps import interactive_step
        from samadapt.config import load_config

        cfg = load_config(spec["config"], spec["overrides"])
        self.cfg = cfg
        env = dist_env()
        init_distributed(env)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg=cfg.model)
        groups = model.param_groups()
        self.phases = tuple(groups)
        self.engine = build_engine(model=model, param_groups=groups, train=cfg.train,
                                   batch_size=cfg.data.batch_size, env=env)  # fmt: skip
        self.plan_gen = torch.Generator().manual_seed(cfg.seed * 1009)
        self.click_gen = torch.Generator(device=self.engine.device)
        self.click_gen.manual_seed(cfg.seed * 2003 + env.rank)
        self.step = 0
        self._interactive_step = interactive_step

        def endless():
            epoch = 0
            while True:
                loader = build_train_loader(cfg=cfg.data, image_size=cfg.model.image_size,
                                            rank=env.rank, world_size=env.world_size,
                                            epoch=epoch)  # fmt: skip
                yield from loader
                epoch += 1

        self.stream = endless()
        self.info = {
            "batch_size": cfg.data.batch_size,
            "precision": cfg.train.precision,
            "zero_stage": cfg.train.zero_stage,
            "trainable_params": sum(p.numel() for ps in groups.values() for p in ps),
            "params": sum(p.numel() for p in model.parameters()),
            "device": str(self.engine.device),
        }

    def batches(self, n: int) -> int:
        images = 0
        for _ in range(n):
            batch = next(self.stream)
            out = self._interactive_step(
                self.engine, batch, train=self.cfg.train, step=self.step,
                plan_generator=self.plan_gen, click_generator=self.click_gen, phases=self.phases,
            )  # fmt: skip
            out["loss_steps"].cpu()  # the trainer's one transfer per step (its sync point)
            self.step += 1
            images += int(batch["image"].shape[0])
        return images


def worker_main(side: str, spec_path: str) -> int:
    """A worker: set up, answer "ready", then time each ``{"run": n}`` command."""
    # Our answers go to the original stdout; anything the code under test prints goes to stderr.
    channel: IO[str] = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")  # fmt: skip
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    runner: _Side = _Peer() if side == "peer" else _Ours()
    runner.setup(spec)
    runner.batches(spec["warmup"])
    if cuda:
        torch.cuda.synchronize()
    info = dict(runner.info, rss_ready_mib=_rss_mib(), peak_rss_mib=_peak_rss_mib())
    channel.write(json.dumps({"ready": info}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if "run" not in command:
            break
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        images = runner.batches(int(command["run"]))
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        result = {"images": images, "wall": wall, "cpu": cpu, "peak_rss_mib": _peak_rss_mib()}
        if cuda:
            result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        channel.write(json.dumps(result) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------------------------


@dataclass
class Worker:
    """A running worker process and its timed windows."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(
                f"bench/train.py: the {self.name} worker ended (exit {code}); the end of its "
                f"log {self.log_path}:\n{tail}"
            )
        return json.loads(line)

    def ready(self) -> None:
        self.info = self._answer()["ready"]

    def run(self, batches: int) -> dict:
        self.proc.stdin.write(json.dumps({"run": batches}) + "\n")
        self.proc.stdin.flush()
        result = self._answer()
        self.runs.append(result)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)

    def rate(self, key: str = "wall") -> float:
        return statistics.median(r["images"] / r[key] for r in self.runs)

    def peak_mib(self) -> float:
        key = "cuda_peak_mib" if "cuda_peak_mib" in self.runs[0] else "peak_rss_mib"
        return max(r[key] for r in self.runs)


def start_worker(name: str, spec: dict, tmp: Path, *, device: str, threads: int) -> Worker:
    spec_path = tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{name}.log"
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[key] = str(threads)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations asks PyPI for a newer version
    env["TQDM_MININTERVAL"] = "5"  # the peer's progress bar, into the log
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # our engine picks nccl/cuda whenever a GPU is visible
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)  # one rank of its own
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", name, str(spec_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
            cwd=REPO, env=env,
        )  # fmt: skip
    log.info("started the %s worker (pid %d, log %s)", name, proc.pid, log_path)
    return Worker(name, proc, log_path)


def our_overrides(args: argparse.Namespace, shards: Path) -> list[str]:
    out = [
        f"data.shards={shards}",
        f"model.image_size={args.image_size}",
        f"data.mask_num={args.mask_num}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"train.interaction_steps={args.steps}",
        f"train.precision={args.precision}",
        f"seed={args.seed}",
        "model.peft=[sam_med2d_adapter]",
        "model.head=sam",
        "tracking.enabled=false",
    ]
    if args.arch != "tiny":
        out.append(f"model.arch={args.arch}")
    return out + list(args.set)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-src", default=None, help="SAM-Med2D checkout or git repository")
    p.add_argument("--arch", choices=(*PEER_ARCHS, "tiny"), default="vit_b",
                   help="encoder size (vit_b); tiny = ours only, a smoke run")  # fmt: skip
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="ours only (the peer runs fp32, its default)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=2,
                   help="ours only: images per step (the peer: 2, its default)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--mask-num", type=int, default=5, help="masks per image (5)")
    p.add_argument("--steps", type=int, default=9, help="interaction steps per batch (1 + 8)")
    p.add_argument("--batches", type=int, default=3, help="batches per timed window (3)")
    p.add_argument("--repeats", type=int, default=2, help="timed windows per side (2)")
    p.add_argument("--warmup", type=int, default=1, help="batches before the clock (1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per side (default: all cores)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers, both sides (default 0 on CPU, 4 on GPU as the "
                        "peer's main)")  # fmt: skip
    p.add_argument("--cases", type=int, default=100, help="corpus cases (100 x 4 images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="our config override (repeatable): model.fused_attention=true")  # fmt: skip
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "SPEC"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = 4 if args.device == "cuda" else 0
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    for key in ("batches", "repeats", "batch_size", "mask_num", "steps", "threads"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def check_device(device: str) -> str:
    """A description of the device; exits with a clear message when --device cuda has no GPU."""
    import torch

    if device == "cpu":
        return f"CPU, {os.cpu_count()} cores"
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/train.py: --device cuda but no GPU is visible here (torch.cuda.is_available() "
            "is False). Run it on a GPU machine, or use --device cpu."
        )
    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    setup_logging()
    where = check_device(args.device)
    with_peer = args.arch in PEER_ARCHS
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        peer_dir = tmp / "sam-med2d"
        peer_dir.mkdir()
        origin = None
        if with_peer:
            origin = peer_source(args.peer_src, peer_dir)  # first: fail before the slow set-up
        else:
            log.info("--arch tiny: SAM-Med2D has vit_b/l/h only; the peer is skipped")
        corpus = ensure_corpus(cases=args.cases, slices=4)
        from sharding.format import FORMAT_VERSION

        # Keyed on the shard format, so a cache written by an older reader is never reused.
        shards = shard_with_cli(
            corpus, CACHE / f"{corpus.name}-shards{args.image_size}-v{FORMAT_VERSION}",
            [f"image_size={args.image_size}", "inputs_per_shard=25", "val_fraction=0",
             "test_fraction=0"],
        )  # fmt: skip
        common = {"device": args.device, "threads": args.threads, "warmup": args.warmup,
                  "seed": args.seed, "workers": args.workers}  # fmt: skip
        config = REPO / "configs" / ("debug.yaml" if args.arch == "tiny" else "base.yaml")
        ours_spec = dict(common, config=str(config), overrides=our_overrides(args, shards))
        log.info("device: %s; torch threads %d per side; DataLoader workers %d; load average "
                 "%.2f %.2f %.2f", where, args.threads, args.workers,
                 *os.getloadavg())  # fmt: skip
        log.info("ours: %s %s", config.name, " ".join(ours_spec["overrides"]))
        workers = [start_worker("ours", ours_spec, tmp, device=args.device, threads=args.threads)]
        if with_peer:
            log.info("peer: SAM-Med2D train_one_epoch from %s", origin)
            peer_spec = dict(common, peer_dir=str(peer_dir), arch=args.arch,
                             data_dir=str(peer_data_dir(corpus, tmp)), image_size=args.image_size,
                             mask_num=args.mask_num, steps=args.steps)  # fmt: skip
            workers.insert(0, start_worker("peer", peer_spec, tmp, device=args.device,
                                           threads=args.threads))  # fmt: skip
        try:
            # Set up one at a time: building ViT-B on a shared machine is slow enough already.
            for w in workers:
                w.ready()
                log.info("%s ready: %s", w.name, w.info)
            for r in range(args.repeats):
                for w in workers:
                    res = w.run(args.batches)
                    log.info("[%d/%d] %-4s %d images in %6.1f s: %7.3f images/s  %7.3f "
                             "images/cpu-s", r + 1, args.repeats, w.name, res["images"],
                             res["wall"], res["images"] / res["wall"],
                             res["images"] / res["cpu"])  # fmt: skip
        finally:
            for w in workers:
                w.close()
    report(args, workers, origin)
    return 0


def report(args: argparse.Namespace, workers: list[Worker], origin: str | None) -> None:
    gpu = args.device == "cuda"
    mem = "peak CUDA MiB" if gpu else "peak RSS MiB"
    log.info("")
    log.info("%-5s %6s %9s %12s %14s %14s", "side", "batch", "precision", "images/s",
             "images/cpu-s", mem)  # fmt: skip
    for w in workers:
        log.info("%-5s %6d %9s %12.3f %14.3f %14.0f", w.name, w.info["batch_size"],
                 w.info["precision"], w.rate(), w.rate("cpu"), w.peak_mib())  # fmt: skip
    by = {w.name: w for w in workers}
    ratios = {}
    if "peer" in by:
        ours, peer = by["ours"], by["peer"]
        ratios = {
            "wall": ours.rate() / peer.rate(),
            "cpu": ours.rate("cpu") / peer.rate("cpu"),
            "memory": ours.peak_mib() / peer.peak_mib(),
        }
        target = 5 if gpu else 2
        log.info("ours / peer: %.2fx images/s, %.2fx images/cpu-s (target >= %dx); peak memory "
                 "%.2fx", ratios["wall"], ratios["cpu"], target, ratios["memory"])  # fmt: skip
    log.info("load average at end %.2f %.2f %.2f", *os.getloadavg())
    write_json(args.json, {
        "peer_source": origin,
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "ratios": ratios,
        "sides": {w.name: {"info": w.info, "runs": w.runs, "images_per_s": w.rate(),
                           "images_per_cpu_s": w.rate("cpu"), "peak_mib": w.peak_mib()}
                  for w in workers},
    })  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
