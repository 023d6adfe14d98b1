"""Tests for experiments.spacing."""

import numpy as np
import pytest

from experiments.spacing import Step, keep_ratios, split_keep_ratios

RESNET20_SPACING = [
    {"type": "geometric", "num_intervals": 2, "max_val": 0.99, "min_val": 0.855},
    {"type": "geometric", "num_intervals": 58, "max_val": 0.85, "min_val": 0.15},
    {"type": "linear", "num_intervals": 9, "max_val": 0.132, "min_val": 0.02},
]


def test_geometric_and_linear():
    geo = keep_ratios([{"type": "geometric", "num_intervals": 4, "max_val": 0.8, "min_val": 0.1}])
    np.testing.assert_allclose(geo, [0.8, 0.4, 0.2, 0.1])
    lin = keep_ratios([{"type": "linear", "num_intervals": 3, "max_val": 0.9, "min_val": 0.1}])
    np.testing.assert_allclose(lin, [0.9, 0.5, 0.1])


def test_segments_concatenate_and_camel_case_aliases():
    ratios = keep_ratios(
        [
            {"type": "manual", "values": [0.9, 0.7]},
            {"type": "linear", "numIntervals": 2, "maxVal": 0.5, "minVal": 0.3},
        ]
    )
    np.testing.assert_allclose(ratios, [0.9, 0.7, 0.5, 0.3])


def test_harmonic_reproduces_reference_lenet300():
    ratios = keep_ratios([{"type": "harmonic", "numIntervals": 0.8, "minVal": 0.05}])
    expected = [0.442, 0.274, 0.195, 0.150, 0.121, 0.101, 0.086, 0.075, 0.066, 0.059, 0.053, 0.049]
    assert np.round(ratios, 3).tolist() == expected


def test_harmonic_halves_after_num_intervals():
    # r(i) = (i + 1) ** -p with (1 + n) ** -p == 0.5: n is the index distance to halve.
    ratios = keep_ratios([{"type": "harmonic", "num_intervals": 1.0, "min_val": 0.2}])
    np.testing.assert_allclose(ratios, [1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])


def test_cubic_and_harmonic2_end_points():
    cubic = keep_ratios([{"type": "cubic", "num_intervals": 5, "max_val": 0.9, "min_val": 0.1}])
    np.testing.assert_allclose(cubic, [0.9, 0.1 + 0.8 * 0.75**3, 0.2, 0.1 + 0.8 * 0.25**3, 0.1])
    h2 = keep_ratios([{"type": "harmonic2", "num_intervals": 5, "max_val": 0.9, "min_val": 0.1}])
    assert h2[0] == pytest.approx(0.9) and h2[-1] == pytest.approx(0.1)
    assert np.all(np.diff(h2) < 0)


def test_resnet20_split_into_23_steps_of_3():
    ratios = keep_ratios(RESNET20_SPACING)
    assert len(ratios) == 69
    steps = split_keep_ratios(ratios, 23)
    assert len(steps) == 23
    assert all(isinstance(s, Step) and len(s.compress_only) == 2 for s in steps)
    assert [x for s in steps for x in s.ratios] == ratios
    retrained = np.round([s.keep_ratio for s in steps], 3)
    assert retrained[:3].tolist() == [0.85, 0.776, 0.708]
    assert retrained[-4:].tolist() == [0.15, 0.104, 0.062, 0.02]


def test_split_minus_one_gives_one_step_per_ratio():
    steps = split_keep_ratios([0.5, 0.3, 0.1], -1)
    assert steps == [Step((), 0.5), Step((), 0.3), Step((), 0.1)]


def test_split_uneven_and_non_cascade_piles_up():
    steps = split_keep_ratios([0.9, 0.8, 0.7, 0.6, 0.5], 2)
    assert steps == [Step((0.9, 0.8), 0.7), Step((0.6,), 0.5)]
    piled = split_keep_ratios([0.9, 0.8, 0.7, 0.6, 0.5], 2, cascade=False)
    assert piled == [Step((0.9, 0.8), 0.7), Step((0.9, 0.8, 0.6), 0.5)]


@pytest.mark.parametrize(
    "spacing, match",
    [
        ([{"type": "log", "num_intervals": 3}], r"experiments\.spacing\[0\]\.type must be one of"),
        (
            [{"type": "manual", "values": [0.5]}, {"type": "manual", "values": [0.5, 1.5]}],
            r"experiments\.spacing\[1\].*\(0, 1\]",
        ),
        ([{"type": "linear", "num_intervals": 3, "max_val": 2.0, "min_val": 0.1}],
         r"experiments\.spacing\[0\]\.max_val must be in \(0, 1\]"),
        ([{"type": "geometric", "num_intervals": 0, "max_val": 0.9, "min_val": 0.1}],
         r"experiments\.spacing\[0\]\.num_intervals"),
        ([{"type": "geometric", "max_val": 0.9, "min_val": 0.1}],
         r"experiments\.spacing\[0\]\.num_intervals is required"),
        ([{"type": "manual", "values": [0.5, 0.0]}], r"experiments\.spacing\[0\].*\(0, 1\]"),
        ([], r"experiments\.spacing yields no keep ratios"),
    ],
)
def test_invalid_spacing_errors_name_the_field(spacing, match):
    with pytest.raises(ValueError, match=match):
        keep_ratios(spacing)


def test_invalid_retrain_iterations():
    with pytest.raises(ValueError, match=r"experiments\.retrain_iterations must be -1 or in \[1, 3\]"):
        split_keep_ratios([0.5, 0.3, 0.1], 4)
    with pytest.raises(ValueError, match=r"experiments\.retrain_iterations"):
        split_keep_ratios([0.5, 0.3, 0.1], 0)
