"""The packaged policies' names (``lowdim``, ``lowdim-l1``) work wherever a ``--policy`` is taken: ``make_policy``
(``rsd collect``, ``rsd eval``), ``policy_identity`` (``run.json``), ``resolve_decode``; unknown names list them."""

from __future__ import annotations

import pytest

from rsd.errors import ConfigError
from rsd.policy.decode import resolve_decode
from rsd.policy.factory import make_policy
from rsd.policy.identity import policy_identity
from rsd.policy.packaged import PACKAGED_POLICIES

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(PACKAGED_POLICIES))
def test_a_packaged_name_is_its_directory(name):
    directory = str(PACKAGED_POLICIES[name])
    assert policy_identity(name) == policy_identity(directory)
    policy = make_policy(name, device="cpu")
    assert policy.kind == ("rsd" if name == "lowdim" else "l1")


def test_decode_choices_read_the_packaged_policy():
    assert resolve_decode("lowdim", "exact").speculative
    with pytest.raises(ConfigError):
        resolve_decode("lowdim-l1", "exact")  # an L1 policy has no tokens to decode speculatively


def test_an_unknown_name_lists_the_packaged_ones():
    with pytest.raises(ConfigError, match="lowdim-l1"):
        make_policy("lowdim-l2", device="cpu")
