"""Assembling ``report.html``: the ethics-board summary first, then results, settings, the
privacy spent, how updates were protected, and the audits.

Every file is checked as it is read: a damaged one stops the report with one line naming it
(:class:`~fedpriv.errors.RunDirectoryError`), never a traceback.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpriv.errors import RunDirectoryError
from fedpriv.report.audits import (
    audit_sections,
    federated_section,
    linkage_section,
    verdict_phrase,
)
from fedpriv.report.format import fmt, fmt_small
from fedpriv.report.plots import accuracy_plot, epsilon_plot
from fedpriv.runfiles import read_metrics, read_run_json

__all__ = ["REPORT_FILE", "build_report"]

REPORT_FILE = "report.html"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
color:#1d2430;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
td,th{border:1px solid #ccd;padding:.3em .6em;text-align:right}th{background:#f1f3f8}
td:first-child,th:first-child{text-align:left}
.fail{background:#fde2e2;border:1px solid #d33;padding:.6em 1em}
.pass{background:#e3f6e8;border:1px solid #3a3;padding:.6em 1em}
.nodp{background:#fff4d6;border:1px solid #c90;padding:.6em 1em}
#summary{font-size:1.05em;background:#f4f6fb;border-left:4px solid #35a;padding:.8em 1em}
.muted{color:#667}img{max-width:100%}
"""

#: settings a deployment's server never used: each hospital trains on its own file
_DEPLOYMENT_UNUSED = {
    "dataset",
    "hospitals",
    "partition",
    "alpha",
    "classes-per-hospital",
    "held-out-fraction",
    "test-fraction",
    "label-column",
    "site-column",
    "patient-column",
    "canaries",
}

_SETTINGS = (
    "deployment",
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
    "client-clip-norm",
    "client-noise-multiplier",
    "accountant",
    "budget-epsilon",
    "aggregation",
    "secagg-threshold",
    "secagg-one-exchange",
    "seed",
)


def _protocol(config: Mapping[str, Any]) -> str:
    protocol = str(config.get("aggregation") or "plain")
    return "ckks" if config.get("he") and protocol == "plain" else protocol


def _guarantee(config: Mapping[str, Any], privacy: Mapping[str, Any]) -> str:
    if privacy.get("unaccounted"):
        names = ", ".join(html.escape(str(n)) for n in privacy["unaccounted"])
        return (
            "<b>This run makes no differential-privacy claim:</b> hospitals trained without "
            f"reporting DP accounting ({names})."
        )
    if not privacy.get("dp") and not config.get("dp", True):
        return (
            "<b>This model was trained without differential privacy:</b> nothing bounds what it "
            "reveals about any patient."
        )
    parts = []
    hospitals = privacy.get("hospitals") or {}
    epsilons = {
        h: r.get("epsilon")
        for h, r in hospitals.items()
        if isinstance(r.get("epsilon"), int | float)
    }
    if epsilons:
        worst = max(epsilons.values())
        exact = bool(privacy.get("max_epsilon_exact", True))
        delta = privacy.get("delta", config.get("delta"))
        each = ", ".join(f"{html.escape(h)} {fmt(e, 2)}" for h, e in sorted(epsilons.items()))
        parts.append(
            "<b>Guarantee:</b> every patient's records are protected by differential privacy "
            f"with epsilon {'' if exact else '&le; '}{fmt(worst, 2)} at delta "
            f"{fmt_small(delta)}, per patient and for life: each hospital's ledger composes "
            "every round it ever trained a patient in, and hospitals hold different patients, "
            f"so the largest hospital figure holds for the federation (per hospital: {each})."
        )
    split = privacy.get("distributed_noise")
    if isinstance(split, Mapping) and epsilons:
        parts.append(_conditional(split))
    client = privacy.get("client_level")
    if isinstance(client, Mapping) and client.get("epsilon") is not None:
        parts.append(
            f"Each hospital's whole contribution is also protected (hospital-level DP): epsilon "
            f"{fmt(client.get('epsilon'), 2)} at delta {fmt_small(client.get('delta'))}."
        )
    if not parts:
        parts.append("<b>Guarantee:</b> DP was asked for, but no hospital reported its spend.")
    return " ".join(parts)


def _fallback(split: Mapping[str, Any]) -> tuple[Any, str]:
    """What is left if distributed noise's assumption fails, and how to read the figure."""
    fallback = split.get("max_fallback_epsilon")
    bound = "&le; "
    if fallback is None:
        fallback = split.get("max_fallback_planned_epsilon")
        bound = "planned: "
    elif split.get("max_fallback_epsilon_exact"):
        bound = ""
    return fallback, bound


def _conditional_figures(split: Mapping[str, Any], *, stated: bool) -> str:
    """The privacy section's line on distributed noise: the figures only, the assumption in
    words being the guarantee's at the top (where it is read first)."""
    fallback, bound = _fallback(split)
    text = (
        f"Distributed noise: the epsilons above are conditional (at most "
        f"{fmt(split.get('colluders'))} hospitals collude with the server; sums over at least "
        f"{fmt(split.get('threshold'))} hospitals)"
    )
    if fallback is not None:
        text += f"; if the assumption fails, epsilon {bound}{fmt(fallback, 2)} per patient"
    return text + (". See <a href='#summary'>the guarantee at the top</a>." if stated else ".")


def _conditional(split: Mapping[str, Any]) -> str:
    """Distributed noise: the guarantee holds under a collusion assumption; what is left if
    it fails."""
    fallback, bound = _fallback(split)
    text = (
        "<b>This guarantee is conditional.</b> The hospitals split the training noise "
        "(distributed noise under secure aggregation), so the epsilon above holds only while "
        f"at most {fmt(split.get('colluders'))} hospitals collude with the server and it "
        f"unmasks only sums over at least {fmt(split.get('threshold'))} hospitals."
    )
    if fallback is not None:
        text += (
            " If more hospitals collude with the server, each patient keeps only the noise "
            f"its own hospital added: epsilon {bound}{fmt(fallback, 2)} per patient for life."
        )
    return text


def _who_saw_what(config: Mapping[str, Any], he: Mapping[str, Any] | None) -> str:
    protocol = _protocol(config)
    if protocol == "ckks":
        fingerprint = ""
        rounds = (he or {}).get("rounds") or []
        if rounds and rounds[-1].get("key_fingerprint"):
            fingerprint = f" (key fingerprint {html.escape(str(rounds[-1]['key_fingerprint']))})"
        server = (
            "the coordinating server received only encrypted updates (CKKS; the key is held by "
            f"the hospitals alone{fingerprint}) and added them without decrypting: it never saw "
            "one hospital's update in the clear"
        )
    elif protocol == "secagg":
        threshold = config.get("secagg-threshold") or "a majority of"
        server = (
            "the coordinating server received only masked updates and could unmask only the sum "
            f"of at least {html.escape(str(threshold))} hospitals: it never saw one hospital's "
            "update in the clear"
        )
    else:
        server = (
            "the coordinating server received each hospital's model update <b>in the clear</b> "
            "every round (no encryption or masking)"
        )
    return (
        f"<b>Who could see what:</b> {server}; whoever receives the final model sees only what "
        "the guarantee above bounds. The server is assumed honest-but-curious; hospitals never "
        "send records."
    )


def _verdicts(
    audit: Mapping[str, Any] | None,
    federated: Mapping[str, Any] | None,
    linkage: Mapping[str, Any] | None,
) -> str:
    if not audit and not federated and not linkage:
        return (
            "<b>Audits:</b> none has been run on this run yet (<code>fedpriv audit RUN_DIR</code>)."
        )
    phrases = [
        verdict_phrase(name, entry) for name, entry in ((audit or {}).get("attacks") or {}).items()
    ]
    if federated:
        phrases.append(f"federated LOSS audit at the hospitals: AUC {fmt(federated.get('auc'))}")
    if linkage:
        ks = [int(r.get("k", 0)) for r in linkage.values() if isinstance(r, Mapping)]
        phrases.append(f"record linkage: k-anonymity {min(ks, default=0)} at the weakest hospital")
    skipped = (audit or {}).get("skipped") or {}
    text = "<b>Audits:</b> " + ("; ".join(phrases) if phrases else "no attack could run")
    if skipped:
        text += "; not run: " + ", ".join(html.escape(n) for n in skipped) + " (reasons below)"
    verdict = (audit or {}).get("verdict")
    if verdict == "fail":
        text += ". <b>An empirical epsilon exceeds the accounted one: the guarantee is broken.</b>"
    elif verdict == "pass":
        text += ". Every empirical epsilon lower bound stays under the accounted epsilon"
    return text + "."


def _settings(config: Mapping[str, Any], privacy: Mapping[str, Any]) -> str:
    """The run's settings; a deployment's omit what only a simulation uses, and DP settings
    of a run that cannot claim DP are shown as asked for, not as a guarantee."""
    shown = dict(config)
    if privacy.get("unaccounted"):
        shown["dp"] = "asked for, NOT accounted"
        for key in ("epsilon", "delta", "budget-epsilon"):
            if key in shown:
                shown[key] = f"{shown[key]:g} asked for (no guarantee)"
    deployment = bool(config.get("deployment"))
    if not shown.get("dp", True):
        for key in ("epsilon", "delta", "max-grad-norm", "accountant", "dp-level"):
            shown.pop(key, None)
    if str(shown.get("dp-level", "sample")) == "sample":
        shown.pop("client-clip-norm", None)
        shown.pop("client-noise-multiplier", None)
    if _protocol(config) != "secagg":
        shown.pop("secagg-threshold", None)
        shown.pop("secagg-one-exchange", None)
    cells = []
    for key in _SETTINGS:
        if key not in shown or (deployment and key in _DEPLOYMENT_UNUSED):
            continue
        value = shown[key]
        text = fmt_small(value) if isinstance(value, int | float) else fmt(value)
        cells.append(f"<tr><td>{html.escape(key)}</td><td>{text}</td></tr>")
    note = (
        "<p class='muted'>A deployment: each hospital trained on its own data file, so the "
        "dataset and partition settings of a simulation do not apply.</p>"
        if deployment
        else ""
    )
    return f"<table><tr><th>setting</th><th>value</th></tr>{''.join(cells)}</table>{note}"


def _privacy_section(privacy: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    if privacy.get("unaccounted"):
        names = ", ".join(html.escape(str(n)) for n in privacy["unaccounted"])
        return (
            "<div class='fail'>No DP guarantee: these hospitals trained without reporting "
            f"any DP accounting, so no epsilon is claimed for this run: {names}.</div>"
        )
    if not privacy.get("dp"):
        return "<div class='nodp'>Trained without differential privacy.</div>"
    hospitals = privacy.get("hospitals") or {}
    caps = [r.get("budget_epsilon") for r in hospitals.values()]
    cap = caps[0] if caps and all(c == caps[0] for c in caps) else None
    parts = []
    plot = epsilon_plot(rows, cap=cap if isinstance(cap, int | float) else None)
    if plot:
        parts.append(f"<img alt='largest patient epsilon per hospital per round' src='{plot}'>")
    cells = "".join(
        f"<tr><td>{html.escape(h)}</td>"
        f"<td>{'' if r.get('epsilon_exact', True) else '&le; '}{fmt(r.get('epsilon'))}</td>"
        f"<td>{fmt(r.get('budget_epsilon'))}</td><td>{fmt_small(r.get('delta'))}</td>"
        f"<td>{html.escape(str(r.get('accountant', '')).upper())}</td>"
        f"<td>{fmt(r.get('patients'))}</td><td>{fmt(r.get('excluded_for_budget'))}</td>"
        f"<td>{fmt(r.get('noise_multiplier'))}</td><td>{fmt(r.get('sample_rate'), 4)}</td>"
        f"<td>{html.escape(str(r.get('status', '')))}</td></tr>"
        for h, r in sorted(hospitals.items())
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
    split = privacy.get("distributed_noise")
    if isinstance(split, Mapping):
        stated = any(isinstance(r.get("epsilon"), int | float) for r in hospitals.values())
        parts.append(f"<p>{_conditional_figures(split, stated=stated)}</p>")
    client = privacy.get("client_level")
    if isinstance(client, Mapping):
        parts.append(
            f"<p>Hospital-level (client) DP: epsilon {fmt(client.get('epsilon'))} at delta "
            f"{fmt_small(client.get('delta'))} over {fmt(client.get('rounds'))} rounds.</p>"
        )
    return "".join(parts)


def _protection_section(
    config: Mapping[str, Any], he: Mapping[str, Any] | None, rows: Sequence[Mapping[str, Any]]
) -> str:
    """How updates reached the server, and, per round, what it refused."""
    protocol = _protocol(config)
    parts = [
        f"<section id='protection'><h2>How updates were protected: {html.escape(protocol)}</h2>"
    ]
    if protocol == "ckks":
        rounds = (he or {}).get("rounds") or []
        fingerprint = rounds[-1].get("key_fingerprint") if rounds else None
        parts.append(
            "<p><b>Homomorphic encryption (CKKS).</b> Key fingerprint: "
            f"<code>{html.escape(str(fingerprint or 'not recorded'))}</code>. "
            "What the server never saw: any hospital's update, and (in deployment) the model, "
            "in the clear; it held the public key only and summed ciphertexts. Every value a "
            "hospital decrypts and exports is flooded with noise, so no exact decryption "
            "leaves a hospital.</p>"
        )
        body = "".join(
            f"<tr><td>{fmt(r.get('round'))}</td><td>{fmt(r.get('hospitals'))}</td>"
            f"<td>{_rejections(r.get('rejected'))}</td>"
            f"<td>{html.escape(str(r.get('aggregate_failure') or '-'))}</td>"
            f"<td>{fmt(r.get('bytes_up_per_param'), 1)}</td>"
            f"<td>{fmt(r.get('server_aggregate_seconds'))}</td></tr>"
            for r in rounds
        )
        if body:
            parts.append(
                "<table><tr><th>round</th><th>encrypted contributions</th><th>rejected (why)</th>"
                "<th>round discarded (why)</th><th>bytes up per parameter (float32: 4)</th>"
                f"<th>server seconds</th></tr>{body}</table>"
            )
    elif protocol == "secagg":
        parts.append(
            "<p><b>Secure aggregation.</b> Each hospital masked its update with pairwise masks "
            "agreed with the others (X25519 key agreement) and a self mask, secret-shared so "
            "that dropped hospitals can be recovered; the server could unmask only the sum. "
            "What the server never saw: any hospital's update in the clear.</p>"
        )
    else:
        parts.append(
            "<p class='nodp'>Plain aggregation: the server saw every hospital's update in the "
            "clear. Use <code>--aggregation secagg</code> or <code>ckks</code> so it sees only "
            "their sum.</p>"
        )
    refused = [
        (r["round"], h, reason)
        for r in rows
        for h, reason in ((r.get("rejected") or {}) | (r.get("failed") or {})).items()
    ]
    declined = [
        (r["round"], h, reason) for r in rows for h, reason in (r.get("declined") or {}).items()
    ]
    if refused or declined:
        body = "".join(
            f"<tr><td>{rnd}</td><td>{html.escape(str(h))}</td><td>{kind}</td>"
            f"<td>{html.escape(str(reason))}</td></tr>"
            for kind, items in (("refused / failed", refused), ("declined", declined))
            for rnd, h, reason in items
        )
        parts.append(
            "<h3>Contributions not used, per round</h3><table><tr><th>round</th><th>hospital"
            f"</th><th>what happened</th><th>why</th></tr>{body}</table>"
        )
    else:
        parts.append("<p>Every contribution of every round was accepted.</p>")
    parts.append("</section>")
    return "".join(parts)


def _rejections(value: Any) -> str:
    if not value:
        return "none"
    return "; ".join(
        f"{html.escape(str(r.get('hospital')))}: {html.escape(str(r.get('reason')))}"
        for r in value
        if isinstance(r, Mapping)
    )


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into the run directory; returns its path."""
    run = Path(run_dir)
    config = read_run_json(run / "config.json")
    if "model" not in config:
        raise RunDirectoryError(
            f"'{run / 'config.json'}' has no 'model': the file is damaged or not fedpriv's"
        )
    import matplotlib

    matplotlib.use("Agg")
    rows = read_metrics(run / "metrics.jsonl")
    privacy = read_run_json(run / "privacy.json", required=False)
    audit = read_run_json(run / "audit.json", required=False)
    federated = audit.get("federated") or read_run_json(
        run / "federated_audit.json", required=False
    )
    he = read_run_json(run / "he.json", required=False)
    linkage = read_run_json(run / "linkage.json", required=False)
    final = rows[-1] if rows else {}
    kind = "deployment" if config.get("deployment") else "simulation"
    sections = [
        f"<h1>fedpriv {kind} {html.escape(run.name)}</h1>",
        "<p id='summary'>"
        + " ".join(
            (
                _guarantee(config, privacy),
                _who_saw_what(config, he),
                _verdicts(audit, federated, linkage),
            )
        )
        + "</p>",
        "<section id='results'><h2>Results</h2>",
        f"<p>{len(rows)} rounds; final central test accuracy "
        f"{fmt(final.get('test_accuracy'))}, federated held-out accuracy "
        f"{fmt(final.get('eval_accuracy'))}.</p>",
    ]
    accuracy = accuracy_plot(rows)
    sections.append(
        f"<img alt='accuracy per round' src='{accuracy}'>"
        if accuracy
        else "<p>No round finished.</p>"
    )
    sections.append("</section><section id='settings'><h2>Settings</h2>")
    sections.append(_settings(config, privacy))
    sections.append("</section><section id='privacy'><h2>Privacy spent</h2>")
    sections.append(_privacy_section(privacy, rows))
    sections.append("</section>")
    sections.append(_protection_section(config, he, rows))
    if audit:
        sections.append(audit_sections(audit))
    if federated:
        if not audit:
            sections.append("<section id='audit'><h2>Privacy audit</h2>")
        sections.append(federated_section(federated))
        if not audit:
            sections.append("</section>")
    if linkage:
        sections.append(linkage_section(linkage))
    if not audit and not federated:
        sections.append(
            "<section id='audit'><h2>Privacy audit</h2><p>Not audited yet: run "
            f"<code>fedpriv audit {html.escape(str(run))}</code>.</p></section>"
        )
    document = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<link rel='icon' href='data:,'>"
        f"<title>fedpriv report {html.escape(run.name)}</title><style>{_CSS}</style></head><body>"
        + "".join(sections)
        + "</body></html>"
    )
    path = run / REPORT_FILE
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(path)
    return path
