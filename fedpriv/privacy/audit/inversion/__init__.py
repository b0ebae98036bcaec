"""Gradient inversion: can the server rebuild a hospital's records from what it receives?

The audit re-creates, in simulation, the message of round 1 exactly as the run's hospitals
send it: their real training round (:func:`fedpriv.client.hospital.train_round`: Opacus
DP-SGD under sample-level DP, the clipping and noise of the run, the protocol's encoding)
from the initial global model (a function of the seed, so the server knows it), through the
run's aggregation protocol in one process (:class:`~fedpriv.protocols.local.LocalFederation`:
the client-level DP of a trusted server, secure aggregation's masking and unmasking, CKKS
encryption). The attacked message is made from ``batch`` records of a hospital's training
split only (the round restricted to them: same sampling rule, same clipping, the run's noise
multiplier from ``privacy.json``), so it is known which records it reveals.

The attacker is the server (honest but curious), in the style of Inverting Gradients
(Geiping et al. 2020): it knows the global model it sent, the run's settings, and the labels
of the records; it optimises dummy records (Adam on signed gradients, bounded steps and
restarts, a total-variation prior for images, the data's value range as a box) until the
update they would produce matches the observed one in cosine similarity (or L2). Under
FedAvg the hospital's local SGD steps are unrolled differentiably
(:func:`torch.func.functional_call`) and the parameter difference is matched; without DP the
minibatch order follows from the run's seed, which the server knows; under DP-SGD (Poisson
sampling from the OS) the attacker puts every record in every step (exact when the batch is
no larger than ``batch-size``: the sample rate is then 1). What it attacks is what it sees:

- plaintext (and client-level DP by a trusted server, which receives the raw updates): the
  hospital's own update;
- secure aggregation: only the unmasked sum of the round's hospitals (each restricted to
  ``batch`` records), never one update: the attacker reconstructs all their records at once;
- CKKS: the server holds ciphertexts only; the audit attacks the round's aggregate as the
  hospitals decrypt it (what the server gets if it ever sees the model).

``inversion_view=model`` attacks instead the round's new global model as the hospitals read
it (after client-level DP's noise): what another hospital, or anyone given the model, sees.

Reconstructions are matched to the true records by the Hungarian method (same label only).
Per record: PSNR and SSIM for images (data range: the dataset's max - min), MSE and mean
absolute error per feature for tables, beside no-information baselines from the population
records (the run's test split, which no hospital trains on): their mean, their mean over the
record's class (the attacker knows the label), and a random one of the class; the baseline
is the one that does best on average. A record *leaks* when its reconstruction beats that
baseline by ``margin_db`` (3 dB: half the squared error). Verdict: ``leak`` when most
attacked records leak and the mean beats the baseline's mean by the margin,
``inconclusive`` when some do (or nothing reached the server), ``no-leak`` when none does.
A ``no-leak`` holds for this attack and budget only.
"""

from fedpriv.privacy.audit.inversion.audit import InversionAudit
from fedpriv.privacy.audit.inversion.metrics import psnr, ssim
from fedpriv.privacy.audit.inversion.picture import figure
from fedpriv.privacy.audit.inversion.reconstruction import Simulator, match_records, reconstruct
from fedpriv.privacy.audit.inversion.replay import (
    Observation,
    Participant,
    noise_multiplier,
    replay_round,
    run_config,
    sampled_hospitals,
)
from fedpriv.privacy.audit.inversion.settings import VIEWS, InversionSettings

__all__ = [
    "VIEWS",
    "InversionAudit",
    "InversionSettings",
    "Observation",
    "Participant",
    "Simulator",
    "figure",
    "match_records",
    "noise_multiplier",
    "psnr",
    "reconstruct",
    "replay_round",
    "run_config",
    "sampled_hospitals",
    "ssim",
]
