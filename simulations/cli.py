"""``fedshift simulate``: run a simulated federation of hospitals and print its results.

The ``fedshift`` command line itself (:mod:`fedshift_cli`) dispatches here when
``simulate`` is chosen.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from client.release_policy import SitePolicy
from common.backbones import BACKBONES
from common.data.datasets import (
    dataset_channels,
    describe_source,
    load_image_dataset,
)
from common.data.splits import ImageSplits
from common.federation_config import (
    NONPRIVATE_RECIPE,
    ConfigError,
    FederationConfig,
)
from common.transfer_mode import MODES_HELP
from server.aggregators import AGGREGATORS
from simulations.scenario import load_scenario
from simulations.trackers import require_tensorboard, write_tensorboard

DEFAULTS = FederationConfig()


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``simulate`` subcommand on the ``fedshift`` parser's subparsers."""
    p = sub.add_parser(
        "simulate",
        description="Run N simulated hospitals on Flower's simulation engine: DP fine-tuning "
                    "of a pretrained backbone's BatchNorm scale/shift and head.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default=DEFAULTS.dataset,
                   help="a MedMNIST flag (<flag>.npz), a path to an npz file in MedMNIST "
                        "layout, fashion-mnist (apt-get install dataset-fashion-mnist) or an "
                        "ImageFolder directory (DIR/<class>/* or DIR/{train,val,test}/<class>/*); "
                        "its classes and channels set --num-classes and --in-channels")
    p.add_argument("--data-dir", default="",
                   help="directory holding the data file (else $FEDSHIFT_DATA_DIR, ~/.medmnist, "
                        "then download, then the shipped 28 px PneumoniaMNIST)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results.json and the run's state (history, final parameters, "
                        "ledgers) here")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write the run's per-round and per-site metrics, privacy spent "
                        "and shift scores as TensorBoard event files under DIR (needs "
                        "pip install 'fedshift[trackers]'); view them with "
                        "tensorboard --logdir DIR")
    p.add_argument("--scenario", default="",
                   help="scenario file (TOML) with ground-truth label, covariate and concept "
                        "shifts per site; its sites and [federation] settings replace "
                        "--prevalences and the matching options (see simulations/scenarios/)")
    p.add_argument("--prevalences", default=",".join(map(str, DEFAULTS.prevalences)),
                   help="binary tasks: class-1 (pneumonia) prevalence per site, comma-separated "
                        "(one value per site)")
    p.add_argument("--sites", type=int, default=None,
                   help="number of sites (default: one per --prevalences value)")
    p.add_argument("--label-skew", type=float, default=DEFAULTS.label_skew,
                   help="Dirichlet alpha of each site's class mix (small: skewed sites); 0: "
                        "--prevalences for binary tasks, the data set's own mix otherwise")
    p.add_argument("--image-size", type=int, default=DEFAULTS.image_size)
    p.add_argument("--backbone", default=DEFAULTS.backbone, choices=sorted(BACKBONES))
    p.add_argument("--weights", default="", help="local pretrained weights file")
    p.add_argument("--mode", default=DEFAULTS.mode, help=f"transfer mode: {MODES_HELP}")
    p.add_argument("--rounds", type=int, default=DEFAULTS.num_rounds)
    p.add_argument("--local-epochs", type=int, default=DEFAULTS.local_epochs)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    # No default: the recipe for the privacy asked fills what is not given (and the
    # help would otherwise append "(default: None)").
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help=f"learning rate (default: {DEFAULTS.lr} under DP, "
                        f"{NONPRIVATE_RECIPE['lr']} with --no-dp)")
    p.add_argument("--lr-decay", type=float, default=argparse.SUPPRESS,
                   help=f"learning-rate factor per round (default: {DEFAULTS.lr_decay} under "
                        f"DP, {NONPRIVATE_RECIPE['lr_decay']} with --no-dp)")
    p.add_argument("--optimizer", default=argparse.SUPPRESS, choices=("sgd", "adam"),
                   help=f"default: {DEFAULTS.optimizer} under DP, "
                        f"{NONPRIVATE_RECIPE['optimizer']} with --no-dp")
    p.add_argument("--clip", type=float, default=DEFAULTS.clip,
                   help="per-sample gradient norm bound")
    p.add_argument("--epsilon", type=float, default=DEFAULTS.epsilon,
                   help="privacy budget per site for the whole run")
    p.add_argument("--delta", type=float, default=DEFAULTS.delta)
    p.add_argument("--no-dp", action="store_true", help="non-private reference run")
    p.add_argument("--aggregator", default=DEFAULTS.aggregator, choices=sorted(AGGREGATORS),
                   metavar="NAME",
                   help="server aggregation, one of Flower's strategies behind fedshift's "
                        "reply checks: " + "; ".join(
                            f"{a.name}: {a.summary}" for _, a in sorted(AGGREGATORS.items())))
    p.add_argument("--proximal-mu", type=float, default=DEFAULTS.proximal_mu)
    p.add_argument("--server-lr", type=float, default=DEFAULTS.server_lr)
    p.add_argument("--max-update-norm", type=float, default=DEFAULTS.max_update_norm,
                   help="reject site updates that move the parameters further than this "
                        "(L2); 0 turns the bound off. Non-private runs with a large --lr "
                        "exceed the default")
    p.add_argument("--personal-bn", action="store_true",
                   help="FedBN: every site keeps its own BatchNorm scale/shift (needs --no-shift)")
    p.add_argument("--adapt-norm-layers", type=int, default=DEFAULTS.adapt_norm_layers,
                   help="every site re-estimates the statistics of the first K normalisation "
                        "layers from its training images, once per run, under DP (charged), "
                        "and keeps them to itself; 0: off")
    p.add_argument("--adapt-norm-noise", type=float, default=DEFAULTS.adapt_norm_noise,
                   help="noise multiplier of each adapted layer's moment sum and of the count")
    p.add_argument("--adapt-norm-clip", type=float, default=DEFAULTS.adapt_norm_clip,
                   help="bound on the root mean square entry of one image's moment vector")
    p.add_argument("--no-shift", action="store_true",
                   help="do not query the sites for DP shift summaries (all budget to training)")
    p.add_argument("--evaluations", type=int, default=DEFAULTS.evaluations,
                   help="federated evaluations (DP confusion counts, charged) in the last rounds; "
                        "each site's test metrics are scored by the simulation itself")
    p.add_argument("--own-model-epochs", type=int, default=SitePolicy.own_model_epochs,
                   help="every site trains a model of its own (no DP, never released) for "
                        "this many epochs, compares it with the federated one on its "
                        "validation split; 0: off")
    p.add_argument("--decide-with-mix", action="store_true",
                   help="every site decides with the mix of federated and own model that was "
                        "clearly best on its validation split (off: the federated model)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--verbose", action="store_true", help="show Flower's log")


def _dataset(cfg: FederationConfig) -> str:
    """The data set the run reads: its scenario's, if it has one."""
    return load_scenario(cfg.scenario).dataset if cfg.scenario else cfg.dataset


def _config(args: argparse.Namespace, state_dir: Path
            ) -> tuple[FederationConfig, ImageSplits]:
    """The run's settings and the data set it reads (the scenario's, if one is given)."""
    try:
        prevalences = tuple(float(v) for v in args.prevalences.split(",") if v.strip())
    except ValueError:
        raise ConfigError(
            f"--prevalences {args.prevalences!r}: give numbers in [0, 1] separated by commas"
        ) from None
    recipe = {k: getattr(args, k) for k in ("lr", "lr_decay", "optimizer") if hasattr(args, k)}
    cfg = FederationConfig.for_privacy(
        dp=not args.no_dp, **recipe, dataset=args.dataset, data_dir=args.data_dir,
        image_size=args.image_size,
        num_sites=args.sites or len(prevalences), prevalences=prevalences,
        label_skew=args.label_skew, personal_bn=args.personal_bn, shift=not args.no_shift,
        adapt_norm_layers=args.adapt_norm_layers, adapt_norm_noise=args.adapt_norm_noise,
        adapt_norm_clip=args.adapt_norm_clip,
        backbone=args.backbone,
        weights=args.weights, mode=args.mode, num_rounds=args.rounds,
        local_epochs=args.local_epochs, batch_size=args.batch_size,
        clip=args.clip, epsilon=args.epsilon,
        delta=args.delta, aggregator=args.aggregator, proximal_mu=args.proximal_mu,
        server_lr=args.server_lr, max_update_norm=args.max_update_norm, seed=args.seed,
        evaluations=args.evaluations,
        state_dir=str(state_dir),
        scenario=str(Path(args.scenario).resolve()) if args.scenario else "",
    )
    # Settings are checked first; then the data set says its classes and channels.
    splits = load_image_dataset(_dataset(cfg), cfg.data_dir or None, cfg.seed, cfg.image_size)
    return (cfg.replace(num_classes=splits.num_classes, in_channels=dataset_channels(splits)),
            splits)


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_results(results: dict[str, Any]) -> None:
    """A table per site and the pooled test metrics, for people: each site's decisions
    at its own operating point (calibrated on its validation split)."""
    header = (f"{'site':<10}{'prev':>6}{'n_train':>9}{'acc':>8}{'bal_acc':>9}{'sens':>7}"
              f"{'spec':>7}{'AUROC':>8}{'eps':>8}")
    print(header)
    print("-" * len(header))
    for s in results["sites"]:
        t = s["test"]
        prevalence = "-" if s["prevalence"] is None else f"{s['prevalence']:.2f}"
        print(f"{s['name']:<10}{prevalence:>6}{s['train_size']:>9}"
              f"{_fmt(t['accuracy']):>8}{_fmt(t['balanced_accuracy']):>9}"
              f"{_fmt(t.get('sensitivity')):>7}{_fmt(t.get('specificity')):>7}"
              f"{_fmt(t['auroc']):>8}{_fmt(s['epsilon_spent']):>8}")
    p = results["pooled_test"]
    print(f"{'pooled':<10}{'':>6}{'':>9}{_fmt(p['accuracy']):>8}"
          f"{_fmt(p['balanced_accuracy']):>9}{_fmt(p.get('sensitivity')):>7}"
          f"{_fmt(p.get('specificity')):>7}{_fmt(p['auroc']):>8}{'':>8}")
    _print_own_models(results)
    print(f"\nsent per site and round: {results['bytes_per_round_per_site'] / 1024:.1f} KiB "
          f"({100 * results['bytes_fraction_of_full_model']:.2f}% of the full model's "
          f"{results['full_model_bytes'] / 2**20:.1f} MiB)")
    refused = {k: v for r in results["rounds"] for k, v in r["refused"].items()}
    for who, reason in refused.items():
        print(f"refused: {who}: {reason}")


def _print_own_models(results: dict[str, Any]) -> None:
    """Whether any site would do better alone, and what each decides with."""
    rows = [(s["name"], s["test"], s["own_model"]) for s in results["sites"] if "own_model" in s]
    if not rows:
        return
    print("\nbetter off alone? each site's own model (its training split, no DP, never "
          "released)\nagainst the federated one: validation log loss, the mix best on "
          "validation, test AUROC")
    header = (f"{'site':<10}{'fed loss':>10}{'own loss':>10}{'best mix':>16}"
              f"{'fed':>8}{'own':>8}{'mix':>8}")
    print(header)
    print("-" * len(header))
    for name, federated, own in rows:
        weight = own["weight"]
        mix = ("federated" if weight == 1 else "own model" if weight == 0
               else f"{weight:.0%} federated")
        print(f"{name:<10}{_fmt(own['federated_loss']):>10}{_fmt(own['local_loss']):>10}"
              f"{mix:>16}{_fmt(federated['auroc']):>8}{_fmt(own['test_alone']['auroc']):>8}"
              f"{_fmt(own['test_mix']['auroc']):>8}")
    pooled = results.get("pooled_test_mix")
    if pooled is not None:
        print(f"pooled test AUROC with each site on its best mix: {_fmt(pooled['auroc'])}, "
              f"balanced accuracy {_fmt(pooled['balanced_accuracy'])}")
    using = rows[0][2].get("decides_with_mix")
    print("the sites decide with " + ("these mixes" if using else
          "the federated model (--decide-with-mix: with these mixes)"))


def run_simulate(args: argparse.Namespace) -> int:
    """Run the simulation ``args`` describe, print its results and where they were
    written; 0 when it ran."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from server.run_report import HTML_FILE, REPORT_FILE
    from simulations.progress import RunProgress
    from simulations.runner import RESULTS_FILE, simulate, simulated_policy

    if args.tensorboard is not None:
        require_tensorboard()  # said before the run, not after it
    if args.out is not None:
        state_dir = args.out / "state"
        if state_dir.exists():
            if not args.overwrite:
                raise ConfigError(
                    f"{args.out} already holds a run (its ledgers would carry privacy spent "
                    "over); choose another --out or pass --overwrite"
                )
            shutil.rmtree(state_dir)
    else:
        state_dir = Path(tempfile.mkdtemp(prefix="fedshift-"))
    cfg, splits = _config(args, state_dir)
    print(f"data: {describe_source(splits, _dataset(cfg), cfg.image_size, cfg.data_dir or None)}",
          flush=True)
    if not args.verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # The long local steps (preparing the sites' data, scoring their test splits) say
    # so in log lines, written above the progress bar.
    logging.getLogger("simulations.runner").setLevel(logging.INFO)
    progress = RunProgress(cfg.num_rounds)
    try:
        policy = replace(simulated_policy(cfg), own_model_epochs=args.own_model_epochs,
                         decide_with_mix=args.decide_with_mix)
        with logging_redirect_tqdm():
            results = simulate(cfg, args.out, progress.on_round, policy=policy,
                               on_phase=progress.on_phase)
    finally:
        progress.close()
    print()
    print_results(results)
    if args.out is not None:
        print(f"\nresults: {args.out / RESULTS_FILE}")
        print(f"report: {args.out / REPORT_FILE} and {args.out / HTML_FILE}")
    if args.tensorboard is not None:
        write_tensorboard(results, args.tensorboard)
        print(f"tensorboard: {args.tensorboard} (tensorboard --logdir {args.tensorboard})")
    return 0

