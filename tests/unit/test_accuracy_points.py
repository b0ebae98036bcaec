"""The report's accuracy curve puts each federated evaluation at the round whose model it
describes (carried evaluations describe the model the hospitals received)."""

from __future__ import annotations

from fedpriv.report.plots import _accuracy_points


def test_carried_evaluations_are_drawn_at_the_round_they_describe() -> None:
    rows = [
        {"round": 1, "evaluated_round": 0, "eval_accuracy": 0.5, "test_accuracy": 0.7},
        {"round": 2, "evaluated_round": 1, "eval_accuracy": 0.7, "test_accuracy": 0.8},
        {
            "round": 3,
            "eval_accuracy": 0.9,
            "test_accuracy": 0.9,
            "previous_evaluation": {"round": 2, "eval_accuracy": 0.8},
        },
    ]
    assert _accuracy_points(rows, "eval_accuracy") == {0: 0.5, 1: 0.7, 2: 0.8, 3: 0.9}
    assert _accuracy_points(rows, "test_accuracy") == {1: 0.7, 2: 0.8, 3: 0.9}


def test_rows_without_the_fields_keep_their_own_round() -> None:
    rows = [{"round": 1, "eval_accuracy": 0.6}, {"round": 2, "eval_accuracy": None}]
    assert _accuracy_points(rows, "eval_accuracy") == {1: 0.6}
