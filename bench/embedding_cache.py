"""Frozen-encoder speed: training steps per second with ``train.embedding_cache`` against
without, measured in one run on the same batches.

The model is the quickstart's (``configs/brain_mri.yaml``: LiteMedSAM, encoder frozen, prompt
encoder + mask decoder trained), on DeepSpeed as the trainer runs it, on shards of the brain MRI
corpus (written under ``.bench/`` on first use). Both sides run ``pipeline.steps.interactive_step``
on the same batches, interleaved in rounds (uncached, cached, uncached, ...); the cached side's
cache is filled by one pass over the batches first, which is where every epoch after the first
stands. Prints seconds per step of each side and the ratio (median over rounds).

    python bench/embedding_cache.py [--steps 4] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, setup_logging  # noqa: E402

log = logging.getLogger("bench")


def _shards() -> Path:
    """The quickstart's corpus, sharded once under .bench/."""
    from samadapt.config import load_config
    from sharding.brain_mri import write_brain_mri
    from sharding.run import run_shard

    out = CACHE / "brain_mri" / "shards"
    if (out / "manifest.json").exists():
        return out
    corpus = CACHE / "brain_mri" / "corpus"
    if not (corpus / "dataset.json").exists():
        write_brain_mri(corpus)
    cfg = load_config(REPO / "configs/brain_mri.yaml").sharding
    run_shard("nifti", corpus, out, cfg=cfg, workers=1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    setup_logging()
    import torch

    from pipeline.data.stream import build_train_loader
    from pipeline.distributed import dist_env
    from pipeline.embedding_cache import EmbeddingCache
    from pipeline.engine import build_engine, init_distributed
    from pipeline.model import build_model
    from pipeline.steps import build_loss, interactive_step
    from samadapt.config import load_config

    shards = _shards()
    cfg = load_config(REPO / "configs/brain_mri.yaml", [f"data.shards={shards}", *args.overrides])
    env = dist_env()
    init_distributed(env)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg=cfg.model)
    groups = model.param_groups()
    engine = build_engine(model=model, param_groups=groups, train=cfg.train,
                          batch_size=cfg.data.batch_size, env=env)  # fmt: skip
    loader = build_train_loader(cfg=cfg.data, image_size=cfg.model.image_size, rank=0,
                                world_size=1, epoch=0, mode="interactive")  # fmt: skip
    batches = [b for _, b in zip(range(args.steps), loader, strict=False)]
    cache = EmbeddingCache(engine, max_bytes=int(8e9))
    for batch in batches:  # an epoch after the first: every image already encoded
        cache(batch["image"].to(engine.device))
    loss_fn = build_loss(cfg.train)
    plan, click = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    step = 0
    for _ in range(args.rounds):
        for side, encode in (("uncached", None), ("cached", cache)):
            start = time.perf_counter()
            for batch in batches:
                interactive_step(engine, batch, train=cfg.train, step=step, plan_generator=plan,
                                 click_generator=click, phases=tuple(groups), loss_fn=loss_fn,
                                 encode=encode)  # fmt: skip
                step += 1
            times[side].append((time.perf_counter() - start) / len(batches))
    slow, fast = (statistics.median(times[k]) for k in ("uncached", "cached"))
    masks = cfg.data.batch_size * cfg.data.mask_num
    log.info("model %s, %d images and %d masks per step, %d interaction step(s), %d threads",
             cfg.model.arch, cfg.data.batch_size, masks, cfg.train.interaction_steps,
             torch.get_num_threads())  # fmt: skip
    log.info("s/step  uncached %.2f  cached %.2f  (rounds: %s / %s)", slow, fast,
             ", ".join(f"{t:.2f}" for t in times["uncached"]),
             ", ".join(f"{t:.2f}" for t in times["cached"]))  # fmt: skip
    log.info("speed-up with the embedding cache: %.2fx", slow / fast)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
