"""``train.embedding_cache``: a frozen encoder's embeddings are computed once per distinct image.

The cache on the real tiny model (its encoder's forwards counted by a hook), on disk across
cache instances, keyed by the pixels and the encoder's weights; and a real training run whose
per-step losses match the uncached run's while most encodes are served from the cache.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL_SIZE, TINY_MODEL
from mlflow.tracking import MlflowClient

from configtree import ConfigError
from pipeline.embedding_cache import EmbeddingCache, build_embedding_cache, cache_mode
from pipeline.model import build_model
from samadapt.config import load_config

FROZEN = [*TINY_MODEL, f"model.image_size={SMALL_SIZE}", "model.peft=[]",
          "model.train_encoder=false"]  # fmt: skip


def _model(seed: int = 0):
    cfg = load_config(ROOT / "configs/debug.yaml", FROZEN)
    torch.manual_seed(seed)
    model = build_model(cfg=cfg.model).eval()
    calls: list[int] = []
    model.image_encoder.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return model, calls


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SMALL_SIZE, SMALL_SIZE), generator=g, dtype=torch.uint8)


def test_memory_cache_encodes_each_distinct_image_once():
    model, calls = _model()
    cache = EmbeddingCache(model, max_bytes=10**9)
    a, b = _images(3, 1), _images(2, 2)
    with torch.no_grad():
        direct = model({"images": torch.cat([a, b])}, "encode")
    calls.clear()
    first = cache(a)
    assert calls == [1 + 2] and cache.hit_rate == 0  # one batched forward for the 3 misses
    both = cache(torch.cat([a[1:], b]))  # 2 hits, 2 misses
    assert calls == [3, 2] and cache.hits == 2 and cache.misses == 5
    assert torch.equal(both[:2], first[1:])
    torch.testing.assert_close(torch.cat([first, both[2:]]), direct, rtol=1e-5, atol=1e-6)
    # a flipped image is other pixels: a miss, never the unflipped image's embedding
    cache(a[:1].flip(-1))
    assert calls == [3, 2, 1]


def test_disk_cache_survives_the_process_and_follows_the_weights(tmp_path):
    model, calls = _model()
    cfg = load_config(ROOT / "configs/debug.yaml", [*FROZEN, "train.embedding_cache=disk",
                                                     f"run_dir={tmp_path}"])  # fmt: skip

    class Engine:  # what build_embedding_cache needs of pipeline.engine.Engine, on one process
        device = torch.device("cpu")

        def __call__(self, batch, mode):
            return model(batch, mode)

        def frozen_state_dict(self):
            return {k: v for k, v in model.state_dict().items()}

    images = _images(4, 3)
    first = build_embedding_cache(cfg, Engine())(images)
    (root,) = (tmp_path / "embedding_cache").iterdir()
    assert len(list(root.glob("*/*.npy"))) == 4
    again = build_embedding_cache(cfg, Engine())  # a resumed run: a new cache on the same files
    assert torch.equal(again(images), first) and calls == [4] and again.hit_rate == 1
    with torch.no_grad():  # other encoder weights: another folder, encoded afresh
        model.image_encoder.neck[0].weight.add_(1e-3)
    other = build_embedding_cache(cfg, Engine())
    assert other.root != root
    assert not torch.allclose(other(images), first) and calls == [4, 4]


def test_cache_mode_follows_the_encoder_and_refuses_what_cannot_work():
    def mode(*extra: str) -> str:
        return cache_mode(load_config(ROOT / "configs/debug.yaml", [*FROZEN, *extra]))

    assert mode() == "memory"
    assert mode("model.train_encoder=true") == "none"
    assert mode("model.peft=[lora]") == "none"
    assert mode("train.zero_stage=3") == "none"
    assert mode("train.embedding_cache=none") == "none"
    with pytest.raises(ConfigError, match=r"train\.embedding_cache=disk .*the encoder trains"):
        load_config(ROOT / "configs/debug.yaml",
                    [*FROZEN, "model.peft=[lora]", "train.embedding_cache=disk"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.embedding_cache=memory needs .*zero_stage < 3"):
        load_config(ROOT / "configs/debug.yaml",
                    [*FROZEN, "train.zero_stage=3", "train.embedding_cache=memory"])  # fmt: skip


def _run(shards, run_dir, cache: str) -> dict[str, dict[int, float]]:
    cmd = [sys.executable, "-m", "samadapt", "train", str(ROOT / "configs/debug.yaml"), *FROZEN,
           f"run_dir={run_dir}", f"data.shards={shards}", "data.num_workers=0",
           "data.batch_size=8", "data.shuffle_buffer=8", "train.steps=8", "train.log_every=1",
           "train.interaction_steps=3", "train.val_every=4", "train.checkpoint_every=0",
           f"train.embedding_cache={cache}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve()}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    return {
        key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        for key in ("loss", "val/dice_box", "embedding_cache_hit_rate")
    }


def test_training_with_the_cache_gives_the_uncached_losses(small_shards, tmp_path):
    plain = _run(small_shards, tmp_path / "plain", "none")
    cached = _run(small_shards, tmp_path / "cached", "memory")
    assert sorted(cached["loss"]) == list(range(1, 9)) and not plain["embedding_cache_hit_rate"]
    for step, loss in plain["loss"].items():
        assert cached["loss"][step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step
    for step, dice in plain["val/dice_box"].items():
        assert cached["val/dice_box"][step] == pytest.approx(dice, rel=1e-4, abs=1e-6), step
    # 64 training images of a 40-image split (the stream wraps into its next epoch) and the
    # validation split scored twice: a part of the encodes came from the cache
    assert cached["embedding_cache_hit_rate"][8] > 0.2


def test_fingerprint_covers_every_tensor_kind():
    from pipeline.embedding_cache import encoder_fingerprint

    base = {"w": torch.ones(2, 2), "bn.num_batches_tracked": torch.tensor(3)}  # 0-dim int64
    same = encoder_fingerprint(base, {"image_size": 256})
    assert same == encoder_fingerprint(dict(base), {"image_size": 256})
    assert same != encoder_fingerprint({**base, "bn.num_batches_tracked": torch.tensor(4)},
                                       {"image_size": 256})  # fmt: skip
    assert same != encoder_fingerprint(base, {"image_size": 128})
