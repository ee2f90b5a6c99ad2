"""The one position rule every module uses (`_checks.check_positions`) and the
saturating distance every bias reads (`_checks.saturating_difference`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jax_posenc import _checks

INT32 = st.integers(-(2**31), 2**31 - 1)


@pytest.mark.parametrize(
    "value",
    [
        np.array([0, 2**31 + 7], np.int64),
        np.array([2**31], np.uint32),
        np.array([-(2**31) - 1], np.int64),
        [3, 2**40],
    ],
    ids=["int64", "uint32", "int64-negative", "list"],
)
def test_positions_past_int32_raise_naming_the_argument_and_the_values(value):
    with pytest.raises(ValueError, match=r"q_positions must lie in \[-2\^31, 2\^31\).*got values"):
        _checks.check_positions("q_positions", value)


def test_wide_integer_dtypes_within_int32_are_accepted_exactly():
    for dtype in (np.int64, np.uint32, np.uint64):
        got = _checks.check_positions("positions", np.array([0, 7, 2**31 - 1], dtype))
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, [0, 7, 2**31 - 1])


def test_traced_positions_whose_values_cannot_be_checked_raise_a_type_error():
    @jax.jit
    def rotate(positions):
        return _checks.check_positions("positions", positions)

    with pytest.raises(TypeError, match=r"positions is a traced uint32 array.*cast it to int32"):
        rotate(jnp.array([1, 2], jnp.uint32))
    np.testing.assert_array_equal(rotate(jnp.array([1, 2], jnp.uint16)), [1, 2])


def test_floats_only_where_allowed_and_finite():
    with pytest.raises(TypeError, match="positions must have an integer dtype"):
        _checks.check_positions("positions", np.array([0.5]))
    np.testing.assert_array_equal(
        _checks.check_positions("positions", np.array([0.5]), allow_float=True), [0.5]
    )
    with pytest.raises(ValueError, match="positions must lie in"):
        _checks.check_positions("positions", np.array([np.nan]), allow_float=True)
    with pytest.raises(ValueError, match="positions must lie in"):
        _checks.check_positions("positions", np.array([3e9]), allow_float=True)


@given(st.lists(st.tuples(INT32, INT32), min_size=1, max_size=20))
def test_saturating_difference_is_exact_or_clamped_never_wrapped(pairs):
    a = np.array([p[0] for p in pairs], np.int64)
    b = np.array([p[1] for p in pairs], np.int64)
    got = np.asarray(
        _checks.saturating_difference(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))
    )
    want = np.clip(a - b, -(2**31 - 1), 2**31 - 1)
    np.testing.assert_array_equal(got, want)
