"""The one place that combines an encoding's parts (`_protocols.combine` / `terms_of`)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jax_posenc as pe
from jax_posenc import _protocols, registry


def test_qk_transforms_compose_in_order_and_biases_add_up():
    def add_one(q, k, q_pos, k_pos):
        return q + 1, k

    def double(q, k, q_pos, k_pos):
        return 2 * q, k

    terms = pe.combine(
        [
            pe.PositionalTerms(qk_transform=add_one, bias_fn=lambda qp, kp: jnp.ones((1, 1, 2, 3))),
            pe.PositionalTerms(
                qk_transform=double, bias_fn=lambda qp, kp: jnp.full((1, 1, 2, 3), 5.0)
            ),
            pe.PositionalTerms(),
        ]
    )
    q, _ = terms.transform(jnp.zeros(3), jnp.zeros(3), None, None)
    np.testing.assert_array_equal(q, [2.0, 2.0, 2.0])  # (0 + 1) * 2, not 0 * 2 + 1
    np.testing.assert_array_equal(terms.bias_fn(None, None), np.full((1, 1, 2, 3), 6.0))
    assert terms.relative_terms is None


def test_relative_terms_add_up_field_by_field():
    first = pe.RelativeTerms(query_bias_fn=lambda q, qp, kp: q, content_bias=jnp.ones((2, 4)))
    second = pe.RelativeTerms(query_bias_fn=lambda q, qp, kp: 3 * q, content_bias=jnp.ones((2, 4)))
    terms = pe.combine([pe.PositionalTerms(relative_terms=t) for t in (first, second)])
    np.testing.assert_array_equal(terms.relative_terms.query_bias_fn(jnp.ones(2), 0, 0), [4.0, 4.0])
    np.testing.assert_array_equal(terms.relative_terms.content_bias, np.full((2, 4), 2.0))
    assert terms.relative_terms.value_fn is None


def test_an_unknown_role_raises_instead_of_falling_into_another():
    with pytest.raises(ValueError, match="unknown positional role 'value_bias'"):
        _protocols.terms_of("value_bias", object())


def test_registry_modules_play_the_roles_the_protocols_know():
    spec = pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=32)
    modules = registry.attention_modules("sinusoidal+rope+alibi+shaw", spec)
    assert [(name, role) for name, role, _ in modules] == [
        ("rope", "qk_transform"),
        ("alibi", "logit_bias"),
        ("shaw", "relative_terms"),
    ]
    assert {role for _, role, _ in modules} <= set(_protocols.ROLES)
