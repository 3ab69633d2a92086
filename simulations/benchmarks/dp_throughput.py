"""Benchmark: local bn+head training with and without DP, side by side in one run.

Same model, data (one simulated site's training split) and expected batch size;
the two modes alternate epoch by epoch so that both see the same machine state,
after one warm-up epoch each. Prints images/s of each mode, their ratio, and the
bytes a site sends per round against full-model FedAvg. The last line printed is
a JSON object with the figures.

    python -m simulations.benchmarks.dp_throughput [--data-dir DIR] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from client.local_training import LocalTrainingConfig, train_locally
from common.federated_data import load_federation
from common.federation_config import FederationConfig
from common.model_surgery import build_model
from common.trainable_arrays import full_model_bytes, record_bytes, trainable_arrays


def _epoch_rate(cfg: FederationConfig, images: torch.Tensor, labels: torch.Tensor,
                noise: float | None, device: torch.device) -> float:
    model = build_model(cfg.model_spec())
    train_cfg = LocalTrainingConfig(batch_size=cfg.batch_size, lr=cfg.lr, clip=cfg.clip)
    start = time.perf_counter()
    outcome = train_locally(model, images, labels, train_cfg, noise, device)
    return outcome.examples / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per mode")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    cfg = FederationConfig(data_dir=args.data_dir, batch_size=args.batch_size,
                           image_size=args.image_size, backbone=args.backbone)
    site = load_federation(cfg)[0]
    images, labels = site.images["train"], site.labels["train"]
    device = torch.device(args.device)
    noise = 1.0
    print(f"backbone {cfg.backbone}, mode {cfg.mode}, {len(labels)} images of "
          f"{cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    for mode_noise in (None, noise):
        _epoch_rate(cfg, images, labels, mode_noise, device)
    rates: dict[str, list[float]] = {"nondp": [], "dp": []}
    for epoch in range(args.epochs):
        rates["nondp"].append(_epoch_rate(cfg, images, labels, None, device))
        rates["dp"].append(_epoch_rate(cfg, images, labels, noise, device))
        print(f"epoch {epoch + 1}: non-DP {rates['nondp'][-1]:8.1f} img/s   "
              f"DP {rates['dp'][-1]:8.1f} img/s")
    nondp, dp = statistics.median(rates["nondp"]), statistics.median(rates["dp"])
    model = build_model(cfg.model_spec())
    sent, full = record_bytes(trainable_arrays(model)), full_model_bytes(model)
    print(f"median: non-DP {nondp:.1f} img/s, DP {dp:.1f} img/s, ratio DP/non-DP {dp / nondp:.3f}")
    print(f"sent per site and round: {sent} bytes; full model: {full} bytes "
          f"({100 * sent / full:.2f}%)")
    figures = {"dp_images_per_s": round(dp, 2), "nondp_images_per_s": round(nondp, 2),
               "ratio": round(dp / nondp, 4), "bytes_per_round_per_site": sent,
               "full_model_bytes": full, "device": str(device)}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
