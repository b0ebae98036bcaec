"""``report.html``: one self-contained file (figures embedded) from a run directory alone,
written for the ethics board first and the data scientist second."""

from fedpriv.report.page import REPORT_FILE, build_report

__all__ = ["REPORT_FILE", "build_report"]
