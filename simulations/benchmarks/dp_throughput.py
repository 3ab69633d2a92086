"""Benchmark: local training with and without DP, side by side in one run: speed and memory.

Same model, transfer mode (``--mode``: ``bn+head`` or ``head``), data (one
simulated site's training split) and expected batch size; the two settings
alternate epoch by epoch so that both see the same machine state, after one
warm-up epoch each. Prints images/s of each, their ratio, the peak memory of one
epoch of each, and the bytes a site sends per round against full-model FedAvg.
The last line printed is a JSON object with the figures.

Peak memory, per setting:

- on CUDA, ``torch.cuda.max_memory_allocated`` over the timed epochs (reset before
  each), and its increase over what was allocated when the epoch started;
- on CPU, one epoch in a fresh child process (spawned, so it shares nothing with
  this one): its peak resident set size during training (Linux ``VmHWM``, reset
  just before training) and that peak minus its RSS just before training, i.e.
  what training itself adds to a process that holds the model and the data.
  Without ``/proc`` the peak is ``ru_maxrss``, which on Linux also counts the
  spawning process's size from before the child's ``exec``, hence not the default.

    python -m simulations.benchmarks.dp_throughput [--data-dir DIR] [--epochs 3] \
        [--mode bn+head|head] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.local_training import LocalTrainingConfig, train_locally
from common.data.federation import load_federation
from common.federation_config import FederationConfig
from common.model_surgery import build_model
from common.trainable_arrays import full_model_bytes, record_bytes, trainable_arrays

MIB = 2**20
MODES = ("bn+head", "head")
SETTINGS = ("nondp", "dp")
LABELS = {"nondp": "non-DP", "dp": "DP"}


@dataclass(frozen=True)
class PeakMemory:
    """Peak memory of one epoch of training, in bytes."""

    peak: int
    before: int

    @property
    def increase(self) -> int:
        return self.peak - self.before


def _train_cfg(cfg: FederationConfig) -> LocalTrainingConfig:
    return LocalTrainingConfig(batch_size=cfg.batch_size, lr=cfg.lr, clip=cfg.clip)


def _epoch(cfg: FederationConfig, images: torch.Tensor, labels: torch.Tensor,
           noise: float | None, device: torch.device) -> tuple[float, PeakMemory | None]:
    """Images/s of one epoch and, on CUDA, its peak allocated memory."""
    model = build_model(cfg.model_spec())
    cuda = device.type == "cuda"
    before = 0
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    outcome = train_locally(model, images, labels, _train_cfg(cfg), noise, device)
    if cuda:
        torch.cuda.synchronize(device)
    rate = outcome.examples / (time.perf_counter() - start)
    memory = PeakMemory(torch.cuda.max_memory_allocated(device), before) if cuda else None
    return rate, memory


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where there is no ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Set this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def _ru_maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(who).ru_maxrss * scale


def child_epoch_memory(cfg: FederationConfig, images: np.ndarray, labels: np.ndarray,
                       noise: float | None, threads: int) -> tuple[int, int, str]:
    """In a fresh process: (peak RSS, RSS before training, how) for one CPU epoch."""
    torch.set_num_threads(threads)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    model = build_model(cfg.model_spec())
    before = _proc_status_bytes("VmRSS")
    if before is not None and _reset_peak_rss():
        train_locally(model, x, y, _train_cfg(cfg), noise, torch.device("cpu"))
        return _proc_status_bytes("VmHWM") or 0, before, "VmHWM"
    before = _ru_maxrss_bytes()
    train_locally(model, x, y, _train_cfg(cfg), noise, torch.device("cpu"))
    return _ru_maxrss_bytes(), before, "ru_maxrss"


def _cpu_peak_memory(cfg: FederationConfig, images: torch.Tensor, labels: torch.Tensor,
                     noise: float | None) -> tuple[PeakMemory, str]:
    # numpy arrays are pickled into the child's own memory, where torch tensors
    # would travel as shared memory that training would then page in.
    args = (cfg, images.numpy(), labels.numpy(), noise, torch.get_num_threads())
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, before, how = pool.apply(child_epoch_memory, args)
    return PeakMemory(peak, before), how


def _mib(value: int) -> float:
    return round(value / MIB, 1)


def main(argv: list[str] | None = None) -> dict[str, float | int | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per setting")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--mode", default="bn+head", choices=MODES, help="transfer mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    cfg = FederationConfig(data_dir=args.data_dir, batch_size=args.batch_size,
                           image_size=args.image_size, backbone=args.backbone, mode=args.mode)
    site = load_federation(cfg)[0]
    images, labels = site.images["train"], site.labels["train"]
    device = torch.device(args.device)
    noise = 1.0
    print(f"backbone {cfg.backbone}, mode {cfg.mode}, {len(labels)} images of "
          f"{cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    for mode_noise in (None, noise):
        _epoch(cfg, images, labels, mode_noise, device)
    rates: dict[str, list[float]] = {s: [] for s in SETTINGS}
    cuda_peaks: dict[str, list[PeakMemory]] = {s: [] for s in SETTINGS}
    for epoch in range(args.epochs):
        for setting, setting_noise in zip(SETTINGS, (None, noise), strict=True):
            rate, memory = _epoch(cfg, images, labels, setting_noise, device)
            rates[setting].append(rate)
            if memory is not None:
                cuda_peaks[setting].append(memory)
        print(f"epoch {epoch + 1}: non-DP {rates['nondp'][-1]:8.1f} img/s   "
              f"DP {rates['dp'][-1]:8.1f} img/s")
    nondp, dp = statistics.median(rates["nondp"]), statistics.median(rates["dp"])
    model = build_model(cfg.model_spec())
    sent, full = record_bytes(trainable_arrays(model)), full_model_bytes(model)
    print(f"median: non-DP {nondp:.1f} img/s, DP {dp:.1f} img/s, ratio DP/non-DP {dp / nondp:.3f}")

    memory: dict[str, PeakMemory] = {}
    if device.type == "cuda":
        for setting in SETTINGS:
            memory[setting] = max(cuda_peaks[setting], key=lambda m: m.peak)
        method = "torch.cuda.max_memory_allocated over the timed epochs"
        peak_name, before_name = "peak allocated", "allocated before"
    else:
        hows = set()
        for setting, setting_noise in zip(SETTINGS, (None, noise), strict=True):
            memory[setting], how = _cpu_peak_memory(cfg, images, labels, setting_noise)
            hows.add(how)
        method = f"peak RSS of a child process training one epoch ({', '.join(sorted(hows))})"
        peak_name, before_name = "peak RSS", "RSS before"
    print(f"peak memory, {method}:")
    print(f"{'':8}{peak_name:>18}{before_name:>18}{'training adds':>18}")
    for setting in SETTINGS:
        m = memory[setting]
        print(f"{LABELS[setting]:8}{_mib(m.peak):>14.1f} MiB{_mib(m.before):>14.1f} MiB"
              f"{_mib(m.increase):>14.1f} MiB")
    print(f"sent per site and round: {sent} bytes; full model: {full} bytes "
          f"({100 * sent / full:.2f}%)")
    figures: dict[str, float | int | str] = {
        "dp_images_per_s": round(dp, 2), "nondp_images_per_s": round(nondp, 2),
        "ratio": round(dp / nondp, 4), "bytes_per_round_per_site": sent,
        "full_model_bytes": full, "device": str(device), "mode": cfg.mode,
        "torch_threads": torch.get_num_threads(), "memory_method": method,
    }
    for setting in SETTINGS:
        figures[f"{setting}_peak_memory_mib"] = _mib(memory[setting].peak)
        figures[f"{setting}_memory_increase_mib"] = _mib(memory[setting].increase)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
