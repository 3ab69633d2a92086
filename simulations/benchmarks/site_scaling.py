"""Benchmark: time and memory of a simulated federation as the number of sites grows.

For each N in ``--sites`` (default 2, 4, 8, 16, 32) it runs one simulation of N
sites (default: 1 round of 1 local epoch, 32x32 images, DP on, shift queries off,
every site at prevalence 0.75) through :func:`simulations.runner.simulate` in its
own child process, and reports: the wall time of ``simulate()`` (Ray start-up and
the final pooled test included), the server's wall time per round for the train
and evaluate phases (the history's ``seconds``), the sum over sites of their own
compute time in each phase (``compute-seconds``), the server's wait beyond the
shortest schedule of that compute on the K actors Ray runs at once (see
:mod:`simulations.benchmarks.round_overhead`), the training images per site,
and the peak memory of the child and all its descendants (Ray's processes and
the actors that run the sites).

The total data is fixed: PneumoniaMNIST is split into N sites, so the sites get
smaller as N grows. This measures what the framework costs per site (messages,
model builds, scheduling, per-process memory), not a bigger federation. A site's
``compute-seconds`` include building its model for each message, a fixed cost per
site that grows in the sum as the sites shrink. Ray keeps the same K actors
whatever N, so memory should barely grow with N.

Peak memory is sampled every 0.5 s with psutil (installed, or the copy Ray ships
with), as the largest total over the process tree of the resident set size (RSS,
which counts pages shared by several processes, such as the libraries every Ray
worker loads, once per process) and of the proportional set size (PSS, which
splits shared pages between the processes that map them, so it does not count
them twice). Peaks shorter than the sampling interval can be missed. Without
psutil it falls back to the largest ``ru_maxrss`` of a single process
(``RUSAGE_CHILDREN`` in the child, whose Ray processes it waits for; Linux
counts a process's size from before its ``exec`` there too), and says so.

    python -m simulations.benchmarks.site_scaling [--data-dir DIR] [--sites 2,4,8,16,32] \
        [--rounds 1] [--image-size 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from common.federation_config import FederationConfig
from simulations.benchmarks.round_overhead import (
    PHASES,
    add_simulation_options,
    check_device,
    phase_figures,
    simulate_in_child,
    site_slots,
)

MIB = 2**20


def _psutil() -> tuple[ModuleType | None, str]:
    """psutil if it can be imported, else Ray's bundled copy (on sys.path once ray is)."""
    for first in (None, "ray"):
        try:
            if first is not None:
                importlib.import_module(first)
            psutil = importlib.import_module("psutil")
        except ImportError:
            continue
        bundled = "thirdparty_files" in str(getattr(psutil, "__file__", ""))
        return psutil, f"psutil {psutil.__version__}{' (bundled with Ray)' if bundled else ''}"
    return None, ""


@dataclass
class TreeMemory:
    """Peak total RSS and PSS of a process and its descendants, sampled."""

    psutil: ModuleType
    peak_rss: int = 0
    peak_pss: int | None = None
    samples: int = 0
    most_processes: int = 0
    _pss_ok: bool = field(default=True, repr=False)

    def sample(self, pid: int) -> None:
        ps = self.psutil
        try:
            root = ps.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except ps.Error:
            return
        rss = pss = 0
        counted = 0
        for process in processes:
            try:
                if self._pss_ok:
                    info = process.memory_full_info()
                    rss, pss = rss + info.rss, pss + getattr(info, "pss", 0)
                    self._pss_ok = hasattr(info, "pss")
                else:
                    rss += process.memory_info().rss
                counted += 1
            except ps.AccessDenied:
                self._pss_ok = False
            except ps.Error:  # gone, or a zombie, between listing and reading
                continue
        self.samples += 1
        self.most_processes = max(self.most_processes, counted)
        self.peak_rss = max(self.peak_rss, rss)
        if self._pss_ok:
            self.peak_pss = max(self.peak_pss or 0, pss)


@dataclass(frozen=True)
class ScalingRow:
    """One N's figures."""

    sites: int
    train_images_per_site: int
    simulate_wall_s: float
    server_train_s_per_round: float
    server_evaluate_s_per_round: float
    site_train_s_total: float
    site_evaluate_s_total: float
    overhead_beyond_slots_s_per_round: float
    peak_memory_mib: float
    peak_pss_mib: float | None
    processes: int | None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def measure(cfg: FederationConfig, device: str, verbose: bool) -> tuple[ScalingRow, str]:
    """Run ``cfg`` in a child process; its row and how memory was measured."""
    psutil, method = _psutil()
    tree = TreeMemory(psutil) if psutil is not None else None
    run = simulate_in_child(cfg, device, verbose, poll=tree.sample if tree else None)
    results = run["results"]
    slots = site_slots(cfg).at_a_time
    figures = [{phase: phase_figures(entry, phase, slots) for phase in PHASES}
               for entry in results["rounds"]]
    if tree is not None and tree.samples:
        peak, pss = tree.peak_rss, tree.peak_pss
        method = (f"{method}: peak total RSS (and PSS) of the child process tree, "
                  "sampled every 0.5 s")
    else:
        peak = int(run["largest_process_bytes"])
        pss = None
        method = ("no psutil: ru_maxrss of the largest single process (RUSAGE_CHILDREN), "
                  "not the tree's total")
    sizes = [site["train_size"] for site in results["sites"]]
    row = ScalingRow(
        sites=cfg.num_sites, train_images_per_site=min(sizes),
        simulate_wall_s=round(run["simulate_wall_s"], 3),
        server_train_s_per_round=round(_mean([f["train"].wall_s for f in figures]), 3),
        server_evaluate_s_per_round=round(_mean([f["evaluate"].wall_s for f in figures]), 3),
        site_train_s_total=round(sum(f["train"].sum_site_s for f in figures), 3),
        site_evaluate_s_total=round(sum(f["evaluate"].sum_site_s for f in figures), 3),
        overhead_beyond_slots_s_per_round=round(_mean(
            [sum(f[phase].overhead_beyond_slots_s for phase in PHASES) for f in figures]), 3),
        peak_memory_mib=round(peak / MIB, 1),
        peak_pss_mib=round(pss / MIB, 1) if pss is not None else None,
        processes=tree.most_processes if tree is not None and tree.samples else None,
    )
    return row, method


def _table(rows: list[ScalingRow]) -> str:
    head = (f"{'sites':>5}{'img/site':>10}{'simulate s':>12}{'server train s':>16}"
            f"{'server eval s':>15}{'Σ site train s':>16}{'Σ site eval s':>15}{'beyond K s':>12}"
            f"{'peak RSS MiB':>14}{'peak PSS MiB':>14}{'procs':>7}")
    lines = [head]
    for r in rows:
        pss = f"{r.peak_pss_mib:.1f}" if r.peak_pss_mib is not None else "n/a"
        procs = str(r.processes) if r.processes is not None else "n/a"
        lines.append(
            f"{r.sites:>5}{r.train_images_per_site:>10}{r.simulate_wall_s:>12.1f}"
            f"{r.server_train_s_per_round:>16.2f}{r.server_evaluate_s_per_round:>15.2f}"
            f"{r.site_train_s_total:>16.2f}{r.site_evaluate_s_total:>15.2f}"
            f"{r.overhead_beyond_slots_s_per_round:>12.2f}"
            f"{r.peak_memory_mib:>14.1f}{pss:>14}{procs:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="2,4,8,16,32",
                        help="numbers of sites to run, comma-separated")
    parser.add_argument("--prevalence", type=float, default=0.75,
                        help="pneumonia prevalence of every site")
    add_simulation_options(parser)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    try:
        counts = [int(v) for v in args.sites.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--sites {args.sites!r}: give whole numbers separated by commas")
    base = FederationConfig(
        data_dir=args.data_dir, num_rounds=args.rounds, local_epochs=args.local_epochs,
        image_size=args.image_size, batch_size=args.batch_size, mode=args.mode,
        dp=not args.no_dp, shift=False, evaluations=args.rounds,
    )
    print(f"sites {', '.join(map(str, counts))}, each at prevalence {args.prevalence}; "
          f"{base.num_rounds} round(s) of {base.local_epochs} local epoch(s), "
          f"{base.image_size}x{base.image_size} images, mode {base.mode}, "
          f"DP {'on' if base.dp else 'off'}, shift queries off; one child process per N")
    print(f"device {args.device}; this process: torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores")
    rows: list[ScalingRow] = []
    method = ""
    for n in counts:
        cfg = base.replace(num_sites=n, prevalences=(args.prevalence,) * n)
        slots = site_slots(cfg)
        print(f"N = {n}: sites in Ray actors with {slots.cpus_per_site} CPU(s) and "
              f"{slots.threads_per_site} torch thread(s) each, {slots.at_a_time} at a time",
              flush=True)
        row, method = measure(cfg, args.device, args.verbose)
        rows.append(row)
    print()
    print(_table(rows))
    print("simulate s: whole simulate() call (Ray start-up and final pooled test included); "
          "server s: per round, waiting for the phase's replies; Σ site s: the sites' own "
          "compute-seconds, all rounds; beyond K s: per round, train and evaluate, the server's "
          "wait beyond the shortest schedule of the sites' compute on the K actors that run at "
          "once (framework cost; round 1 includes starting the actors)")
    print(f"memory: {method}")
    print("the total data is fixed, so sites get smaller as N grows: this is framework cost "
          "per site, not a bigger federation")
    figures: dict[str, Any] = {
        "device": args.device, "torch_threads": torch.get_num_threads(),
        "rounds": base.num_rounds, "image_size": base.image_size, "mode": base.mode,
        "dp": base.dp, "memory_method": method,
        "rows": [row.__dict__ for row in rows],
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
