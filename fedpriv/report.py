"""``report.html``: one self-contained file (plots embedded) built from a run directory alone.

Accuracy per round, epsilon per hospital per round, and, once audited, log-log ROC curves per
attack and a table of empirical against accounted epsilon per hospital.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["REPORT_FILE", "build_report"]

REPORT_FILE = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
color:#1d2430;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
td,th{border:1px solid #ccd;padding:.3em .6em;text-align:right}th{background:#f1f3f8}
td:first-child,th:first-child{text-align:left}
.fail{background:#fde2e2;border:1px solid #d33;padding:.6em 1em;font-weight:600}
.pass{background:#e3f6e8;border:1px solid #3a3;padding:.6em 1em}
.nodp{background:#fff4d6;border:1px solid #c90;padding:.6em 1em}
.muted{color:#667}img{max-width:100%}
"""


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _accuracy_plot(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    rounds = [r["round"] for r in rows]
    for key, label in (
        ("eval_accuracy", "held-out (federated)"),
        ("test_accuracy", "central test"),
    ):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(rounds, [math.nan if v is None else v for v in values], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _epsilon_plot(rows: list[dict[str, Any]]) -> str | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for hospital, eps in (row.get("epsilon") or {}).items():
            series.setdefault(hospital, []).append((row["round"], eps))
    if not series:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for hospital, points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=hospital)
    ax.set_xlabel("round")
    ax.set_ylabel("epsilon spent")
    ax.grid(alpha=0.3)
    if len(series) <= 10:
        ax.legend(fontsize=8)
    return _png(fig)


def _roc_plot(attacks: dict[str, Any]) -> str | None:
    if not attacks:
        return None
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    floor = 1e-4
    for name, entry in attacks.items():
        roc = entry.get("roc") or {}
        fpr = [max(v, floor) for v in roc.get("fpr", [])]
        tpr = [max(v, floor) for v in roc.get("tpr", [])]
        if fpr:
            ax.plot(fpr, tpr, label=f"{name} (AUC {entry['auc']:.3f})")
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle="--", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _png(fig)


def _config_table(config: dict[str, Any], privacy: dict[str, Any]) -> str:
    """The run's settings. Where the run can claim no DP (a hospital trained without
    accounting), its DP settings are shown as what was asked for, not as a guarantee."""
    shown = dict(config)
    if privacy.get("unaccounted"):
        shown["dp"] = "asked for, NOT accounted"
        for key in ("epsilon", "delta", "budget-epsilon"):
            if key in shown:
                shown[key] = f"{shown[key]:g} asked for (no guarantee)"
    keys = [
        "dataset",
        "hospitals",
        "partition",
        "rounds",
        "strategy",
        "local-epochs",
        "batch-size",
        "lr",
        "model",
        "dp",
        "dp-level",
        "epsilon",
        "delta",
        "max-grad-norm",
        "accountant",
        "budget-epsilon",
        "he",
        "seed",
    ]
    cells = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{_setting(k, shown.get(k))}</td></tr>"
        for k in keys
        if k in shown
    )
    return f"<table><tr><th>setting</th><th>value</th></tr>{cells}</table>"


def _setting(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "delta" and isinstance(value, float):
        return _fmt_small(value)
    return _fmt(value)


def _audit_section(audit: dict[str, Any]) -> str:
    attacks = audit.get("attacks", {})
    verdict = audit.get("verdict")
    parts = ["<h2>Membership-inference audit</h2>"]
    if verdict == "fail":
        failures = "".join(f"<li>{html.escape(f)}</li>" for f in audit.get("failures", []))
        parts.append(
            "<div class='fail'>An empirical lower bound exceeds the accounted epsilon: the DP "
            f"guarantee does not hold (a DP bug).<ul>{failures}</ul></div>"
        )
    elif verdict == "pass":
        parts.append(
            "<div class='pass'>Every empirical lower bound stays under the accounted epsilon.</div>"
        )
    else:
        parts.append(
            "<div class='nodp'>This model was trained <b>without</b> differential privacy; the "
            "figures below are what it leaks, with no guarantee to compare them to.</div>"
        )
    parts.append(
        f"<p class='muted'>{audit.get('members')} members (hospitals' training records), "
        f"{audit.get('non_members')} non-members (their held-out records); delta "
        f"{_fmt(audit.get('delta'), 6)}; 95% bootstrap intervals; epsilon lower bounds at 95% "
        "confidence with the threshold chosen on a separate half.</p>"
    )
    header = (
        "<tr><th>attack</th><th>AUC [95% CI]</th><th>TPR@10%</th><th>TPR@1%</th>"
        "<th>TPR@0.1%</th><th>balanced acc.</th><th>eps LB (Clopper-Pearson)</th>"
        "<th>eps LB (GDP)</th></tr>"
    )
    body = []
    for name, e in attacks.items():
        tprs = []
        for f in ("0.1", "0.01", "0.001"):
            mark = "" if e["tpr_at_fpr_resolvable"][f] else " (n/r)"
            tprs.append(f"<td>{_fmt(e['tpr_at_fpr'][f])}{mark}</td>")
        body.append(
            f"<tr><td>{html.escape(name)}</td><td>{_fmt(e['auc'])} "
            f"[{_fmt(e['auc_ci'][0])}, {_fmt(e['auc_ci'][1])}]</td>{''.join(tprs)}"
            f"<td>{_fmt(e['balanced_accuracy'])}</td><td>{_fmt(e['epsilon_lower_bound'])}</td>"
            f"<td>{_fmt(e['epsilon_lower_bound_gdp'])}</td></tr>"
        )
    parts.append(f"<table>{header}{''.join(body)}</table>")
    parts.append("<p class='muted'>(n/r): not resolvable, fewer than 1/FPR non-members.</p>")
    roc = _roc_plot(attacks)
    if roc:
        parts.append(f"<img alt='ROC curves (log-log)' src='{roc}'>")
    accounted = audit.get("accounted_epsilon") or {}
    hospitals = sorted({h for e in attacks.values() for h in e.get("per_hospital", {})})
    if hospitals:
        rows = []
        for h in hospitals:
            best = max(
                (
                    max(
                        e["per_hospital"][h]["epsilon_lower_bound"],
                        e["per_hospital"][h]["epsilon_lower_bound_gdp"],
                    ),
                    name,
                )
                for name, e in attacks.items()
                if h in e.get("per_hospital", {})
            )
            rows.append(
                f"<tr><td>{html.escape(h)}</td><td>{_fmt(best[0])}</td><td>{html.escape(best[1])}"
                f"</td><td>{_fmt(accounted.get(h))}</td></tr>"
            )
        parts.append(
            "<h3>Empirical vs accounted epsilon per hospital</h3><table><tr><th>hospital</th>"
            "<th>largest empirical lower bound</th><th>by attack</th><th>accounted epsilon</th>"
            f"</tr>{''.join(rows)}</table>"
        )
    canaries = audit.get("canaries")
    if canaries:
        parts.append(
            "<h3>One-run canary audit</h3>"
            f"<p>{canaries['canaries']} mislabelled canaries, {canaries['included']} planted; "
            f"epsilon lower bound {_fmt(canaries['epsilon_lower_bound'])} at "
            f"{int(canaries['confidence'] * 100)}% confidence (Steinke, Nasr, Jagielski 2023).</p>"
        )
    federated = audit.get("federated")
    if federated:
        parts.append(
            "<h3>Federated LOSS audit (counts only)</h3>"
            f"<p>AUC {_fmt(federated['auc'])}, TPR@1% {_fmt(federated['tpr_at_fpr']['0.01'])}, "
            f"over {federated['members']} members and {federated['non_members']} non-members.</p>"
        )
    return "".join(parts)


def _privacy_section(privacy: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """Per hospital: the largest epsilon of any of its patients, at the ledger's delta, and
    the patients left out for budget; no epsilon at all when the run cannot claim one."""
    if privacy.get("unaccounted"):
        names = ", ".join(html.escape(str(n)) for n in privacy["unaccounted"])
        return (
            "<div class='fail'>No DP guarantee: these hospitals trained without reporting "
            f"any DP accounting, so no epsilon is claimed for this run: {names}.</div>"
        )
    if not privacy.get("dp"):
        return "<div class='nodp'>Trained without differential privacy.</div>"
    parts = []
    epsilon = _epsilon_plot(rows)
    if epsilon:
        parts.append(f"<img alt='epsilon per hospital per round' src='{epsilon}'>")
    cells = "".join(
        f"<tr><td>{html.escape(h)}</td>"
        f"<td>{'' if r.get('epsilon_exact', True) else '&le; '}{_fmt(r.get('epsilon'))}</td>"
        f"<td>{_fmt(r.get('budget_epsilon'))}</td><td>{_fmt_small(r.get('delta'))}</td>"
        f"<td>{html.escape(str(r.get('accountant', '')).upper())}</td>"
        f"<td>{_fmt(r.get('patients'))}</td><td>{_fmt(r.get('excluded_for_budget'))}</td>"
        f"<td>{_fmt(r.get('noise_multiplier'))}</td><td>{_fmt(r.get('sample_rate'), 4)}</td>"
        f"<td>{html.escape(str(r.get('status', '')))}</td></tr>"
        for h, r in sorted(privacy.get("hospitals", {}).items())
    )
    parts.append(
        "<table><tr><th>hospital</th><th>largest patient epsilon</th><th>cap</th><th>delta</th>"
        "<th>accountant</th><th>patients trained</th><th>left out for budget</th>"
        "<th>noise multiplier</th><th>sample rate</th><th>last round</th></tr>"
        f"{cells}</table>"
    )
    parts.append(
        "<p class='muted'>Per patient, for life: every round this site's ledger ever recorded "
        "for a patient is composed, at the ledger's delta. &le;: an upper bound (RDP); the "
        "exact value is computed at a run's last round.</p>"
    )
    if "client_level" in privacy:
        client = privacy["client_level"]
        parts.append(
            f"<p>Hospital-level (client) DP: epsilon {_fmt(client['epsilon'])} at delta "
            f"{_fmt_small(client['delta'])} over {client['rounds']} rounds.</p>"
        )
    return "".join(parts)


def _fmt_small(value: Any) -> str:
    """A probability such as delta: 1e-05, never 0.000."""
    if value is None:
        return "-"
    try:
        return f"{float(value):g}"
    except (TypeError, ValueError):
        return html.escape(str(value))


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into the run directory; returns its path."""
    run = Path(run_dir)
    config = _read(run / "config.json")
    if config is None:
        from fedpriv.errors import RunDirectoryError

        raise RunDirectoryError(f"'{run}' is not a fedpriv run directory (no config.json)")
    import matplotlib

    matplotlib.use("Agg")
    rows = _rows(run / "metrics.jsonl")
    privacy = _read(run / "privacy.json") or {}
    audit = _read(run / "audit.json")
    he = _read(run / "he.json")
    final = rows[-1] if rows else {}
    sections = [
        f"<h1>fedpriv run {html.escape(run.name)}</h1>",
        f"<p>{len(rows)} rounds; final central test accuracy {_fmt(final.get('test_accuracy'))}, "
        f"federated held-out accuracy {_fmt(final.get('eval_accuracy'))}.</p>",
        "<h2>Settings</h2>",
        _config_table(config, privacy),
        "<h2>Accuracy per round</h2>",
    ]
    accuracy = _accuracy_plot(rows)
    sections.append(f"<img alt='accuracy per round' src='{accuracy}'>" if accuracy else "<p>-</p>")
    sections.append("<h2>Privacy spent</h2>")
    sections.append(_privacy_section(privacy, rows))
    if he:
        last = he["rounds"][-1] if he.get("rounds") else {}
        sections.append(
            "<h2>Homomorphic encryption</h2>"
            f"<p>{_fmt(last.get('bytes_up_per_param'), 1)} bytes uploaded per parameter "
            f"(float32: 4); server aggregation {_fmt(last.get('server_aggregate_seconds'))} s "
            "in the last round.</p>"
        )
    if audit:
        sections.append(_audit_section(audit))
    document = (
        "<!doctype html><html><head><meta charset='utf-8'><title>fedpriv report "
        f"{html.escape(run.name)}</title><style>{_CSS}</style></head><body>"
        + "".join(sections)
        + "</body></html>"
    )
    path = run / REPORT_FILE
    path.write_text(document, encoding="utf-8")
    return path
