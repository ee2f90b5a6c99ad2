"""Tests for the encoding registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_posenc as pe


def _spec(**options):
    return pe.EncodingSpec(d_model=16, num_heads=2, head_dim=8, max_positions=32, options=options)


def test_absolute_encodings_contribute_an_input_embedding():
    for name in ("sinusoidal", "learned"):
        assert pe.get_encoding(name).contributes == ("input_embedding",)
    assert pe.get_encoding("none").contributes == ()


def test_sinusoidal_factory_builds_the_library_module_with_options():
    module = pe.get_encoding("sinusoidal").input_embedding(_spec(sinusoidal={"base": 100.0}))
    positions = jnp.arange(5)
    np.testing.assert_array_equal(
        module.apply({}, positions), pe.sinusoidal_encoding(positions, 16, base=100.0)
    )


def test_learned_factory_sizes_the_table_from_the_spec():
    module = pe.get_encoding("learned").input_embedding(_spec())
    params = module.init(jax.random.key(0), jnp.arange(4))
    assert params["params"]["embedding"].shape == (32, 16)


def test_cope_factory_builds_one_shared_table_of_a_fixed_size_by_default():
    (module,) = [m for _, _, m in pe.registry.attention_modules("cope", _spec())]
    params = module.init(jax.random.key(0), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)))
    assert params["params"]["embeddings"].shape == (1, 64, 8)  # not sized by the length
    options = {"num_positions": 5, "shared_across_heads": False}
    (module,) = [m for _, _, m in pe.registry.attention_modules("cope", _spec(cope=options))]
    params = module.init(jax.random.key(0), jnp.ones((1, 4, 2, 8)), jnp.ones((1, 4, 2, 8)))
    assert params["params"]["embeddings"].shape == (2, 5, 8)


def test_combinations_resolve_in_order():
    parts = pe.resolve("learned+none")
    assert [p.name for p in parts] == ["learned", "none"]


@pytest.mark.parametrize(
    ("name", "match"),
    [("rotary-ish", "unknown encoding 'rotary-ish'"), ("learned+learned", "same part twice")],
)
def test_resolve_rejects_unknown_and_repeated_names(name, match):
    with pytest.raises(ValueError, match=match):
        pe.resolve(name)


def test_unknown_options_are_rejected_not_ignored():
    with pytest.raises(ValueError, match=r"options \['bass'\] are not understood"):
        pe.get_encoding("sinusoidal").input_embedding(_spec(sinusoidal={"bass": 1.0}))


def test_register_refuses_duplicates_and_plus_in_names():
    with pytest.raises(ValueError, match="already registered"):
        pe.register(pe.Encoding(name="none", description="again"))
    with pytest.raises(ValueError, match="without '\\+'"):
        pe.register(pe.Encoding(name="a+b", description="combo"))


def test_spec_validates_sizes():
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        pe.EncodingSpec(d_model=16, num_heads=0, head_dim=8, max_positions=32)
