"""Policy spec strings: parameters are the dataclass fields, parsed, typed and printed by the base class."""

from __future__ import annotations

import pytest

from dyrate.errors import PolicySpecError
from dyrate.policies import REGISTRY, parse_policy

SPECS = ["none", "none:k=3", "fastv:k=2,r=0.5", "fixed:k=3,r=0.25", "vtw:k=4", "random:k=2,r=0.75,seed=3",
         "schedule:2=0.5,4=0.9", "progressive:k=2,0=0.5,8=0.75"]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trip(spec):
    policy = parse_policy(spec)
    assert policy.spec() == spec and parse_policy(policy.spec()) == policy


def test_params_are_the_fields():
    assert REGISTRY["fastv"].params() == ("k", "r")
    assert REGISTRY["random"].params() == ("k", "r", "seed")
    assert REGISTRY["dyrate"].params() == ("k", "predictor", "q", "cap", "every")  # the loaded net is not a parameter
    assert REGISTRY["progressive"].params() is None
    assert REGISTRY["schedule"].params() is None
    assert parse_policy("fastv") == parse_policy("fastv:k=2,r=0.5")  # defaults from the fields


@pytest.mark.parametrize("spec,message", [
    ("fastv:k=2.5", "bad parameter value"),
    ("fastv:r=half", "bad parameter value"),
    ("fastv:x=1", "unknown parameter"),
    ("vtw:r=0.5", "unknown parameter"),
    ("fastv:r=nan", "reduction rate"),
    ("fixed:k=0", "must be >= 1"),
    ("random:seed=1.5", "bad parameter value"),
])
def test_bad_values_are_one_clear_error(spec, message):
    with pytest.raises(PolicySpecError, match=message):
        parse_policy(spec)
