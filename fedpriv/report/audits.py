"""The report's audit sections: per attack, what the attacker had, the result beside its
baseline, and the plain reading; then what could not run, and why."""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from fedpriv.report.format import fmt, fmt_small
from fedpriv.report.plots import roc_plot

__all__ = ["audit_sections", "federated_section", "verdict_phrase"]

_TITLES = {
    "loss": "Membership inference: LOSS",
    "lira": "Membership inference: LiRA (online)",
    "lira-offline": "Membership inference: LiRA (offline)",
    "rmia": "Membership inference: RMIA",
    "inversion": "Reconstruction of records from what the server receives (gradient inversion)",
    "attribute": "Attribute inference: a hidden sensitive value",
}

_BADGE = {"leak": "fail", "no-leak": "pass", "inconclusive": "nodp"}


def verdict_phrase(name: str, entry: Mapping[str, Any]) -> str:
    verdict = str(entry.get("verdict", "inconclusive"))
    words = {"leak": "LEAK FOUND", "no-leak": "no leak found", "inconclusive": "inconclusive"}
    return f"{html.escape(name)}: <b>{words.get(verdict, html.escape(verdict))}</b>"


def _had(entry: Mapping[str, Any]) -> str:
    return f"<p><b>What the attacker had:</b> {html.escape(str(entry.get('attacker', '-')))}</p>"


def _reading(entry: Mapping[str, Any]) -> str:
    verdict = str(entry.get("verdict", "inconclusive"))
    return (
        f"<p class='{_BADGE.get(verdict, 'nodp')}'><b>Reading:</b> "
        f"{html.escape(str(entry.get('reading', '')))}</p>"
    )


def _membership(audit: Mapping[str, Any], attacks: Mapping[str, Any]) -> str:
    non_members = int(audit.get("non_members") or 0)
    header = (
        "<tr><th>attack</th><th>AUC [95% CI]</th><th>TPR@10% FPR</th><th>TPR@1% FPR</th>"
        "<th>TPR@0.1% FPR</th><th>balanced acc.</th><th>eps LB (Clopper-Pearson)</th>"
        "<th>eps LB (GDP)</th><th>verdict</th></tr>"
    )
    body = [
        "<tr><td>guessing (baseline)</td><td>0.500</td><td>0.100</td><td>0.010</td>"
        "<td>0.001</td><td>0.500</td><td>0</td><td>0</td><td>-</td></tr>"
    ]
    for name, e in attacks.items():
        tprs = []
        for f in ("0.1", "0.01", "0.001"):
            ok = e["tpr_at_fpr_resolvable"][f]
            tprs.append(
                f"<td>{fmt(e['tpr_at_fpr'][f])}</td>"
                if ok
                else "<td class='muted' title='fewer than 1/FPR non-members'>not resolvable</td>"
            )
        body.append(
            f"<tr><td>{html.escape(name)}</td><td>{fmt(e['auc'])} "
            f"[{fmt(e['auc_ci'][0])}, {fmt(e['auc_ci'][1])}]</td>{''.join(tprs)}"
            f"<td>{fmt(e['balanced_accuracy'])}</td><td>{fmt(e['epsilon_lower_bound'])}</td>"
            f"<td>{fmt(e['epsilon_lower_bound_gdp'])}</td>"
            f"<td>{html.escape(str(e.get('verdict', '-')))}</td></tr>"
        )
    first = next(iter(attacks.values()))
    parts = [
        "<section id='attack-membership'><h3>Membership inference: was this patient's record "
        "used to train the model?</h3>",
        _had(first),
        f"<p class='muted'>{audit.get('members')} members (the hospitals' training records), "
        f"{non_members} non-members (their held-out records); delta "
        f"{fmt_small(audit.get('delta'))}; 95% bootstrap intervals; epsilon lower bounds at 95% "
        "confidence with the threshold chosen on a separate half. A TPR at an FPR below "
        f"1/{non_members} cannot be measured with this many non-members.</p>",
        f"<table>{header}{''.join(body)}</table>",
    ]
    for name, e in attacks.items():
        parts.append(
            f"<p id='attack-{html.escape(name)}'>{verdict_phrase(name, e)} - "
            f"{html.escape(str(e.get('reading', '')))}</p>"
        )
    roc = roc_plot(attacks, non_members=non_members)
    if roc:
        parts.append(f"<img alt='ROC curves (log-log)' src='{roc}'>")
    parts.append(_empirical_vs_accounted(audit, attacks))
    canaries = audit.get("canaries")
    if canaries:
        parts.append(
            "<h4>One-run canary audit</h4>"
            f"<p>{canaries['canaries']} mislabelled canaries, {canaries['included']} planted; "
            f"epsilon lower bound {fmt(canaries['epsilon_lower_bound'])} at "
            f"{int(canaries['confidence'] * 100)}% confidence (Steinke, Nasr, Jagielski 2023)."
            "</p>"
        )
    parts.append("</section>")
    return "".join(parts)


def _empirical_vs_accounted(audit: Mapping[str, Any], attacks: Mapping[str, Any]) -> str:
    accounted = audit.get("accounted_epsilon") or {}
    hospitals = sorted({h for e in attacks.values() for h in e.get("per_hospital", {})})
    if not hospitals:
        return ""
    rows = []
    for h in hospitals:
        bounds = [
            (
                max(
                    float(e["per_hospital"][h]["epsilon_lower_bound"]),
                    float(e["per_hospital"][h]["epsilon_lower_bound_gdp"]),
                ),
                name,
            )
            for name, e in attacks.items()
            if h in e.get("per_hospital", {})
        ]
        best = max(bounds)
        tied = [name for value, name in bounds if value == best[0]]
        by = (
            "none: every attack's bound is 0"
            if best[0] <= 0
            else ", ".join(html.escape(n) for n in tied)
        )
        rows.append(
            f"<tr><td>{html.escape(h)}</td><td>{fmt(best[0])}</td><td>{by}</td>"
            f"<td>{fmt(accounted.get(h))}</td></tr>"
        )
    return (
        "<h4>Empirical vs accounted epsilon per hospital</h4><table><tr><th>hospital</th>"
        "<th>largest empirical lower bound</th><th>by attack</th><th>accounted epsilon</th>"
        f"</tr>{''.join(rows)}</table><p class='muted'>An empirical bound above the accounted "
        "epsilon would mean the DP guarantee is broken; a bound far below it is expected "
        "(attacks are weaker than the worst case the accountant covers).</p>"
    )


def _figures_table(entry: Mapping[str, Any]) -> str:
    """The attack's scalar figures beside the baseline's, key by key."""
    baseline = entry.get("baseline") or {}
    rows = []
    for key, value in baseline.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            rows.append(
                f"<tr><td>{html.escape(key)}</td><td>{fmt(entry.get(key))}</td>"
                f"<td>{fmt(value)}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<table><tr><th>figure</th><th>attack</th><th>no-information baseline</th></tr>"
        f"{''.join(rows)}</table>"
    )


def _inversion(entry: Mapping[str, Any]) -> str:
    from fedpriv.privacy.audit.inversion import figure
    from fedpriv.report.plots import png

    parts = [_had(entry), _figures_table(entry)]
    picture = figure(entry)
    if picture is not None:
        parts.append(
            f"<img alt='attacked records, their reconstructions and the baselines' "
            f"src='{png(picture)}'>"
        )
    per_record = entry.get("records_attacked") or []
    if per_record:
        keys = [k for k in ("psnr", "ssim", "mse", "mae") if k in per_record[0]]
        header = "".join(f"<th>{k.upper()}</th><th>baseline {k.upper()}</th>" for k in keys)
        body = "".join(
            f"<tr><td>{html.escape(str(r.get('hospital', '')))}</td>"
            f"<td>{html.escape(str(r.get('label', '')))}</td>"
            + "".join(
                f"<td>{fmt(r.get(k))}</td><td>{fmt((r.get('baseline') or {}).get(k))}</td>"
                for k in keys
            )
            + f"<td>{fmt(bool(r.get('leaked')))}</td></tr>"
            for r in per_record[:32]
        )
        parts.append(
            f"<table><tr><th>hospital</th><th>label</th>{header}<th>beats the baseline</th>"
            f"</tr>{body}</table>"
        )
    parts.append(_reading(entry))
    return "".join(parts)


def _attribute(entry: Mapping[str, Any]) -> str:
    parts = [_had(entry)]
    feature = entry.get("sensitive_feature") or {}
    if feature:
        classes = ", ".join(html.escape(str(c)) for c in feature.get("classes", []))
        parts.append(
            f"<p>Hidden column: <b>{html.escape(str(feature.get('name')))}</b> ({classes}; "
            f"{html.escape(str(feature.get('chosen_by', '')))}).</p>"
        )
    baseline = entry.get("baseline") or {}
    advantage = entry.get("advantage") or {}
    rows = []
    for group in ("members", "non_members"):
        attack = entry.get(group)
        if not isinstance(attack, Mapping):
            continue
        base = baseline.get(group) or {}
        adv = advantage.get(group) or {}
        ci = adv.get("ci") or [None, None]
        count = (entry.get("records") or {}).get(group)
        rows.append(
            f"<tr><td>{'trained on (members)' if group == 'members' else 'held out'}</td>"
            f"<td>{fmt(attack.get('accuracy'))}</td><td>{fmt(base.get('accuracy'))}</td>"
            f"<td>{fmt(adv.get('value'))} [{fmt(ci[0])}, {fmt(ci[1])}]</td>"
            f"<td>{fmt(count)}</td></tr>"
        )
    if rows:
        parts.append(
            "<table><tr><th>patients</th><th>attack accuracy (model + auxiliary data)</th>"
            "<th>imputation baseline (auxiliary data only)</th><th>advantage [95% CI]</th>"
            f"<th>records</th></tr>{''.join(rows)}</table>"
        )
    parts.append(_reading(entry))
    return "".join(parts)


def _generic(entry: Mapping[str, Any]) -> str:
    return _had(entry) + _figures_table(entry) + _reading(entry)


def audit_sections(audit: Mapping[str, Any]) -> str:
    attacks: Mapping[str, Any] = audit.get("attacks") or {}
    parts = ["<section id='audit'><h2>Privacy audit: what an attacker could learn</h2>"]
    verdict = audit.get("verdict")
    if verdict == "fail":
        failures = "".join(f"<li>{html.escape(str(f))}</li>" for f in audit.get("failures", []))
        parts.append(
            "<div class='fail'>An empirical lower bound exceeds the accounted epsilon: the DP "
            f"guarantee does not hold (a DP bug).<ul>{failures}</ul></div>"
        )
    elif verdict == "pass":
        parts.append(
            "<div class='pass'>Every membership attack's empirical epsilon lower bound stays "
            "under the accounted epsilon.</div>"
        )
    elif verdict == "no-dp":
        parts.append(
            "<div class='nodp'>This model was trained <b>without</b> differential privacy; the "
            "figures below are what it leaks, with no guarantee to compare them to.</div>"
        )
    membership = {n: e for n, e in attacks.items() if "auc_ci" in e}
    if membership:
        parts.append(_membership(audit, membership))
    for name, entry in attacks.items():
        if name in membership:
            continue
        render = {"inversion": _inversion, "attribute": _attribute}.get(name, _generic)
        parts.append(
            f"<section id='attack-{html.escape(name)}'><h3>"
            f"{html.escape(_TITLES.get(name, name))}</h3>{render(entry)}</section>"
        )
    skipped = audit.get("skipped") or {}
    if skipped:
        items = "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(str(r))}</li>" for n, r in skipped.items()
        )
        parts.append(
            f"<section id='not-run'><h3>Attacks that could not run</h3><ul>{items}</ul></section>"
        )
    parts.append("</section>")
    return "".join(parts)


def federated_section(federated: Mapping[str, Any]) -> str:
    """The hospitals' own LOSS audit: only counts at fixed thresholds left them."""
    failed = federated.get("failed") or {}
    per = federated.get("per_hospital") or {}
    rows = "".join(
        f"<tr><td>{html.escape(str(h))}</td><td>{fmt(e.get('auc'))}</td>"
        f"<td>{fmt(e.get('members'))}</td><td>{fmt(e.get('non_members'))}</td></tr>"
        for h, e in sorted(per.items())
    )
    tpr = (federated.get("tpr_at_fpr") or {}).get("0.01")
    return (
        "<section id='federated-audit'><h3>Federated membership audit (run at the hospitals)"
        "</h3><p><b>What the attacker had:</b> the final model and, at each hospital, its own "
        "records; each hospital counted members and non-members under fixed loss thresholds, "
        "and only those counts left it.</p>"
        f"<p>AUC {fmt(federated.get('auc'))} (guessing: 0.5), TPR at 1% FPR {fmt(tpr)}, over "
        f"{fmt(federated.get('members'))} members and {fmt(federated.get('non_members'))} "
        "non-members.</p>"
        + (
            f"<table><tr><th>hospital</th><th>AUC</th><th>members</th><th>non-members</th></tr>"
            f"{rows}</table>"
            if rows
            else ""
        )
        + (
            "<p class='nodp'>No counts from: "
            + ", ".join(html.escape(str(k)) for k in failed)
            + "</p>"
            if failed
            else ""
        )
        + "</section>"
    )


def linkage_section(linkage: Mapping[str, Any]) -> str:
    """Per hospital: k-anonymity and l-diversity of its records on the quasi-identifiers.
    The unique rows' numbers stay out of the report: they point at patients."""
    rows = []
    for hospital, r in sorted(linkage.items()):
        if not isinstance(r, Mapping):
            continue
        diversity = r.get("l_diversity") or {}
        rows.append(
            f"<tr><td>{html.escape(str(hospital))}</td><td>{fmt(r.get('records'))}</td>"
            f"<td>{fmt(r.get('k'))}</td><td>{fmt((r.get('unique_records') or {}).get('count'))}"
            f"</td><td>{fmt(r.get('records_below_threshold'))}</td>"
            f"<td>{fmt(diversity.get('distinct'))}</td></tr>"
        )
    first = next((r for r in linkage.values() if isinstance(r, Mapping)), {})
    columns = ", ".join(html.escape(str(c)) for c in first.get("quasi_identifiers", []))
    sensitive = first.get("sensitive_column")
    worst = min((int(r.get("k", 0)) for r in linkage.values() if isinstance(r, Mapping)), default=0)
    threshold = int(first.get("threshold", 5) or 5)
    reading = (
        f"some patients can be singled out by ({columns}) alone: k = {worst} at the weakest "
        "hospital; generalise or suppress these columns before the data is shared or linked"
        if worst < threshold
        else f"every patient shares ({columns}) with at least {worst - 1} others at every hospital"
    )
    return (
        "<section id='linkage'><h3>Record linkage: can a patient be singled out by what "
        "describes them?</h3><p><b>What the attacker had:</b> the values of the quasi-"
        f"identifiers ({columns}) of a patient, e.g. from another register. Computed at each "
        "hospital on its own records; only these counts are shown.</p>"
        "<table><tr><th>hospital</th><th>records</th><th>k-anonymity</th><th>unique records</th>"
        f"<th>records in groups under {threshold}</th><th>l-diversity of "
        f"{html.escape(str(sensitive or '-'))}</th></tr>{''.join(rows)}</table>"
        f"<p class='{'fail' if worst < threshold else 'pass'}'><b>Reading:</b> {reading}.</p>"
        "</section>"
    )
