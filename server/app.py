"""The fedshift ServerApp: federated rounds of DP fine-tuning, history and final parameters.

Flower loads ``server.app:app``; its settings are the run config
(:class:`common.federation_config.FederationConfig`). The server builds the
model only to know the initial trainable parameters: nothing but those travels.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from common.atomic_files import save_arrays
from common.federation_config import FederationConfig
from common.messages import Request
from common.model_surgery import build_model
from common.norm_moments import moment_layout
from common.trainable_arrays import full_model_bytes, record_bytes, trainable_arrays
from server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from server.phase_progress import PhaseCallback, PhaseReporter
from server.round_history import RoundCallback, RoundHistory
from server.run_records import (
    FINAL_ARRAYS_FILE,
    HISTORY_FILE,
    SHIFT_FILE,
    write_json,
)
from server.shift_monitor import ShiftMonitor
from server.site_connection import wait_for_sites
from server.strategy import FedShiftStrategy

logger = logging.getLogger(__name__)


def _start(cfg: FederationConfig, strategy: FedShiftStrategy, initial: ArrayRecord,
           state: Path) -> Checkpoint:
    """The checkpoint to go on from: the saved one of an unfinished run, else a fresh one."""
    fingerprint = config_fingerprint(cfg.to_flower())
    saved = load_checkpoint(state / CHECKPOINT_FILE, fingerprint)
    if saved is not None and not saved.finished:
        logger.info("resuming run %s after round %d from %s", saved.run_key,
                    saved.server_round, state / CHECKPOINT_FILE)
        try:
            strategy.restore(saved.strategy, saved.strategy_arrays)
        except ValueError as exc:
            raise CheckpointError(
                f"the checkpoint {state / CHECKPOINT_FILE} holds aggregator state this "
                f"fedshift cannot resume from ({exc}). Move it out of the state-dir to start "
                "the run afresh (the sites' ledgers keep what they spent)") from None
        return saved
    if saved is not None:
        logger.info("the run in %s finished; starting a new run there", state)
    return Checkpoint(run_key=uuid.uuid4().hex, fingerprint=fingerprint, server_round=0,
                      arrays=initial)


def _phase(grid: Grid, rounds: RoundHistory, progress: PhaseReporter, phase: str,
           server_round: int, messages: Iterable[Message], timeout: float) -> list[Message]:
    sent = list(messages)
    replies, seconds = progress.exchange(grid, sent, timeout, server_round, phase)
    rounds.record_seconds(server_round, phase, seconds)
    rounds.record_missing(server_round, phase, sent, replies)
    return replies


def _round(grid: Grid, cfg: FederationConfig, strategy: FedShiftStrategy,
           progress: PhaseReporter, server_round: int, arrays: ArrayRecord,
           run_key: str) -> ArrayRecord:
    """One round: train at the sites, aggregate what passes the checks, and in the
    last ``cfg.evaluations`` rounds evaluate (:meth:`FederationConfig.evaluates`).

    Each phase first waits, at most ``cfg.connect_timeout`` seconds, for enough sites
    (:func:`server.site_connection.wait_for_sites`); Flower's own wait has no bound."""
    request = Request(server_round=server_round, run_key=run_key)
    wait_for_sites(grid, cfg)
    rounds = strategy.rounds
    replies = _phase(grid, rounds, progress, "train", server_round, strategy.configure_train(
        server_round, arrays, request.to_config(), grid), cfg.round_timeout)
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    arrays = aggregated if aggregated is not None else arrays
    if cfg.evaluates(server_round):
        wait_for_sites(grid, cfg)
        replies = _phase(grid, rounds, progress, "evaluate", server_round,
                         strategy.configure_evaluate(server_round, arrays, request.to_config(),
                                                     grid), cfg.round_timeout)
        strategy.aggregate_evaluate(server_round, replies)
    rounds.end_round(server_round)
    return arrays


def run_federation(grid: Grid, cfg: FederationConfig, on_round: RoundCallback | None = None,
                   on_phase: PhaseCallback | None = None) -> FedShiftStrategy:
    """Run ``cfg.num_rounds`` rounds on ``grid``; write history, final parameters and shifts.

    ``on_round`` gets each round's history entry as the round's training (and
    evaluation) ends; ``on_phase`` a :class:`server.phase_progress.PhaseProgress` as
    each phase of a round starts and ends.

    With ``cfg.shift`` (and DP on) every round ends with a moment query and the run
    with a deployment query (:class:`server.shift_monitor.ShiftMonitor`); the
    shift record goes to ``shift.json`` in the state directory.

    The strategy is built first, so an unknown ``cfg.aggregator`` stops the run
    (:class:`server.aggregators.AggregatorError`, listing the names) before the
    model is built or any site is contacted.

    After every round the server checkpoints to the state directory
    (:mod:`server.checkpoint`); started again with the same settings after a
    crash, it goes on from the last finished round under the same run key, so
    the sites' ledgers go on charging the same run.
    """
    strategy = FedShiftStrategy(
        aggregator=cfg.aggregator, proximal_mu=cfg.proximal_mu, server_lr=cfg.server_lr,
        max_update_norm=cfg.max_update_norm, num_classes=cfg.num_classes, on_round=on_round,
        min_train_nodes=cfg.required_sites, min_evaluate_nodes=cfg.required_sites,
        min_available_nodes=cfg.required_sites,
    )
    model = build_model(cfg.model_spec())
    initial = trainable_arrays(model)
    state = Path(cfg.state_dir)
    checkpoint = _start(cfg, strategy, initial, state)
    progress = PhaseReporter(cfg.num_rounds, on_phase)
    monitor = None
    if cfg.shift and cfg.dp:
        layout = moment_layout(model, cfg.moment_layers, cfg.moment_clip)
        monitor = ShiftMonitor(grid, layout, cfg.num_classes, timeout=cfg.round_timeout,
                               run_key=checkpoint.run_key, labels=strategy.rounds.labels,
                               progress=progress)
        if checkpoint.monitor:
            monitor.restore(checkpoint.monitor)
    strategy.summary()
    arrays = checkpoint.arrays
    for server_round in range(checkpoint.server_round + 1, cfg.num_rounds + 1):
        logger.info("[ROUND %d/%d]", server_round, cfg.num_rounds)
        arrays = _round(grid, cfg, strategy, progress, server_round, arrays,
                        checkpoint.run_key)
        if monitor is not None:
            monitor.moments_round(server_round, arrays)
        checkpoint.server_round, checkpoint.arrays = server_round, arrays
        checkpoint.strategy, checkpoint.strategy_arrays = strategy.state()
        checkpoint.monitor = monitor.state() if monitor is not None else {}
        save_checkpoint(state / CHECKPOINT_FILE, checkpoint)
    save_arrays(state / FINAL_ARRAYS_FILE, arrays)
    if monitor is not None:
        monitor.deployment(cfg.num_rounds, arrays)
        write_json(state / SHIFT_FILE, monitor.report())
    write_json(state / HISTORY_FILE, {
        "config": cfg.to_flower(),
        "run_key": checkpoint.run_key,
        "trainable_parameters": sum(a.numpy().size for a in initial.values()),
        "bytes_per_round_per_site": record_bytes(initial),
        "full_model_bytes": full_model_bytes(model),
        "rounds": strategy.rounds.entries,
    })
    checkpoint.finished = True
    save_checkpoint(state / CHECKPOINT_FILE, checkpoint)
    logger.info("history and final parameters written to %s", state)
    return strategy


def make_server_app(config: FederationConfig | None = None,
                    on_round: RoundCallback | None = None,
                    on_phase: PhaseCallback | None = None) -> ServerApp:
    """A ServerApp using ``config``, or each run's Flower run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FederationConfig.from_flower(context.run_config)
        run_federation(grid, cfg, on_round, on_phase)

    return app


app = make_server_app()
