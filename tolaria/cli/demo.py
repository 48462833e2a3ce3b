"""``tolaria demo``: train the digits multi-task network and write a run folder.

The run folder receives ``demo_options.json`` (the options, for ``--resume``),
``telemetry.jsonl`` (one packet per line, written while the run goes),
``checkpoints/`` and ``summary.json`` (written atomically at the end). Every option
is validated before the folder is created, so invalid input leaves nothing behind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tolaria import checkpoint
from tolaria.cli.errors import EXIT_HALTED, EXIT_OK, UsageError
from tolaria.cli.injection import LOSS_FAULTS, LossFaults
from tolaria.cli.output import EpochTable, finite_or_none, write_json_atomic
from tolaria.config import AGGREGATORS, TrainerConfig
from tolaria.control import FaultPlan, OptimizerExecutor, PlateauPolicy
from tolaria.demo import OBJECTIVES, DigitsNet, digits_accuracy, digits_batches, digits_objectives, load_digits
from tolaria.devices import resolve_device
from tolaria.distributed import DistributedContext, barrier, is_main_process
from tolaria.functional.anomaly import LossMonitorConfig
from tolaria.functional.emergency import EmergencyPolicy, Level
from tolaria.results import FitResult
from tolaria.settings import ControlConfig
from tolaria.trainer import Trainer

__all__ = ["add_demo_arguments", "build_config", "run_demo"]

RUN_MARKERS = ("telemetry.jsonl", "summary.json")
DEFAULT_EPOCHS = 12
DEFAULT_LR = 2e-3
OPTIONS_FILE = "demo_options.json"
SAVED_OPTIONS = ("epochs", "aggregator", "weights", "seed", "device", "batch_size", "lr", "inject")
# The demo rolls back on the first spike to show the feature on a short run; the
# library default escalates more slowly (see EmergencyPolicy).
DEMO_POLICY: Mapping[str, Any] = {"on_spike": [[1, "CONSERVATIVE"]], "cooldown_steps": 20}
DEMO_CONTROL = ControlConfig(tamiyo_timeout_s=1.0, kasmina_timeout_s=1.0)
# Late in training a batch loss of 20 times a tiny median still happens on this data
# set, so the demo flags only losses more than 50 times above the median.
DEMO_LOSS_MONITOR = LossMonitorConfig(threshold=50.0, min_relative_scale=1.0)
FIELD_OPTIONS = {
    "epochs": "--epochs",
    "aggregator": "--aggregator",
    "weights": "--weights",
    "lr": "--lr",
    "seed": "--seed",
    "device": "--device",
    "out_dir": "--out",
}


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``tolaria demo`` to ``parser``."""
    parser.add_argument("--epochs", type=int, help=f"passes over the training set (default: {DEFAULT_EPOCHS})")
    parser.add_argument(
        "--aggregator",
        default="pcgrad",
        choices=AGGREGATORS,
        help="how per-objective gradients of the shared trunk are combined (default: pcgrad)",
    )
    parser.add_argument(
        "--weights",
        type=float,
        nargs=len(OBJECTIVES),
        metavar="W",
        help=f"objective weights in the order {', '.join(OBJECTIVES)}; only with --aggregator weighted "
        "(default: equal weights)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and order (default: 0)")
    parser.add_argument(
        "--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N' (default: auto)"
    )
    parser.add_argument("--out", type=Path, help="run folder to create (default: a new timestamped folder under runs/)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="training samples per step (default: 32). Below 8 the losses are noisy enough for the spike "
        "detector to roll back repeatedly, which can halt the run with exit code 3",
    )
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate (default: {DEFAULT_LR:g})")
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default: 1; this small network gains nothing from more, "
        "and extra threads slow it down on a busy machine)",
    )
    parser.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="FAULT@N",
        help="inject a fault (repeatable): tamiyo-hang@EPOCH, tamiyo-error@EPOCH, kasmina-hang@EPOCH, "
        "kasmina-error@EPOCH, nan@STEP (NaN loss) or spike@STEP (losses x1000); EPOCH and STEP count "
        "from 0 (EPOCH 2 is row 3 of the table), and spikes are detected after the loss monitor's warm-up "
        "of 16 steps",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its newest checkpoint with its saved options; "
        "--epochs may raise the total",
    )


def _default_run_dir(aggregator: str, seed: int) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = Path("runs") / f"{stamp}-{aggregator}-seed{seed}"
    candidate, suffix = base, 1
    while candidate.exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def _check_new_run_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file; expected a folder path")
    existing = [name for name in RUN_MARKERS if (path / name).exists()]
    if existing:
        raise UsageError(
            f"--out {path} already contains a run ({', '.join(existing)}); choose a new folder or use --resume {path}"
        )


def _name_options(message: str) -> str:
    """Replace ``TrainerConfig.<field>`` in a validation message with the option that sets it."""
    for field, option in FIELD_OPTIONS.items():
        message = message.replace(f"TrainerConfig.{field}:", f"{option}:")
    return message


def _apply_saved_options(args: argparse.Namespace) -> argparse.Namespace:
    """Return ``args`` with the options saved in ``--resume``'s run folder."""
    run_dir: Path = args.resume
    options_path = run_dir / OPTIONS_FILE
    if not options_path.is_file():
        raise UsageError(f"--resume {run_dir}: {OPTIONS_FILE} not found; expected a folder written by tolaria demo")
    try:
        saved = json.loads(options_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"--resume {run_dir}: cannot read {OPTIONS_FILE}: {error}") from error
    merged = argparse.Namespace(**{**vars(args), **{key: saved[key] for key in SAVED_OPTIONS if key in saved}})
    merged.epochs = args.epochs if args.epochs is not None else saved.get("epochs")
    merged.out = run_dir
    return merged


def _check_resume_target(run_dir: Path, epochs: int) -> None:
    """Raise unless the newest checkpoint in ``run_dir`` leaves epochs to train.

    Reading the checkpoint here, before anything runs, keeps a refused resume from
    writing to the run folder.
    """
    try:
        _, state = checkpoint.load_latest(run_dir / "checkpoints")
    except checkpoint.CheckpointError as error:
        raise UsageError(f"--resume {run_dir}: {error}") from error
    completed = int(state["extra"].get("epoch", 0))
    if completed >= epochs:
        raise UsageError(
            f"--resume {run_dir}: the run has already completed {completed} epochs; "
            f"pass --epochs greater than {completed} to train further"
        )


def build_config(args: argparse.Namespace) -> TrainerConfig:
    """Turn parsed options into a validated ``TrainerConfig``.

    Raises:
        UsageError: an option has an invalid value; the message names the option.
    """
    _check_option_values(args)
    if args.resume is None:
        out_dir = args.out if args.out is not None else _default_run_dir(args.aggregator, args.seed)
        _check_new_run_dir(out_dir)
    else:
        out_dir = args.resume
    weights = tuple(args.weights) if args.weights is not None else None
    if args.aggregator == "weighted" and weights is None:
        weights = (1.0,) * len(OBJECTIVES)
    try:
        config = TrainerConfig(
            epochs=args.epochs if args.epochs is not None else DEFAULT_EPOCHS,
            aggregator=args.aggregator,
            weights=weights,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            out_dir=out_dir,
            progress=not args.no_progress and sys.stderr.isatty(),
            emergency=EmergencyPolicy.from_mapping(DEMO_POLICY),
            control=DEMO_CONTROL,
            loss_monitor=DEMO_LOSS_MONITOR,
        )
        resolve_device(config.device)
    except ValueError as error:
        raise UsageError(_name_options(str(error))) from error
    return config


def _check_option_values(args: argparse.Namespace) -> None:
    """Raise ``UsageError`` for the option values that ``TrainerConfig`` would reject in Python API terms.

    For example, ``TrainerConfig`` expects ``weights=None`` for an aggregator without
    weights, while the command line has to say which option to add. ``TrainerConfig``
    checks the remaining values.
    """
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: got {args.batch_size}; expected an integer >= 1")
    if args.threads < 1:
        raise UsageError(f"--threads: got {args.threads}; expected an integer >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr: got {args.lr}; expected a finite number > 0 (default: {DEFAULT_LR:g})")
    if args.weights is not None and args.aggregator != "weighted":
        weights_text = " ".join(f"{weight:g}" for weight in args.weights)
        raise UsageError(
            f"--weights: got {weights_text} with --aggregator {args.aggregator}, which takes no weights; "
            "add --aggregator weighted to use them"
        )


def _fault_plan(tokens: list[str]) -> FaultPlan:
    try:
        return FaultPlan.parse(tokens, extra_kinds=LOSS_FAULTS)
    except ValueError as error:
        raise UsageError(f"--inject: {error}") from error


def _summary(config: TrainerConfig, result: FitResult, trainer: Trainer) -> dict[str, Any]:
    last = result.last
    guard = trainer.guard
    control = trainer.control
    counters = trainer.telemetry.counters

    def finite_values(values: Mapping[str, float]) -> dict[str, float | None]:
        return {name: finite_or_none(value) for name, value in values.items()}

    return {
        "epochs": trainer.position.epoch,
        "aggregator": config.aggregator,
        "seed": config.seed,
        "global_step": result.global_step,
        "val_accuracy": finite_values(last.val_accuracy if last else {}),
        "val_loss": finite_values(last.val_loss if last else {}),
        "train_loss": finite_values(last.train_loss if last else {}),
        "skipped_steps": int(counters.get("tolaria.anomaly.nonfinite", 0)),
        "spikes": guard.spikes,
        "rollbacks": guard.rollbacks,
        "skipped_batches": guard.skipped_batches,
        "emergency": {"max_level": Level(guard.emergency.max_level).name, "final_level": guard.emergency.level.name},
        "timeouts": {
            "tamiyo": int(counters.get("tolaria.timeout.tamiyo", 0)),
            "kasmina": int(counters.get("tolaria.timeout.kasmina", 0)),
        },
        "conservative_epochs": 0 if control is None else control.conservative_epochs,
        "halted": result.halted,
        "halt_reason": result.halt_reason,
        "wall_time_s": result.wall_time_s,
    }


def _save_options(args: argparse.Namespace, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {key: getattr(args, key) for key in SAVED_OPTIONS}
    options["epochs"] = options["epochs"] if options["epochs"] is not None else DEFAULT_EPOCHS
    write_json_atomic(out_dir / OPTIONS_FILE, options)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``tolaria demo`` with parsed options and return the exit code.

    Raises:
        UsageError: an option is invalid; nothing was written.
    """
    if args.resume is not None:
        args = _apply_saved_options(args)
    config = build_config(args)
    plan = _fault_plan(args.inject)
    if args.resume is not None:
        _check_resume_target(args.resume, config.epochs)
    torch.set_num_threads(args.threads)
    out_dir = config.out_dir or Path(".")
    # Every rank validates the options before rank 0 creates anything in the run folder.
    context = DistributedContext.from_environment(device=resolve_device(config.device))
    barrier(context)
    main_process = is_main_process(context)
    data = load_digits(seed=config.seed)
    torch.manual_seed(config.seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train, val = digits_batches(
        data, batch_size=args.batch_size, seed=config.seed, rank=context.rank, world_size=context.world_size
    )
    objectives = LossFaults(digits_objectives, plan.extra())
    table = EpochTable(OBJECTIVES)
    if main_process:
        # On a resume the saved options get the new epoch total.
        _save_options(args, out_dir)
        print(f"run folder: {out_dir}")
        table.print_header()
    with Trainer(
        model,
        optimizer,
        objectives,
        train,
        val,
        config,
        accuracy=digits_accuracy,
        callbacks=[table] if main_process else [],
        tamiyo=plan.wrap_tamiyo(PlateauPolicy(patience=3)),
        kasmina=plan.wrap_kasmina(OptimizerExecutor(optimizer)),
        distributed=context,
    ) as trainer:
        result = trainer.fit(resume_from=args.resume)
        summary = _summary(config, result, trainer)
    if not main_process:
        return EXIT_HALTED if result.halted else EXIT_OK
    write_json_atomic(out_dir / "summary.json", summary)
    accuracy = ", ".join(f"{name} {value:.3f}" for name, value in summary["val_accuracy"].items() if value is not None)
    # A run that halts before its first validation has no accuracy to show.
    print(f"validation accuracy: {accuracy or 'none measured'}; wall time {result.wall_time_s:.1f} s")
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'telemetry.jsonl'}")
    if result.halted:
        print(f"training halted: {result.halt_reason}", file=sys.stderr)
        return EXIT_HALTED
    return EXIT_OK
