"""The fedshift ServerApp: federated rounds of DP fine-tuning, history and final parameters.

Flower loads ``server.app:app``; its settings are the run config
(:class:`common.federation_config.FederationConfig`). The server builds the
model only to know the initial trainable parameters: nothing but those travels.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.federation_config import FederationConfig
from common.model_surgery import build_model
from common.norm_moments import moment_layout
from common.trainable_arrays import full_model_bytes, record_bytes, trainable_arrays
from server.run_records import (
    FINAL_ARRAYS_FILE,
    HISTORY_FILE,
    SHIFT_FILE,
    save_arrays,
    write_json,
)
from server.shift_monitor import ShiftMonitor
from server.strategy import FedShiftStrategy, RoundCallback

logger = logging.getLogger(__name__)


def run_federation(grid: Grid, cfg: FederationConfig, on_round: RoundCallback | None = None
                   ) -> FedShiftStrategy:
    """Run ``cfg.num_rounds`` rounds on ``grid``; write history, final parameters and shifts.

    With ``cfg.shift`` (and DP on) every round ends with a moment query and the run
    with a deployment query (:class:`server.shift_monitor.ShiftMonitor`); the
    shift record goes to ``shift.json`` in the state directory.
    """
    model = build_model(cfg.model_spec())
    initial = trainable_arrays(model)
    strategy = FedShiftStrategy(
        aggregator=cfg.aggregator, proximal_mu=cfg.proximal_mu, server_lr=cfg.server_lr,
        on_round=on_round, min_train_nodes=cfg.required_sites,
        min_evaluate_nodes=cfg.required_sites, min_available_nodes=cfg.required_sites,
    )
    monitor = None
    if cfg.shift and cfg.dp:
        layout = moment_layout(model, cfg.moment_layers, cfg.moment_clip)
        monitor = ShiftMonitor(grid, layout, cfg.num_classes)

    def shift_round(server_round: int, arrays: ArrayRecord) -> None:
        if monitor is not None and server_round > 0:
            monitor.moments_round(server_round, arrays)

    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_rounds,
                            evaluate_fn=shift_round)
    state = Path(cfg.state_dir)
    final = result.arrays if len(result.arrays) else initial
    save_arrays(state / FINAL_ARRAYS_FILE, final)
    if monitor is not None:
        monitor.deployment(cfg.num_rounds, final)
        write_json(state / SHIFT_FILE, monitor.report())
    write_json(state / HISTORY_FILE, {
        "config": cfg.to_flower(),
        "trainable_parameters": sum(a.numpy().size for a in initial.values()),
        "bytes_per_round_per_site": record_bytes(initial),
        "full_model_bytes": full_model_bytes(model),
        "rounds": strategy.history,
    })
    logger.info("history and final parameters written to %s", state)
    return strategy


def make_server_app(config: FederationConfig | None = None,
                    on_round: RoundCallback | None = None) -> ServerApp:
    """A ServerApp using ``config``, or each run's Flower run config when None."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FederationConfig.from_flower(context.run_config)
        run_federation(grid, cfg, on_round)

    return app


app = make_server_app()
