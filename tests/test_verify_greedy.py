"""`convert --verify`'s greedy comparison: EOT is a legal greedy choice, exact ties are not failures, real drift is."""

import numpy as np

from textmill.convert.verify import greedy, greedy_divergence


def test_greedy_may_choose_eot_and_reports_logits():
    # A model that always prefers token 3 (say EOT): plain argmax must pick it, unlike generate(min_new_tokens=...).
    ids, seen = greedy(lambda x: np.eye(5)[3], np.array([1, 2]), 4)
    assert ids == [3, 3, 3, 3] and len(seen) == 4


def test_tie_within_tolerance_is_not_a_divergence():
    steps = [np.array([0.0, 1.0, 1.0 - 1e-6, 0.0])]
    assert greedy_divergence([1], [2], steps, tol=1e-4) is None
    assert greedy_divergence([1, 1], [1, 1], steps * 2, tol=1e-4) is None


def test_real_divergence_is_reported_with_its_step():
    steps = [np.array([0.0, 1.0, 0.0]), np.array([0.0, 2.0, 1.0])]
    d = greedy_divergence([1, 1], [1, 2], steps, tol=1e-4)
    assert d == {"step": 1, "tf": 1, "hf": 2, "tf_logit_gap": 1.0}
