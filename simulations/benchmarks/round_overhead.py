"""Benchmark: what Flower's simulation engine adds to a round beyond the sites' own compute.

Runs one simulated federation (default: 3 sites, 2 rounds, 32x32 images, DP on,
shift queries off, every site at prevalence 0.75 so that the sites are the same
size and do the same work) through :func:`simulations.runner.simulate`, in a child
process, then prints per round and phase (train, evaluate):

- ``wall``: the server's wall time from sending the phase's messages to having
  every reply (the history's ``seconds``);
- ``sum`` and ``max``: the sum and the largest of the sites' ``compute-seconds``
  (each site's own time for that message: building the model, training or
  evaluating);
- ``overhead = wall - max``: what the framework adds beyond the slowest site
  (message passing, serialisation, Ray scheduling and, in round 1, starting the
  actors), assuming the sites ran in parallel; sites that had to wait for a free
  actor count here too, so the figure is only framework cost when every site
  gets an actor at once;
- ``best``: Ray runs at most K sites at a time (K = CPU cores / CPUs per site,
  so 2 on a 2-core machine); with more sites than K, sites queue for an actor and
  ``overhead`` counts that wait. ``best`` is the shortest schedule of the sites'
  compute on K actors, each site whole on one actor (3 equal sites on 2 actors:
  two sites' time), and ``wall / best`` what the server waited against it: 1 is
  a framework that adds nothing (the JSON also keeps ``beyond K = wall - max(max,
  sum / K)``, against the looser lower bound);
- ``wall / sum``: 1 / N would be N sites fully in parallel and 1 one after
  another; with K at a time and equal sites it cannot go much below
  ceil(N / K) / N, a limit of the machine's cores, not of the framework.

Round 1 also pays for starting the Ray actors (each imports torch and receives
the sites' data), so the JSON gives the means with and without it.

Then, in this process, one site answers train and evaluate messages of several
rounds as an actor does, and the benchmark prints its fixed cost per message:
the time outside local training or prediction (model build, parameters in and
out, noise plan, ledger checks and charges), for the run's first message and
warm (median of the next three).

It also prints the bytes a site sends per round against full-model FedAvg. The
last line printed is a JSON object with the figures.

    python -m simulations.benchmarks.round_overhead [--data-dir DIR] [--sites 3] \
        [--rounds 2] [--image-size 32] [--no-dp] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import RecordDict

from client import site_work
from client.message_handlers import answer
from common.federation_config import FederationConfig
from common.messages import Request
from common.model_surgery import build_model
from common.trainable_arrays import trainable_arrays
from common.transfer_mode import MODES_HELP
from simulations.runner import backend_config, simulate, simulated_policy, simulated_sites

PHASES = ("train", "evaluate")
POLL_SECONDS = 0.5


@dataclass(frozen=True)
class PhaseFigures:
    """One phase of one round: the server's wall time against the sites' compute."""

    wall_s: float
    sum_site_s: float
    max_site_s: float
    sites: int
    slots: int = 1

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.max_site_s

    times: tuple[float, ...] = ()

    @property
    def overhead_beyond_slots_s(self) -> float:
        """Wall time beyond the lower bound ``max(max, sum / slots)`` on the schedule."""
        return self.wall_s - max(self.max_site_s, self.sum_site_s / self.slots)

    @property
    def best_schedule_s(self) -> float:
        """The shortest schedule of the sites' compute on ``slots`` actors, a site whole
        on one actor (the exact makespan; see :func:`best_schedule`)."""
        return best_schedule(self.times, self.slots)

    @property
    def wall_over_best(self) -> float:
        best = self.best_schedule_s
        return self.wall_s / best if best > 0 else math.nan

    @property
    def wall_over_sum(self) -> float:
        return self.wall_s / self.sum_site_s if self.sum_site_s > 0 else math.nan

    def to_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in asdict(self).items()}
        out["overhead_s"] = round(self.overhead_s, 4)
        out["overhead_beyond_slots_s"] = round(self.overhead_beyond_slots_s, 4)
        out["wall_over_sum"] = round(self.wall_over_sum, 4)
        out["best_schedule_s"] = round(self.best_schedule_s, 4)
        out["wall_over_best"] = round(self.wall_over_best, 4)
        out.pop("times")
        return out


def best_schedule(times: tuple[float, ...] | list[float], slots: int) -> float:
    """Shortest makespan of jobs of ``times`` on ``slots`` identical workers, each job whole
    on one worker (branch and bound, longest job first, equal loads tried once; exact,
    or within 0.1 % of the lower bound ``max(longest, sum / slots)``, where it stops)."""
    jobs = sorted(times, reverse=True)
    if not jobs:
        return 0.0
    slots = max(1, min(slots, len(jobs)))
    lower = max(jobs[0], sum(jobs) / slots)
    loads = [0.0] * slots
    for job in jobs:  # longest-processing-time first: the starting upper bound
        loads[loads.index(min(loads))] += job
    best = max(loads)
    loads = [0.0] * slots

    def place(i: int) -> None:
        nonlocal best
        if best <= lower * 1.001:
            return
        if i == len(jobs):
            best = min(best, max(loads))
            return
        tried: set[float] = set()
        for w in range(slots):
            if loads[w] in tried or loads[w] + jobs[i] >= best:
                continue
            tried.add(loads[w])
            loads[w] += jobs[i]
            place(i + 1)
            loads[w] -= jobs[i]

    place(0)
    return best


def phase_figures(entry: dict[str, Any], phase: str, slots: int = 1) -> PhaseFigures:
    """Figures of ``phase`` in one round's history entry (sites that replied with a time),
    for sites run ``slots`` at a time."""
    times = [float(site[phase]["compute-seconds"]) for site in entry["sites"].values()
             if "compute-seconds" in site.get(phase, {})]
    wall = float(entry.get("seconds", {}).get(phase, math.nan))
    return PhaseFigures(wall_s=wall, sum_site_s=sum(times),
                        max_site_s=max(times, default=math.nan), sites=len(times), slots=slots,
                        times=tuple(times))


@dataclass(frozen=True)
class SiteSlots:
    """How Ray places the simulated sites: CPUs per site and how many run at a time."""

    cpus_per_site: int
    at_a_time: int
    threads_per_site: str


def site_slots(cfg: FederationConfig) -> SiteSlots:
    """The placement :func:`simulations.runner.simulate` asks Ray for."""
    backend = backend_config(cfg)
    per_site = int(backend["client_resources"]["num_cpus"])
    at_a_time = max(1, min(cfg.num_sites, int(backend["init_args"]["num_cpus"]) // per_site))
    # Ray sets OMP_NUM_THREADS to an actor's CPUs, so torch uses that many threads
    # there, unless OMP_NUM_THREADS is already set.
    return SiteSlots(per_site, at_a_time, os.environ.get("OMP_NUM_THREADS", str(per_site)))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextmanager
def _visible_devices(device: str) -> Iterator[None]:
    """Hide GPUs from processes started inside when ``device`` is cpu."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def simulate_child(cfg: FederationConfig, out_file: str, verbose: bool) -> None:
    """In a child process: run the simulation, write its results and wall time to ``out_file``."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    start = time.perf_counter()
    results = simulate(cfg)
    wall = time.perf_counter() - start
    sites_device = "cuda" if torch.cuda.is_available() else "cpu"
    Path(out_file).write_text(json.dumps({
        "results": results, "simulate_wall_s": wall, "sites_device": sites_device,
        "largest_process_bytes": _largest_process_bytes(),
    }))


def _largest_process_bytes() -> int:
    """Peak RSS of this process (``VmHWM``) or of the largest child it waited for."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB elsewhere
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return max(largest, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
    for line in status:
        if line.startswith("VmHWM:"):
            largest = max(largest, int(line.split()[1]) * 1024)
    return largest


def simulate_in_child(cfg: FederationConfig, device: str, verbose: bool = False,
                      poll: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``simulate(cfg)`` in a fresh spawned process and return what it wrote.

    ``device`` cpu hides GPUs from it (and so from its Ray actors); ``poll`` is
    called with its process id every 0.5 s while it runs.
    """
    with tempfile.TemporaryDirectory(prefix="fedshift-bench-") as tmp:
        out_file = Path(tmp) / "out.json"
        cfg = cfg.replace(state_dir=str(Path(tmp) / "state"))
        process = multiprocessing.get_context("spawn").Process(
            target=simulate_child, args=(cfg, str(out_file), verbose))
        with _visible_devices(device):
            process.start()
        assert process.pid is not None
        while process.is_alive():
            if poll is not None:
                poll(process.pid)
            process.join(POLL_SECONDS)
        if process.exitcode != 0 or not out_file.exists():
            raise RuntimeError(f"the simulation process ended with exit code {process.exitcode}"
                               " and no results; rerun with --verbose to see Flower's log")
        return json.loads(out_file.read_text())


def add_simulation_options(parser: argparse.ArgumentParser, image_size: int = 32,
                           rounds: int = 1) -> None:
    """Options the simulation benchmarks share."""
    parser.add_argument("--data-dir", default="", help="directory of pneumoniamnist.npz "
                        "(else $FEDSHIFT_DATA_DIR, then ~/.medmnist)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mode", default="bn+head", help=f"transfer mode: {MODES_HELP}")
    parser.add_argument("--no-dp", action="store_true", help="non-private sites")
    parser.add_argument("--device", default=default_device(), choices=("cpu", "cuda"),
                        help="cuda lets the sites use the GPU (shared by all of them); cpu "
                             "hides it from the simulation")
    parser.add_argument("--verbose", action="store_true", help="show Flower's log")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch")


def _row(label: str, phase: str, f: PhaseFigures) -> str:
    return (f"{label:>5}  {phase:<9}{f.wall_s:>9.2f}{f.sum_site_s:>10.2f}{f.max_site_s:>10.2f}"
            f"{f.best_schedule_s:>10.2f}{f.wall_over_best:>11.2f}{f.overhead_s:>12.2f}"
            f"{f.wall_over_sum:>10.2f}{f.sites:>7}")


@contextmanager
def _timing(module: Any, name: str, spent: list[float]) -> Iterator[None]:
    """Add the time spent in ``module.name`` to ``spent[0]`` while inside."""
    inner = getattr(module, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(module, name, timed)
    try:
        yield
    finally:
        setattr(module, name, inner)


def warm_message_costs(cfg: FederationConfig, messages: int = 3) -> dict[str, dict[str, float]]:
    """A site's fixed cost per message, in this process: per phase, the time a message
    takes outside local training (train) or prediction (evaluate), for the site's
    first message of the run (cold: the noise plan, the data) and the median of the
    next ``messages`` (warm).

    Site 0 of ``cfg`` answers train and evaluate messages of ``messages + 1``
    rounds through :func:`client.message_handlers.answer`, as in the simulation's
    actors, with its ledger in a temporary folder.
    """
    rounds = messages + 1
    with tempfile.TemporaryDirectory(prefix="fedshift-bench-") as tmp:
        cfg = cfg.replace(state_dir=tmp, num_rounds=rounds, evaluations=rounds)
        sites = simulated_sites(cfg).sites
        arrays = trainable_arrays(build_model(cfg.model_spec()))
        fixed: dict[str, list[float]] = {phase: [] for phase in PHASES}
        inner = {"train": "train_locally", "evaluate": "calibrated_predictions"}
        for round_ in range(1, rounds + 1):
            content = RecordDict({"arrays": arrays, "config": Request(
                server_round=round_, run_key="bench").to_config()})
            for phase in PHASES:
                spent = [0.0]
                with _timing(site_work, inner[phase], spent):
                    start = time.perf_counter()
                    reply = answer(phase, content, "bench", 0, {"partition-id": 0}, {}, cfg,
                                   lambda _: sites, simulated_policy(cfg))
                    total = time.perf_counter() - start
                if not isinstance(reply, RecordDict):
                    raise RuntimeError(f"the site refused {phase} round {round_}: {reply}")
                fixed[phase].append(total - spent[0])
    return {phase: {"cold_s": round(times[0], 4),
                    "warm_s": round(statistics.median(times[1:]), 4)}
            for phase, times in fixed.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--prevalences", default="",
                        help="pneumonia prevalence per site, comma-separated; sets the number "
                             "of sites (default: 0.75 at each of --sites sites, so that all "
                             "sites do the same work)")
    add_simulation_options(parser, rounds=2)
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    prevalences = (tuple(float(v) for v in args.prevalences.split(",") if v.strip())
                   or (0.75,) * args.sites)
    cfg = FederationConfig(
        data_dir=args.data_dir, num_sites=len(prevalences), prevalences=prevalences,
        num_rounds=args.rounds, local_epochs=args.local_epochs, image_size=args.image_size,
        batch_size=args.batch_size, mode=args.mode, dp=not args.no_dp, shift=False,
        evaluations=args.rounds,
    )
    slots = site_slots(cfg)
    print(f"{cfg.num_sites} sites (prevalences {', '.join(map(str, cfg.prevalences))}), "
          f"{cfg.num_rounds} round(s) of {cfg.local_epochs} local epoch(s), "
          f"{cfg.image_size}x{cfg.image_size} images, mode {cfg.mode}, "
          f"DP {'on' if cfg.dp else 'off'}, shift queries off")
    print(f"device {args.device}; this process: torch threads {torch.get_num_threads()}; "
          f"sites: Ray actors with {slots.cpus_per_site} CPU(s) and {slots.threads_per_site} "
          f"torch thread(s) each, at most {slots.at_a_time} at a time on {os.cpu_count()} cores")
    run = simulate_in_child(cfg, args.device, args.verbose)
    results = run["results"]

    print(f"\nsimulate() wall time {run['simulate_wall_s']:.1f} s (Ray start-up and the final "
          "pooled test included); sites ran on " + run["sites_device"])
    print(f"{'round':>5}  {'phase':<9}{'wall s':>9}{'sum s':>10}{'max s':>10}"
          f"{'best s':>10}{'wall/best':>11}{'overhead s':>12}{'wall/sum':>10}{'sites':>7}")
    per_round = []
    for entry in results["rounds"]:
        figures = {phase: phase_figures(entry, phase, slots.at_a_time) for phase in PHASES}
        for phase, f in figures.items():
            print(_row(str(entry["round"]), phase, f))
        per_round.append({"round": entry["round"],
                          **{phase: f.to_dict() for phase, f in figures.items()}})
    floor = math.ceil(cfg.num_sites / slots.at_a_time) / cfg.num_sites
    print("wall = server's wait for the phase's replies; sum / max = the sites' own "
          "compute-seconds; overhead = wall - max (framework cost beyond the slowest site; "
          "round 1 includes starting the actors)")
    print(f"best = the shortest schedule of the sites' compute on the K = {slots.at_a_time} "
          "actors that run at once, each site whole on one actor; wall/best = what the "
          "server waited against it")
    print(f"wall/sum: {1 / cfg.num_sites:.2f} = all {cfg.num_sites} sites fully parallel, "
          f"1 = one after another; with at most {slots.at_a_time} site(s) at a time on this "
          f"machine ({os.cpu_count()} cores) it cannot go much below {floor:.2f} for equal "
          "sites: the cores, not the framework, limit the parallelism")
    costs = warm_message_costs(cfg)
    print("a site's fixed cost per message (outside training or prediction; this process, "
          "site 0): " + "; ".join(f"{phase} {c['cold_s']:.3f} s first, {c['warm_s']:.3f} s "
                                  "warm" for phase, c in costs.items()))
    sent, full = results["bytes_per_round_per_site"], results["full_model_bytes"]
    print(f"sent per site and round: {sent} bytes; full-model FedAvg: {full} bytes "
          f"({100 * sent / full:.2f}%)")

    def mean(rounds: list[dict[str, Any]], key: str) -> dict[str, float | None]:
        """Per phase, the mean of ``key`` over ``rounds`` (None without rounds)."""
        return {phase: round(sum(r[phase][key] for r in rounds) / len(rounds), 4)
                if rounds else None for phase in PHASES}

    figures: dict[str, Any] = {
        "sites": cfg.num_sites, "rounds": cfg.num_rounds, "image_size": cfg.image_size,
        "mode": cfg.mode, "dp": cfg.dp, "device": args.device,
        "sites_device": run["sites_device"], "torch_threads": torch.get_num_threads(),
        "cpus_per_site": slots.cpus_per_site, "sites_at_a_time": slots.at_a_time,
        "simulate_wall_s": round(run["simulate_wall_s"], 3), "per_round": per_round,
        "mean_overhead_s": mean(per_round, "overhead_s"),
        "mean_overhead_beyond_slots_s": mean(per_round, "overhead_beyond_slots_s"),
        "mean_overhead_beyond_slots_s_after_round_1": mean(per_round[1:],
                                                           "overhead_beyond_slots_s"),
        "mean_wall_over_sum": mean(per_round, "wall_over_sum"),
        "mean_wall_over_best": mean(per_round, "wall_over_best"),
        "mean_wall_over_best_after_round_1": mean(per_round[1:], "wall_over_best"),
        "message_fixed_cost_s": costs,
        "bytes_per_round_per_site": sent, "full_model_bytes": full,
        "bytes_fraction": round(sent / full, 6),
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
