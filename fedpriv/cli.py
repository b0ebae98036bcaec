"""The ``fedpriv`` command (Typer + rich).

Settings are merged once, here: RunConfig defaults < ``--config FILE.toml`` < flags. Any
:class:`~fedpriv.errors.FedprivError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedpriv.config import RunConfig, load_toml
from fedpriv.errors import ConfigError, FedprivError

__all__ = ["app", "main"]

app = typer.Typer(
    name="fedpriv",
    help="Privacy-preserving federated training for hospitals.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_RUN_FAILED = 1
T = TypeVar("T")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    # the message is text, not markup: "flwr[simulation]" or a column "age[y]" stays whole
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _guard(action: Callable[[], T]) -> T:
    """Run ``action``; turn our errors into one line and an exit code, never a traceback."""
    try:
        return action()
    except FedprivError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


def build_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_toml(config_file))
    for key in ("rounds", "local-epochs", "batch-size", "lr"):
        if flags.get(key) is not None and flags[key] <= 0:
            # 0 means "the recipe's" in files; on the command line it is a typo
            raise ConfigError(
                f"--{key} must be > 0 (got {flags[key]}); leave it out for the recipe's"
            )
    values.update({k: v for k, v in flags.items() if v is not None})
    return RunConfig.from_mapping(values)


@app.callback()
def _root() -> None:
    """Privacy-preserving federated training for hospitals."""


# ---- simulate --------------------------------------------------------------------------


@app.command()
def simulate(
    dataset: Annotated[
        str | None,
        typer.Option(help="breast-cancer, digits, or a path to a .npz (MedMNIST) or .csv"),
    ] = None,
    hospitals: Annotated[int | None, typer.Option(help="number of simulated hospitals")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid, dirichlet, label-skew or natural (by site column)")
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration (> 0)")] = None,
    classes_per_hospital: Annotated[
        int | None, typer.Option(help="classes each hospital holds under label-skew")
    ] = None,
    site_column: Annotated[
        str | None, typer.Option(help="CSV column naming each record's site (natural)")
    ] = None,
    label_column: Annotated[str | None, typer.Option(help="CSV column with the label")] = None,
    schema: Annotated[
        str | None,
        typer.Option(
            help="the federation's schema.toml: features normalised by its public ranges "
            "(default: an embedded dataset's own)"
        ),
    ] = None,
    normalisation: Annotated[
        str | None,
        typer.Option(
            help="auto (the schema if any), schema (its public ranges or centre/scale; "
            "required), federated (centre and scale from the hospitals' counts, sums and "
            "squares within the schema's ranges, DP noise added at each hospital and charged "
            "to its ledger; needs a schema) or file (per-file standardisation: pools every "
            "hospital's records)"
        ),
    ] = None,
    stats_epsilon: Annotated[
        float | None,
        typer.Option(
            help="normalisation federated: epsilon of the statistics release alone; DP-SGD "
            "gets what keeps both together at --epsilon [a quarter of --epsilon]"
        ),
    ] = None,
    patient_column: Annotated[
        str | None,
        typer.Option(help="CSV column naming each record's patient (the unit of privacy)"),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(help="federated rounds [10 with DP-SGD, else 5]")
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(help="fedavg, fedsgd, or Flower's fedprox, fedadam, fedyogi, fedavgm"),
    ] = None,
    server_lr: Annotated[
        float | None, typer.Option(help="server step size (FedSGD, FedAvgM)")
    ] = None,
    local_epochs: Annotated[
        int | None, typer.Option(help="local epochs per round [4 with DP-SGD, else 1]")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="local batch size (expected, under DP-SGD) [128 with DP-SGD, else 32]"),
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="local learning rate [1.0 with DP-SGD, else 0.1]")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="mlp or cnn (default: by the dataset; MLP under DP below 16x16)"),
    ] = None,
    model_width: Annotated[
        int | None, typer.Option(help="MLP hidden size / CNN channels (0: the model's default)")
    ] = None,
    model_activation: Annotated[
        str | None,
        typer.Option(help="relu, elu or tanh [ELU for the image MLP under DP-SGD, else ReLU]"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed for splits, sampling and init")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    gpus_per_hospital: Annotated[
        float | None, typer.Option(help="GPU share per simulated hospital (e.g. 0.25)")
    ] = None,
    dp: Annotated[
        bool | None,
        typer.Option(
            "--dp/--no-dp", help="DP-SGD at every hospital (on unless --no-dp)", show_default=False
        ),
    ] = None,
    epsilon: Annotated[
        float | None, typer.Option(help="target epsilon per hospital for the whole run [4]")
    ] = None,
    delta: Annotated[float | None, typer.Option(help="delta, below 1/n of every hospital")] = None,
    max_grad_norm: Annotated[
        float | None, typer.Option(help="per-sample gradient clipping norm C [1.0]")
    ] = None,
    noise_multiplier: Annotated[
        float | None, typer.Option(help="fixed noise multiplier instead of calibrating")
    ] = None,
    accountant: Annotated[str | None, typer.Option(help="prv or rdp [prv]")] = None,
    grad_sample_mode: Annotated[
        str | None, typer.Option(help="auto, hooks or ghost (Opacus per-sample gradients)")
    ] = None,
    budget_epsilon: Annotated[
        float | None, typer.Option(help="each hospital's lifetime epsilon cap [10]")
    ] = None,
    ledger_dir: Annotated[
        str | None,
        typer.Option(help="persistent directory for the hospitals' ledger (default: the run)"),
    ] = None,
    min_patients: Annotated[
        int | None,
        typer.Option(help="a hospital declines a round with fewer patients under the cap [10]"),
    ] = None,
    dp_level: Annotated[
        str | None, typer.Option(help="sample (DP-SGD), client (server-side), or both")
    ] = None,
    client_clip_norm: Annotated[
        float | None, typer.Option(help="client-level DP: clip norm S of a hospital's update")
    ] = None,
    client_noise_multiplier: Annotated[
        float | None, typer.Option(help="client-level DP: noise multiplier z")
    ] = None,
    fix_model: Annotated[
        bool | None,
        typer.Option("--fix-model", help="replace BatchNorm layers with GroupNorm for DP-SGD"),
    ] = None,
    aggregation: Annotated[
        str | None,
        typer.Option(
            help="plain, ckks (the server adds ciphertexts it cannot read) or secagg "
            "(pairwise masking: no key anyone holds alone)"
        ),
    ] = None,
    secagg_threshold: Annotated[
        int | None,
        typer.Option(help="secagg: hospitals needed to unmask a round [a majority]"),
    ] = None,
    secagg_one_exchange: Annotated[
        bool | None,
        typer.Option(
            "--secagg-one-exchange/--secagg-two-exchanges",
            help="secagg: rounds in one exchange while every hospital answers (a round "
            "someone misses is discarded, then two-exchange rounds); or always two, "
            "recovering drop-outs within the round [one]",
        ),
    ] = None,
    distributed_noise: Annotated[
        bool | None,
        typer.Option(
            "--distributed-noise",
            help="fedsgd + secagg + DP: each hospital adds only its share of the DP-SGD noise "
            "(the guarantee then assumes at most --noise-colluders collude with the server)",
        ),
    ] = None,
    noise_colluders: Annotated[
        int | None,
        typer.Option(
            help="distributed noise: hospitals that may collude with the server "
            "[-1: a minority, below the secagg threshold]"
        ),
    ] = None,
    he: Annotated[
        bool | None,
        typer.Option("--he", help="shorthand for --aggregation ckks"),
    ] = None,
    keys: Annotated[
        str | None,
        typer.Option(help="CKKS key directory (default: new keys in the run directory)"),
    ] = None,
    audit: Annotated[
        bool | None,
        typer.Option(
            "--audit",
            help="afterwards, run every attack the run allows (membership, inversion, "
            "attribute); in deployment each hospital runs the federated LOSS audit",
        ),
    ] = None,
    canaries: Annotated[
        int | None, typer.Option(help="plant M mislabelled canaries for a one-run audit")
    ] = None,
    reference_models: Annotated[
        int | None, typer.Option(help="reference models for LiRA/RMIA in --audit [4]")
    ] = None,
    quasi_identifiers: Annotated[
        str | None,
        typer.Option(
            help="linkage check per hospital: CSV columns that could identify a patient "
            "(k-anonymity, unique records; written to linkage.json)"
        ),
    ] = None,
    sensitive_column: Annotated[
        str | None,
        typer.Option(help="linkage check: the column whose l-diversity is reported"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML file with run-config keys")
    ] = None,
    out: Annotated[str | None, typer.Option(help="parent directory for run directories")] = None,
    name: Annotated[str | None, typer.Option(help="run directory name (default: time)")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue this run directory from its last checkpoint")
    ] = None,
) -> None:
    """Run a federation of simulated hospitals on this machine."""
    flags: dict[str, Any] = {
        "dataset": dataset,
        "hospitals": hospitals,
        "partition": partition,
        "alpha": alpha,
        "classes-per-hospital": classes_per_hospital,
        "site-column": site_column,
        "label-column": label_column,
        "schema": schema,
        "normalisation": normalisation,
        "stats-epsilon": stats_epsilon,
        "patient-column": patient_column,
        "rounds": rounds,
        "strategy": strategy,
        "server-lr": server_lr,
        "local-epochs": local_epochs,
        "batch-size": batch_size,
        "lr": lr,
        "model": model,
        "model-width": model_width,
        "model-activation": model_activation,
        "seed": seed,
        "device": device,
        "gpus-per-hospital": gpus_per_hospital,
        "dp": dp,
        "epsilon": epsilon,
        "delta": delta,
        "max-grad-norm": max_grad_norm,
        "noise-multiplier": noise_multiplier,
        "accountant": accountant,
        "grad-sample-mode": grad_sample_mode,
        "budget-epsilon": budget_epsilon,
        "ledger-dir": ledger_dir,
        "min-patients": min_patients,
        "dp-level": dp_level,
        "client-clip-norm": client_clip_norm,
        "client-noise-multiplier": client_noise_multiplier,
        "fix-model": fix_model,
        "aggregation": aggregation,
        "secagg-threshold": secagg_threshold,
        "secagg-one-exchange": secagg_one_exchange,
        "distributed-noise": distributed_noise,
        "noise-colluders": noise_colluders,
        "he": he,
        "keys": keys,
        "audit": audit,
        "canaries": canaries,
        "reference-models": reference_models,
        "out": out,
        "run-name": name,
    }

    def run() -> None:
        if resume is not None:
            changed = [k for k, v in flags.items() if v is not None and k != "rounds"]
            if changed or config is not None:
                raise ConfigError(
                    "--resume continues a run with its recorded settings; only --rounds may "
                    f"be given with it (got --{', --'.join(changed or ['config'])})"
                )
        if sensitive_column is not None and quasi_identifiers is None:
            raise ConfigError("--sensitive-column needs --quasi-identifiers")
        run_config = build_config(config, flags)
        _run_simulation(run_config, resume, linkage=(quasi_identifiers, sensitive_column))

    _guard(run)


def _run_simulation(
    config: RunConfig,
    resume: Path | None,
    *,
    linkage: tuple[str | None, str | None] = (None, None),
) -> None:
    from fedpriv.server import workers

    if workers.wanted():
        # the workers' imports overlap this process's from here on
        workers.start_early(config.cpus_per_hospital)
    from fedpriv.server.simulation import prepare_simulation, run_plan

    quasi_identifiers, sensitive = linkage
    if quasi_identifiers is not None:
        from fedpriv.privacy.audit.linkage import parse_columns

        columns = parse_columns(quasi_identifiers)
        if not str(config.dataset).lower().endswith(".csv"):
            raise ConfigError(
                "--quasi-identifiers needs a .csv dataset: linkage checks work on named columns"
            )
    plan = prepare_simulation(config, resume=resume)
    config = plan.config
    if quasi_identifiers is not None:
        _simulated_linkage(plan.run_dir, config, columns, sensitive)
    for notice in plan.notices:
        err_console.print(f"[bold yellow]warning:[/] {notice}", highlight=False)

    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    lock = threading.Lock()
    task = progress.add_task(
        "rounds", total=config.rounds, status="starting hospitals...", start=True
    )

    def on_round(row: dict[str, Any]) -> None:
        with lock:
            progress.update(task, completed=row["round"], status=_round_status(row, config))

    with _quiet_libraries(plan.run_dir.path), progress:
        if plan.resume is not None:
            progress.update(
                task,
                completed=plan.resume.round,
                status=f"resuming after round {plan.resume.round}",
            )
        result = run_plan(plan, on_round=on_round)
    _print_summary(result)
    if result.stopped:
        err_console.print(f"[yellow]run stopped early:[/] {result.stopped}", highlight=False)
        if not result.rows:
            err_console.print(
                f"[bold red]no round completed;[/] see {result.run_dir / 'flower.log'}",
                highlight=False,
            )
            raise typer.Exit(EXIT_RUN_FAILED)
    if config.audit:
        _run_audit(result.run_dir, reference_models=config.reference_models, attacks=None)
    else:
        from fedpriv.report import build_report

        console.print(f"report: {build_report(result.run_dir)}", highlight=False)


def _round_status(row: dict[str, Any], config: RunConfig) -> str:
    """The progress bar's status after a round: accuracies, the largest epsilon so far
    (marked conditional under distributed noise), declines."""
    parts = [f"acc {_fmt(row.get('eval_accuracy'))}"]
    if row.get("test_accuracy") is not None:
        parts.append(f"test {_fmt(row['test_accuracy'])}")
    if row.get("unaccounted"):
        parts.append(f"NO DP accounting from {', '.join(row['unaccounted'])}")
    elif row.get("epsilon"):
        bound = "" if row.get("epsilon_exact") else "≤ "
        conditional = " (conditional)" if config.distributed_noise else ""
        parts.append(f"ε {bound}{max(row['epsilon'].values()):.2f}{conditional}")
    if row.get("declined"):
        parts.append(f"{len(row['declined'])} declined")
    return "  ".join(parts)


def _simulated_linkage(
    run_dir: Any, config: RunConfig, columns: tuple[str, ...], sensitive: str | None
) -> None:
    """Each simulated hospital's linkage check on its own records, as its site would run
    it, into linkage.json (in a deployment, `fedpriv site check` keeps it at the site)."""
    import numpy as np

    from fedpriv.privacy.audit.linkage import hospital_linkage

    split = run_dir.read_partitions()
    reports = hospital_linkage(
        config.dataset,
        {h.name: np.concatenate([h.train, h.held_out]).tolist() for h in split.hospitals},
        columns,
        sensitive,
    )
    run_dir.write_json("linkage.json", {h: r.to_json() for h, r in reports.items()})
    for hospital, report in reports.items():
        diversity = "" if report.l_distinct is None else f", l-diversity {report.l_distinct}"
        console.print(
            f"linkage at {hospital}: k-anonymity {report.k}{diversity}, "
            f"{report.unique_records} unique record(s) on ({', '.join(columns)})",
            highlight=False,
        )


def _read_privacy(run_dir: Path) -> dict[str, Any]:
    import json

    path = Path(run_dir) / "privacy.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _print_summary(result: Any) -> None:
    if not result.rows:
        return
    final = result.final
    table = Table(title=f"Run {result.run_dir.name}: {result.last_round} rounds", show_lines=False)
    table.add_column("hospital")
    table.add_column("train records", justify="right")
    table.add_column("held-out records", justify="right")
    table.add_column("held-out accuracy", justify="right")
    table.add_column("held-out loss", justify="right")
    epsilons = final.get("epsilon") or {}
    if epsilons:
        table.add_column("epsilon spent", justify="right")
    for name, entry in sorted(final.get("hospitals", {}).items()):
        cells = [
            name,
            str(entry.get("train_examples", "-")),
            str(entry.get("num_examples", "-")),
            _fmt(entry.get("eval_accuracy")),
            _fmt(entry.get("eval_loss")),
        ]
        if epsilons:
            cells.append(_fmt(epsilons.get(name)))
        table.add_row(*cells)
    table.add_section()
    extra = [""] if epsilons else []
    table.add_row(
        "federation (weighted)",
        "",
        "",
        _fmt(final.get("eval_accuracy")),
        _fmt(final.get("eval_loss")),
        *([_fmt(max(epsilons.values()))] if epsilons else []),
    )
    if final.get("test_accuracy") is not None:
        table.add_row(
            "central test split",
            "",
            "",
            _fmt(final["test_accuracy"]),
            _fmt(final["test_loss"]),
            *extra,
        )
    console.print(table)
    config = result.config
    privacy = _read_privacy(result.run_dir)
    if config.sample_level_dp and privacy.get("unaccounted"):
        err_console.print(
            "[bold red]no DP guarantee:[/] "
            + str(privacy.get("no_claim_reason", "hospitals trained without DP accounting"))
            + "; no epsilon is claimed for this run",
            highlight=False,
        )
    elif config.sample_level_dp and privacy.get("max_epsilon") is not None:
        exact = privacy.get("max_epsilon_exact", False)
        excluded = sum(
            int(h.get("excluded_for_budget", 0)) for h in privacy.get("hospitals", {}).values()
        )
        console.print(
            f"patient-level DP: epsilon {'' if exact else '≤ '}{privacy['max_epsilon']:.2f} at "
            f"delta {privacy.get('delta', config.delta):g} per patient "
            f"({config.accountant.upper() if exact else 'RDP bound'}, max over hospitals, every "
            "recorded run composed)"
            + (f"; {excluded} patient(s) left out for budget" if excluded else ""),
            highlight=False,
        )
    split = privacy.get("distributed_noise")
    if config.sample_level_dp and isinstance(split, dict) and privacy.get("max_epsilon"):
        fallback = split.get("max_fallback_epsilon", split.get("max_fallback_planned_epsilon"))
        console.print(
            "conditional (distributed noise): holds while at most "
            f"{split.get('colluders')} hospitals collude with the server"
            + (
                f"; if more do, epsilon ≤ {float(fallback):.2f} per patient"
                if isinstance(fallback, int | float)
                else ""
            ),
            highlight=False,
        )
    if config.client_level_dp and final.get("client_epsilon") is not None:
        console.print(
            f"hospital-level DP: epsilon {final['client_epsilon']:.2f} at delta {config.delta:g}",
            highlight=False,
        )
    console.print(f"run directory: [bold]{result.run_dir}[/]", highlight=False)


# ---- audit and report ------------------------------------------------------------------

EXIT_AUDIT_FAILED = 3


@app.command("audit")
def audit_command(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    attacks: Annotated[
        str | None,
        typer.Option(
            help="comma-separated, from loss, lira, lira-offline, rmia, inversion, attribute "
            "[default: every attack the run's files allow]"
        ),
    ] = None,
    sensitive_feature: Annotated[
        str | None,
        typer.Option(help="attribute inference: the hidden feature, by name or index"),
    ] = None,
    inversion_records: Annotated[
        int | None, typer.Option(help="inversion: records attacked (bounds its cost)")
    ] = None,
    inversion_steps: Annotated[
        int | None, typer.Option(help="inversion: optimiser steps per reconstruction")
    ] = None,
    inversion_batch: Annotated[
        int | None, typer.Option(help="inversion: records in the attacked round's batch")
    ] = None,
    reference_models: Annotated[
        int, typer.Option(help="reference models for LiRA/RMIA (the audit's main cost)")
    ] = 4,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the intervals")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the audit's own randomness")] = 0,
) -> None:
    """Attack a finished run (membership, inversion, attribute inference); write audit.json
    and report.html; print each attack's verdict."""
    options = {
        "sensitive_feature": sensitive_feature,
        "inversion_records": inversion_records,
        "inversion_steps": inversion_steps,
        "inversion_batch": inversion_batch,
    }
    _guard(
        lambda: _run_audit(
            run_dir,
            attacks=None
            if attacks is None
            else tuple(a.strip() for a in attacks.split(",") if a.strip()),
            reference_models=reference_models,
            bootstrap=bootstrap,
            seed=seed,
            options={k: v for k, v in options.items() if v is not None},
        )
    )


def _run_audit(
    run_dir: Path,
    *,
    attacks: tuple[str, ...] | None = None,
    reference_models: int = 4,
    bootstrap: int = 200,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> None:
    from fedpriv.privacy.audit import audit_run
    from fedpriv.report import build_report

    if not Path(run_dir).is_dir():
        raise ConfigError(f"run directory '{run_dir}' does not exist")
    if attacks is not None and not attacks:
        raise ConfigError("--attacks names no attack")
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def tick(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=max(total, 1))
        progress.update(tasks[name], completed=done, total=max(total, 1))

    with _quiet_libraries(Path(run_dir)), progress:
        document = audit_run(
            run_dir,
            attacks=attacks,
            reference_models=reference_models,
            bootstrap_samples=bootstrap,
            seed=seed,
            options=options,
            progress=tick,
            on_reference_model=lambda done, total: tick("reference models", done, total),
        )
    _print_audit(document)
    report = build_report(run_dir)
    console.print(f"audit: {Path(run_dir) / 'audit.json'}   report: {report}", highlight=False)
    if document["verdict"] == "fail":
        err_console.print(
            "[bold red]AUDIT FAILED: an empirical epsilon lower bound exceeds the accounted "
            "epsilon, so the DP guarantee does not hold (a DP bug):[/] "
            + "; ".join(document["failures"]),
            highlight=False,
        )
        raise typer.Exit(EXIT_AUDIT_FAILED)


def _print_audit(document: dict[str, Any]) -> None:
    """The membership table, one line per other attack, what could not run, the verdict."""
    attacks = document["attacks"]
    membership = {n: e for n, e in attacks.items() if "auc_ci" in e}
    if membership:
        table = Table(title="Membership inference (guessing: AUC 0.5)")
        for column in (
            "attack",
            "AUC [95% CI]",
            "TPR@1% FPR",
            "bal. acc.",
            "eps LB (CP)",
            "eps LB (GDP)",
        ):
            table.add_column(column, justify="left" if column == "attack" else "right")
        for name, entry in membership.items():
            resolvable = entry["tpr_at_fpr_resolvable"]["0.01"]
            table.add_row(
                name,
                f"{entry['auc']:.3f} [{entry['auc_ci'][0]:.3f}, {entry['auc_ci'][1]:.3f}]",
                _fmt(entry["tpr_at_fpr"]["0.01"]) + ("" if resolvable else " n/r"),
                _fmt(entry["balanced_accuracy"]),
                _fmt(entry["epsilon_lower_bound"]),
                _fmt(entry["epsilon_lower_bound_gdp"]),
            )
        console.print(table)
        console.print(
            f"{document['members']} members, {document['non_members']} non-members",
            highlight=False,
        )
    if "canaries" in document:
        canary = document["canaries"]
        console.print(
            f"one-run canary audit: {canary['canaries']} canaries, epsilon lower bound "
            f"{canary['epsilon_lower_bound']:.3f}",
            highlight=False,
        )
    if "federated" in document:
        federated = document["federated"]
        console.print(
            f"federated LOSS audit (counts from {len(federated.get('per_hospital', {}))} "
            f"hospitals): AUC {_fmt(federated.get('auc'))}",
            highlight=False,
        )
    colours = {"leak": "bold red", "no-leak": "green", "inconclusive": "yellow"}
    for name, entry in attacks.items():
        verdict = str(entry.get("verdict", ""))
        console.print(
            f"[{colours.get(verdict, 'bold')}]{name}: {verdict}[/] - {entry.get('reading', '')}",
            highlight=False,
            soft_wrap=True,
        )
    for name, reason in document.get("skipped", {}).items():
        console.print(f"[yellow]{name}: not run[/] - {reason}", highlight=False, soft_wrap=True)
    accounted = document.get("accounted_epsilon_max")
    leaks = document.get("leaks", [])
    verdict = document["verdict"]
    if verdict == "no-dp":
        line = "[bold yellow]trained without DP[/]: no guarantee to compare the figures to"
    elif verdict == "unchecked":
        line = f"accounted epsilon {_fmt(accounted)} (no membership attack ran to check it)"
    else:
        line = (
            f"accounted epsilon {_fmt(accounted)}: every empirical bound stays under it"
            if verdict == "pass"
            else f"accounted epsilon {_fmt(accounted)}: [bold red]an empirical bound exceeds it[/]"
        )
    console.print(
        f"[bold]audit verdict:[/] {line}; "
        + (
            f"[bold red]leaks found by: {', '.join(leaks)}[/]"
            if leaks
            else "no attack beat its no-information baseline"
        ),
        highlight=False,
        soft_wrap=True,
    )


@contextlib.contextmanager
def _quiet_libraries(run_dir: Path) -> Iterator[None]:
    """Library warnings and log records (Opacus, PyTorch) go to the run's log, flower.log,
    not the terminal, where they would read as fedpriv's own problems."""
    import logging
    import warnings

    try:
        handler: logging.Handler = logging.FileHandler(
            run_dir / "flower.log", encoding="utf-8", delay=True
        )
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("py.warnings", "opacus")]
    saved = [(lg, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            for lg, propagate in saved:
                lg.removeHandler(handler)
                lg.propagate = propagate
            handler.close()


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory")],
) -> None:
    """Rebuild report.html from a run directory."""

    def run() -> None:
        from fedpriv.report import build_report

        console.print(f"report: [bold]{build_report(run_dir)}[/]", highlight=False)

    _guard(run)


# ---- keys ------------------------------------------------------------------------------

keys_app = typer.Typer(help="CKKS keys for homomorphic aggregation.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
def keys_init(
    out: Annotated[Path, typer.Option(help="directory for secret.ctx and public.ctx")],
) -> None:
    """Create a key set: secret.ctx for every hospital, public.ctx for the server (0600)."""

    def run() -> None:
        from fedpriv.privacy.he import PUBLIC_FILE, SECRET_FILE, write_keys

        fingerprint = write_keys(out)
        console.print(f"fingerprint [bold]{fingerprint}[/]", highlight=False)
        console.print(
            f"  {out / SECRET_FILE}  hospitals only (secret key; copy it to every site)\n"
            f"  {out / PUBLIC_FILE}  the server (no secret key: it can only add)",
            highlight=False,
        )

    _guard(run)


@keys_app.command("show")
def keys_show(path: Annotated[Path, typer.Argument(help="a secret.ctx or public.ctx")]) -> None:
    """Print a key file's fingerprint and whether it can decrypt."""

    def run() -> None:
        from fedpriv.privacy.he import HeError, load_context

        try:
            context = load_context(path, role="hospital")
        except HeError:
            context = load_context(path, role="server")
        kind = "secret (hospitals)" if context.can_decrypt else "public (server)"
        console.print(f"{path}: {kind}, fingerprint {context.fingerprint}", highlight=False)

    _guard(run)


@keys_app.command("decrypt-model")
def keys_decrypt_model(
    run_dir: Annotated[Path, typer.Argument(help="a run directory holding model.ckks.npz")],
    secret: Annotated[Path, typer.Option(help="the hospitals' secret.ctx")],
) -> None:
    """Decrypt an encrypted final model (what a real server keeps under HE) into model.pt."""

    def run() -> None:
        from fedpriv.server.rundir import RunDirectory, decrypt_final_model

        path = decrypt_final_model(RunDirectory.open(run_dir), secret)
        console.print(f"decrypted the final model into [bold]{path}[/]", highlight=False)

    _guard(run)


# ---- certs -----------------------------------------------------------------------------

certs_app = typer.Typer(
    help="TLS certificates and SuperNode keys for a deployment.", no_args_is_help=True
)
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option(help="directory for the CA, certificates and keys")],
    host: Annotated[
        list[str], typer.Option(help="a name or IP the hospitals use for the SuperLink (repeat)")
    ],
    hospital: Annotated[
        list[str], typer.Option(help="a hospital that gets a SuperNode key pair (repeat)")
    ],
    days: Annotated[int, typer.Option(help="validity of the certificates")] = 365,
) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate and SuperNode key pairs."""

    def run() -> None:
        from fedpriv.certs import init_certs

        files = init_certs(out, hosts=host, hospitals=hospital, days=days)
        console.print(f"CA              {files.ca_certificate}  (give to every hospital)")
        console.print(f"CA key          {files.ca_key}  (keep offline)")
        console.print(f"SuperLink       {files.superlink_certificate}, {files.superlink_key}")
        for name, (private, public) in files.supernode_keys.items():
            console.print(
                f"{name:<15} {private}  (to the hospital only), {public}  (register it)",
                highlight=False,
            )

    _guard(run)


# ---- site ------------------------------------------------------------------------------

site_app = typer.Typer(
    help="A hospital's own settings (its SuperNode's node config).", no_args_is_help=True
)
app.add_typer(site_app, name="site")


@site_app.command("warm")
def site_warm(
    node_config: Annotated[
        str,
        typer.Option(
            "--node-config",
            help="the SuperNode's --node-config, exactly as it is given to flower-supernode",
        ),
    ],
    watch_pid: Annotated[
        int,
        typer.Option(
            help="the SuperNode's process id: the worker stops when it is gone (0: only "
            "when idle for warm-worker-idle seconds)"
        ),
    ] = 0,
    if_enabled: Annotated[
        bool,
        typer.Option(
            "--if-enabled",
            help="a node config that runs no warm worker is not an error: say so and exit 0 "
            "(for an entrypoint that starts the worker whenever the site wants one)",
        ),
    ] = False,
) -> None:
    """Start the site's warm worker now, before its SuperNode's first message, so the first
    round does not wait for PyTorch's and fedpriv's imports (e.g. in the SuperNode's
    entrypoint: `fedpriv site warm --node-config "$CONFIG" --watch-pid $$ && exec
    flower-supernode ... --node-config "$CONFIG"`)."""

    def run() -> None:
        from flwr.common.config import parse_config_args

        from fedpriv.client import warm

        try:
            parsed = parse_config_args([node_config])
        except Exception as exc:  # Flower's TOML parser: any of its errors is bad input
            raise ConfigError(f"--node-config cannot be read: {exc}") from None
        if not warm.enabled(parsed):
            why = (
                "this node config runs no warm worker (no data-path, warm-worker = false, "
                f"or {warm.ENVIRONMENT}=0): nothing to start"
            )
            if if_enabled:
                console.print(why, highlight=False, soft_wrap=True, markup=False)
                return
            raise ConfigError(why)
        warm.settings(parsed)  # a bad warm-worker-idle is named here, not in the worker
        try:
            path = warm.prestart(parsed, watch_pid=watch_pid)
        except (OSError, warm.WarmWorkerError) as exc:
            raise ConfigError(f"the warm worker did not start: {exc}") from None
        console.print(f"warm worker listening on {path}", highlight=False, soft_wrap=True)

    _guard(run)


@site_app.command("check")
def site_check(
    settings: Annotated[Path, typer.Argument(help="the site's settings, e.g. site.toml")],
    schema: Annotated[
        Path | None,
        typer.Option(
            help="the federation's schema.toml to check the site's file against "
            "(default: the site's schema-path)"
        ),
    ] = None,
    quasi_identifiers: Annotated[
        str | None,
        typer.Option(
            help="comma-separated CSV columns an outsider could know (e.g. age,zip,sex): "
            "report k-anonymity and the records unique on them"
        ),
    ] = None,
    sensitive_column: Annotated[
        str | None,
        typer.Option(help="the CSV column to report l-diversity of (e.g. diagnosis)"),
    ] = None,
    threshold: Annotated[
        int, typer.Option(min=1, help="groups smaller than this count as at risk")
    ] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check a hospital's settings before starting its SuperNode (data, ledger, key, device),
    and optionally how re-identifiable its records are. Everything runs on this machine."""

    def run() -> None:
        from fedpriv.client.site import (
            SiteSettings,
            check_site,
            load_site_file,
            site_linkage,
            site_schema_problems,
        )
        from fedpriv.data.schema import load_schema
        from fedpriv.privacy.audit.linkage import parse_columns

        if sensitive_column is not None and quasi_identifiers is None:
            raise ConfigError("--sensitive-column needs --quasi-identifiers to group records by")
        qi = parse_columns(quasi_identifiers) if quasi_identifiers is not None else None
        node_config = load_site_file(settings)
        chosen = (
            load_schema(schema)
            if schema is not None
            else SiteSettings.from_node_config(node_config).load_schema()
        )
        if chosen is not None:
            problems = site_schema_problems(node_config, chosen)
            if problems:  # every column at once: one line each, then a non-zero exit
                if as_json:
                    import json

                    typer.echo(json.dumps({"settings": str(settings), "schema": problems}))
                for line in problems:
                    err_console.print(
                        f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True
                    )
                raise typer.Exit(EXIT_BAD_INPUT)
        found = check_site(node_config, chosen)
        linkage = (
            site_linkage(node_config, qi, sensitive_column, threshold=threshold)
            if qi is not None
            else None
        )
        if as_json:
            import json

            typer.echo(
                json.dumps(
                    {
                        "settings": str(settings),
                        "checks": found,
                        "linkage": linkage.to_json() if linkage is not None else None,
                        "sent": "nothing: computed on this machine from the site's own file",
                    },
                    indent=2,
                )
            )
            return
        for line in found:
            console.print(f"[green]ok[/]  {line}", highlight=False)
        if linkage is None:
            return
        mark = "[green]ok[/]" if linkage.k >= linkage.threshold else "[yellow]risk[/]"
        console.print(
            f"{mark}  linkage on ({', '.join(linkage.quasi_identifiers)}): k = {linkage.k}, "
            f"{linkage.equivalence_classes} groups over {linkage.records} records",
            highlight=False,
        )
        if linkage.unique_records:
            shown = ", ".join(str(r) for r in linkage.unique_rows[:10])
            more = ", ..." if linkage.unique_records > 10 else ""
            console.print(
                f"      {linkage.unique_records} records are unique on them: rows {shown}{more} "
                "(row 1 = the first record below the header)",
                highlight=False,
            )
        if linkage.l_distinct is not None:
            mark = "[green]ok[/]" if linkage.l_distinct >= 2 else "[yellow]risk[/]"
            console.print(
                f"{mark}  l-diversity of '{linkage.sensitive_column}': distinct l = "
                f"{linkage.l_distinct}, entropy l = {linkage.l_entropy:.2f}",
                highlight=False,
            )
        for line in linkage.advice():
            console.print(f"      {line}", highlight=False)
        console.print(
            "      computed on this machine from the site's own file; nothing was sent",
            highlight=False,
        )

    _guard(run)


# ---- schema ----------------------------------------------------------------------------

schema_app = typer.Typer(
    help="The federation's schema: feature names, public ranges, label codes.",
    no_args_is_help=True,
)
app.add_typer(schema_app, name="schema")


@schema_app.command("init")
def schema_init(
    data: Annotated[Path, typer.Argument(help="a .csv file to draft the schema from")],
    out: Annotated[Path, typer.Option(help="where to write the draft")] = Path("schema.toml"),
    label_column: Annotated[str, typer.Option(help="the label column")] = "label",
    patient_column: Annotated[str, typer.Option(help="the patient column (not a feature)")] = "",
    site_column: Annotated[str, typer.Option(help="the site column (not a feature)")] = "site",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write a DRAFT schema from one file for the federation to agree on: its ranges are
    that file's extremes (marked so in the file) until replaced by public ones."""

    def run() -> None:
        from fedpriv.data.datasets import load_raw
        from fedpriv.data.schema import draft_schema
        from fedpriv.errors import DataError

        if data.suffix.lower() != ".csv":
            raise DataError(f"'{data}': a schema is drafted from a .csv file's columns")
        if out.exists() and not force:
            raise ConfigError(f"'{out}' exists: pass --force to overwrite it")
        from fedpriv.privacy.audit.linkage import read_csv_rows

        rows = read_csv_rows(data)
        roles = {label_column, patient_column, site_column}
        numeric, text = [], []
        for name in rows[0] if rows else {}:
            if name in roles:
                continue
            try:
                [float(row[name]) for row in rows]
                numeric.append(name)
            except ValueError:
                text.append(name)
        raw = load_raw(
            str(data),
            label_column=label_column,
            site_column=site_column,
            patient_column=patient_column,
            feature_columns=tuple(numeric),
        )
        if not numeric:
            raise DataError(f"'{data}' has no numeric feature column to draft a schema from")
        assert raw.raw_features is not None
        columns = {n: raw.raw_features[:, j] for j, n in enumerate(raw.feature_names)}
        draft = draft_schema(columns, raw.record_label_codes(), derived_from=str(data))
        draft.save(out)
        console.print(
            f"wrote {out}: {len(draft.features)} features ({draft.width} model inputs), "
            f"{draft.num_classes} label codes, digest {draft.digest[:12]}"
            + (f"; left out (not numbers): {', '.join(text)}" if text else ""),
            highlight=False,
        )
        err_console.print(
            f"[bold yellow]warning:[/] a DRAFT derived from '{data}': its ranges are that "
            "file's own minima and maxima; replace them with public ranges the federation "
            "agrees on before sharing it",
            highlight=False,
        )

    _guard(run)


@schema_app.command("show")
def schema_show(path: Annotated[Path, typer.Argument(help="a schema.toml")]) -> None:
    """Print a schema's features, label codes and digest (what sites compare)."""

    def run() -> None:
        from fedpriv.data.schema import NUMERIC, load_schema

        loaded = load_schema(path)
        table = Table(title=f"{path} (digest {loaded.digest})")
        table.add_column("#", justify="right")
        table.add_column("feature")
        table.add_column("kind")
        table.add_column("range / categories")
        for i, f in enumerate(loaded.features):
            values = (
                f"[{f.minimum:g}, {f.maximum:g}]"
                if f.kind == NUMERIC
                else ", ".join(f"{c:g}" for c in f.categories)
            )
            kind = f.kind if f.kind == NUMERIC else f"{f.kind}, {f.encoding}"
            table.add_row(str(i), f.name, kind, values)
        console.print(table)
        console.print(f"model inputs: {loaded.width}", highlight=False)
        labels = ", ".join(
            f"{lab.code}={lab.name}" if lab.name else lab.code for lab in loaded.labels
        )
        console.print(f"labels: {labels}", highlight=False)
        if loaded.derived_from:
            console.print(f"[yellow]draft derived from '{loaded.derived_from}'[/]", highlight=False)

    _guard(run)


# ---- budget ----------------------------------------------------------------------------

budget_app = typer.Typer(
    help="What each patient has spent of a site's lifetime privacy budget.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(budget_app, name="budget")


@budget_app.callback(invoke_without_command=True)
def budget(
    ctx: typer.Context,
    ledger: Annotated[
        list[Path] | None, typer.Option("--ledger", help="a site's ledger file (repeatable)")
    ] = None,
    ledger_dir: Annotated[
        Path | None, typer.Option(help="a directory of ledgers (*.sqlite), e.g. a run's ledgers/")
    ] = None,
    patient: Annotated[
        str | None, typer.Option(help="one patient's spend, by the ID in the patient column")
    ] = None,
    over: Annotated[
        float | None, typer.Option(help="count the patients at or over this epsilon [the cap]")
    ] = None,
    histogram: Annotated[
        bool, typer.Option("--histogram", help="how many patients at each level of epsilon")
    ] = False,
    exact: Annotated[
        bool,
        typer.Option("--exact", help="compute exact epsilons the hospitals did not (slower)"),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Show what each site's patients have spent: the largest epsilon of any patient, how
    many are at or over the cap, and (with --patient) one patient's spend."""
    if ctx.invoked_subcommand is not None:
        return

    def run() -> None:
        from fedpriv.privacy.ledger import Ledger

        paths = _ledger_paths(ledger, ledger_dir)
        if over is not None and not (over >= 0):
            raise ConfigError(f"--over must be a number >= 0 (got {over})")
        payload = []
        for path in paths:
            opened = Ledger.open(path, writable=False, need_key=patient is not None)
            summary = opened.summary(threshold=over, exact=exact)
            entry: dict[str, Any] = {"summary": summary}
            if histogram:
                entry["histogram"] = _histogram(summary)
            if patient is not None:
                entry["patient"] = opened.patient(patient, exact=exact)
            payload.append(entry)
        if as_json:
            import dataclasses
            import json

            def plain(entry: dict[str, Any]) -> dict[str, Any]:
                out: dict[str, Any] = {
                    k: v if isinstance(v, list) else dataclasses.asdict(v) for k, v in entry.items()
                }
                out["summary"]["remaining"] = max(
                    0.0, entry["summary"].budget_epsilon - entry["summary"].max_epsilon
                )
                return out

            typer.echo(json.dumps([plain(e) for e in payload], indent=2))
            return
        _print_budget(payload, patient)

    _guard(run)


def _ledger_paths(ledger: list[Path] | None, ledger_dir: Path | None) -> list[Path]:
    paths = list(ledger or [])
    if ledger_dir is not None:
        if not ledger_dir.is_dir():
            raise ConfigError(f"--ledger-dir '{ledger_dir}' is not a directory")
        found = sorted(ledger_dir.glob("*.sqlite"))
        if not found:
            raise ConfigError(f"no ledgers (*.sqlite) in '{ledger_dir}'")
        paths += found
    if not paths:
        raise ConfigError("give --ledger PATH or --ledger-dir DIR")
    return paths


def _histogram(summary: Any, bins: int = 10) -> list[dict[str, Any]]:
    """Patients per epsilon band, from 0 to the cap (or to the largest epsilon when every
    patient is far below the cap), and one band at or over the cap."""
    cap = summary.budget_epsilon
    top = cap if summary.max_epsilon >= cap / 4 else max(summary.max_epsilon * 1.05, 1e-9)
    edges = [top * i / bins for i in range(bins + 1)]
    rows = []
    for low, high in itertools.pairwise(edges):
        count = sum(n for eps, _, n in summary.groups if low <= eps < high and eps < cap)
        rows.append({"from": low, "to": high, "patients": count})
    rows.append(
        {"from": cap, "to": None, "patients": sum(n for eps, _, n in summary.groups if eps >= cap)}
    )
    return rows


def _print_budget(payload: list[dict[str, Any]], patient: str | None) -> None:
    table = Table(title="Privacy budget per patient, for life")
    table.add_column("ledger", no_wrap=True)
    for column in ("patients", "rounds", "runs", "largest ε", "at/over", "cap (delta)"):
        table.add_column(column, justify="right", no_wrap=True)
    for entry in payload:
        s = entry["summary"]
        table.add_row(
            Path(s.ledger).name,
            str(s.patients),
            str(s.events),
            str(s.runs),
            ("" if s.max_exact else "≤ ") + f"{s.max_epsilon:.3f}",
            f"{s.at_or_over} ≥ {s.threshold:g}",
            f"{s.budget_epsilon:g} ({s.delta:g})",
        )
    console.print(table)
    for entry in payload:
        s = entry["summary"]
        identity = (
            f"the patient column '{s.identity.split(':', 1)[1]}'"
            if ":" in s.identity
            else "each record's content (no patient column)"
        )
        console.print(
            f"{Path(s.ledger).name}: {', '.join(s.hospitals) or 'no hospital yet'}; "
            f"{s.accountant.upper()} accountant; patients identified by {identity}",
            highlight=False,
        )
    for entry in payload:
        s = entry["summary"]
        if s.conditional_runs and s.max_epsilon_if_colluding is not None:
            assumed = ", ".join(
                f"{run} (at most {c} of t = {t})" for run, c, t in s.conditional_runs
            )
            console.print(
                f"{Path(s.ledger).name}: conditional: {len(s.conditional_runs)} run(s) split "
                f"their noise across hospitals (distributed noise): {assumed} colluding with "
                "the server; if more collude, the largest ε is "
                f"{'' if s.max_if_colluding_exact else '≤ '}{s.max_epsilon_if_colluding:.3f}",
                highlight=False,
            )
    if any(not e["summary"].max_exact for e in payload):
        console.print(
            "≤: an upper bound (RDP); the exact value is computed at a run's last round, or "
            "with --exact",
            highlight=False,
        )
    for entry in payload:
        if "histogram" in entry:
            s = entry["summary"]
            console.print(f"\n{Path(s.ledger).name}: patients by epsilon", highlight=False)
            largest = max((b["patients"] for b in entry["histogram"]), default=0) or 1
            for band in entry["histogram"]:
                label = (
                    f"{band['from']:7.3f} - {band['to']:7.3f}"
                    if band["to"] is not None
                    else f"{band['from']:7.3f} + (cap)"
                )
                bar = "#" * round(30 * band["patients"] / largest)
                console.print(f"  {label} {band['patients']:>8}  {bar}", highlight=False)
        if patient is not None:
            spend = entry["patient"]
            name = Path(entry["summary"].ledger).name
            if not spend.known:
                console.print(f"{name}: patient {patient!r} has no recorded spend", highlight=False)
            else:
                console.print(
                    f"{name}: patient {patient!r}: epsilon {spend.epsilon:.3f}"
                    f"{'' if spend.exact else ' (upper bound)'} over {spend.events} recorded "
                    f"rounds; cap {entry['summary'].budget_epsilon:g}",
                    highlight=False,
                )


@budget_app.command("migrate")
def budget_migrate(
    ledger: Annotated[Path, typer.Option("--ledger", help="a ledger written by an older fedpriv")],
    patient_column: Annotated[
        str,
        typer.Option(help="the site's patient column, if its data names one (the identity mode)"),
    ] = "",
    delta: Annotated[
        float | None, typer.Option(help="the ledger's delta [the smallest any run used]")
    ] = None,
    budget_epsilon: Annotated[
        float | None, typer.Option(help="the ledger's cap [the smallest recorded]")
    ] = None,
) -> None:
    """Convert a per-dataset (schema 1) ledger to per-patient accounting, keeping every
    event (counted against every patient) and a copy of the original."""

    def run() -> None:
        from fedpriv.privacy.identity import IDENTITY_PATIENT, IDENTITY_RECORD
        from fedpriv.privacy.ledger import migrate

        identity = f"{IDENTITY_PATIENT}:{patient_column}" if patient_column else IDENTITY_RECORD
        backup, events = migrate(
            ledger, identity=identity, delta=delta, budget_epsilon=budget_epsilon
        )
        console.print(
            f"migrated {ledger}: {events} events kept, each counted against every patient "
            f"(an older ledger did not record which); the original is in {backup}",
            highlight=False,
        )

    _guard(run)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    except Exception as exc:  # a bug: keep the traceback out of the user's face, but say so
        err_console.print(
            f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
            "(please report it; rerun with FEDPRIV_DEBUG=1 for the traceback)",
            highlight=False,
        )
        import os

        if os.environ.get("FEDPRIV_DEBUG"):
            raise
        sys.exit(EXIT_RUN_FAILED)


if __name__ == "__main__":
    main()
