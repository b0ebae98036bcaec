"""Privacy: DP-SGD (Opacus), the privacy ledger, CKKS encryption (TenSEAL), audits."""
