"""Encoder forward+backward speed and peak memory, each memory/speed switch on and off.

Every (size, switch) runs in its own process, so peak memory is clean. Memory is reported two
ways: the activations autograd keeps for the backward pass (bytes of the saved tensors that are
not parameters, counted with ``saved_tensors_hooks``: the same on any device, and what activation
checkpointing cuts) and, on a GPU, ``torch.cuda.max_memory_allocated`` over the timed steps.
Achieved TFLOP/s are model FLOPs (``torch.utils.flop_counter``, one forward+backward of the plain
model) over the measured step time, against the bf16 matmul peak measured in the same run (fp32
on a CPU, where bf16 matmuls are emulated).

  python bench/model.py                       # CPU: ViT-B at 128 px, batch 2: ratios
  python bench/model.py --preset gpu          # ViT-B @ 256 (batch 16) and ViT-H @ 1024 (batch 1)
  python bench/model.py --cases vit_b:256:4 --variants plain,fused,bf16 --steps 5

Ratios (images/s and memory relative to ``plain`` of the same case) are the portable numbers;
absolute ones depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench.model")

VARIANTS = {
    "plain": {},
    "fused": {"fused_attention": True},
    "ckpt": {"activation_checkpointing": True},
    "bf16": {"autocast_bf16": True},
    "compile": {"compile": True},
    "all": {
        "fused_attention": True,
        "activation_checkpointing": True,
        "autocast_bf16": True,
        "compile": True,
    },
}
PRESETS = {
    "cpu": ["vit_b:128:2"],
    "gpu": ["vit_b:256:16", "vit_h:1024:1"],
}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype_name: str, n: int, iters: int) -> float:
    """TFLOP/s of an n x n x n matmul in the given dtype (best of ``iters``)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def worker(spec: dict) -> dict:
    """Build the encoder with one switch set, time fwd+bwd, return a result dict."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.model import build_model
    from pipeline.model.config import ModelConfig

    torch.manual_seed(0)
    device = torch.device(spec["device"])
    arch, size, batch = spec["arch"], spec["size"], spec["batch"]
    cfg = ModelConfig(
        arch=arch, image_size=size, peft=spec["peft"], head="sam", **VARIANTS[spec["variant"]]
    )
    model = build_model(cfg=cfg).to(device).train()
    x = torch.randint(0, 256, (batch, 3, size, size), device=device, dtype=torch.uint8)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.encode(x).float().square().mean().backward()

    flops = 0
    if spec["variant"] == "plain":
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    saved = saved_activation_bytes(model, x)
    for _ in range(spec["warmup"]):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(spec["steps"]):
        step()
    _sync(device)
    elapsed = (time.perf_counter() - t) / spec["steps"]
    peak = torch.cuda.max_memory_allocated() - base_mem if device.type == "cuda" else 0
    return {
        **spec,
        "step_s": elapsed,
        "images_per_s": batch / elapsed,
        "saved_mb": saved / 2**20,
        "peak_mb": peak / 2**20,
        "flops_per_step": flops,
    }


def saved_activation_bytes(model, x) -> int:
    """Bytes of the non-parameter tensors autograd keeps between forward and backward."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.encode(x).float().square().mean()
    loss.backward()
    return sum(kept.values())


def run_case(args, case: str, variant: str) -> dict | None:
    arch, size, batch = case.split(":")
    spec = {
        "device": args.device,
        "arch": arch,
        "size": int(size),
        "batch": int(batch),
        "variant": variant,
        "peft": args.peft,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        log.warning("%s %s failed: %s", case, variant, " | ".join(tail))
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--cases", default="", help="arch:size:batch,... (overrides --preset)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--peft", default="lora", help="PEFT methods, comma-separated")
    parser.add_argument("--device", default="")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.peft = [m for m in args.peft.split(",") if m]
    device = torch.device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    cases = [c for c in args.cases.split(",") if c] or PRESETS[preset]
    n = 8192 if device.type == "cuda" else 1024
    peaks = {
        dt: matmul_peak(device, dt, n, 10 if device.type == "cuda" else 3)
        for dt in ("bfloat16", "float32")
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    log.info(
        "device %s; matmul peak %dx%d: bf16 %.2f TFLOP/s, fp32 %.2f TFLOP/s",
        name,
        n,
        n,
        peaks["bfloat16"],
        peaks["float32"],
    )
    results = []
    ref_dtype = "bfloat16" if device.type == "cuda" else "float32"
    header = (
        f"{'case':<14} {'variant':<8} {'img/s':>8} {'x plain':>8} {'saved MB':>9} "
        f"{'x plain':>8} {'peak MB':>8} {'TFLOP/s':>8} {'% peak':>7}"
    )
    log.info("%% peak: of the %s matmul peak", ref_dtype)
    log.info(header)
    for case in cases:
        plain = None
        for variant in [v for v in args.variants.split(",") if v]:
            res = run_case(args, case, variant)
            if res is None:
                continue
            if variant == "plain":
                plain = res
            flops = (plain or res)["flops_per_step"]
            tflops = flops / res["step_s"] / 1e12 if flops else float("nan")
            res["tflops"] = tflops
            res["pct_peak"] = 100 * tflops / peaks[ref_dtype]
            speed = res["images_per_s"] / plain["images_per_s"] if plain else float("nan")
            mem = res["saved_mb"] / plain["saved_mb"] if plain else float("nan")
            log.info(
                f"{case:<14} {variant:<8} {res['images_per_s']:>8.2f} {speed:>8.2f} "
                f"{res['saved_mb']:>9.0f} {mem:>8.2f} {res['peak_mb']:>8.0f} {tflops:>8.3f} "
                f"{res['pct_peak']:>6.1f}%"
            )
            results.append(res)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": name, "matmul_peak": peaks, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
