"""Hungarian matching of labellings (disca_tools.cluster.matching)."""

import numpy as np

from disca_tools.cluster.matching import accuracy_after_matching, contingency, match_labels


def test_contingency_hand_computed():
    a = np.array([0, 0, 1, 1, 1, 2])
    b = np.array([5, 7, 7, 7, 5, 5])
    table, av, bv = contingency(a, b)
    assert av.tolist() == [0, 1, 2]
    assert bv.tolist() == [5, 7]
    assert table.tolist() == [[1, 1], [1, 2], [1, 0]]


def test_permutation_restored_exactly():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 6, 500)
    perm = rng.permutation(6)
    labels = perm[ref]
    new, mapping = match_labels(ref, labels)
    assert np.array_equal(new, ref)
    assert mapping == {int(perm[i]): i for i in range(6)}


def test_noisy_permutation_restored():
    rng = np.random.default_rng(1)
    ref = np.repeat(np.arange(4), 50)
    labels = np.array([3, 1, 0, 2])[ref]
    flip = rng.choice(len(ref), 20, replace=False)
    labels[flip] = rng.integers(0, 4, 20)
    new, _ = match_labels(ref, labels)
    assert np.mean(new == ref) >= 0.9
    assert accuracy_after_matching(ref, labels) == np.mean(new == ref)


def test_more_clusters_get_fresh_numbers():
    ref = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([4, 4, 9, 2, 2, 7])  # 4→0 (2 shared), 2→1 (2 shared), 7 and 9 unmatched
    new, mapping = match_labels(ref, labels)
    assert mapping[4] == 0 and mapping[2] == 1
    assert sorted([mapping[7], mapping[9]]) == [2, 3]
    assert mapping[7] == 2  # fresh numbers in ascending order of the old label
    assert new.tolist() == [0, 0, 3, 1, 1, 2]


def test_fewer_clusters_use_reference_numbers():
    ref = np.array([0, 0, 1, 1, 2, 2])
    labels = np.array([1, 1, 1, 1, 0, 0])
    new, mapping = match_labels(ref, labels)
    assert mapping == {0: 2, 1: 0} or mapping == {0: 2, 1: 1}
    assert set(new.tolist()) <= {0, 1, 2}
    assert np.sum(new == ref) == 4


def test_accuracy_hand_computed():
    truth = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([1, 1, 0, 0, 0, 0])
    # best one-to-one: pred 1 → truth 0 (2 points), pred 0 → truth 1 (3 points): 5/6
    assert accuracy_after_matching(truth, pred) == 5 / 6
    assert accuracy_after_matching(truth, np.zeros(6, int)) == 0.5
