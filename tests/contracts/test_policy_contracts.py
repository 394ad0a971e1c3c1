"""The policy contract (policy_contract.py) on every policy rsd ships: RSDPolicy (greedy, speculative) and L1Policy
on the tiny backbone, OpenVLA-OFT's L1 pipeline (OFTL1Policy) on the tiny OFT checkpoint, and the `--policy` names
`expert` and `expert-rfsq` on a real LIBERO observation (`sim`: the expert reads LIBERO's privileged state)."""

from __future__ import annotations

from typing import Any

import pytest

from rsd.backbones.openvla_arch import OpenVLAShape
from rsd.backbones.openvla_inputs import observation_spec
from rsd.observation import RAW, ObservationSpec
from tests._openvla_tiny import build_tiny_oft_checkpoint
from tests.contracts.policy_contract import PolicyContract
from tests.policy_factory import IMAGE, tiny_l1_policy, tiny_rsd_policy

TINY_POLICIES = {  # the tiny sizes with LIBERO's chunk of 8 steps
    "rsd_greedy": lambda: tiny_rsd_policy(speculative=False, chunk_len=8),
    "rsd_speculative": lambda: tiny_rsd_policy(speculative=True, chunk_len=8),
    "l1": lambda: tiny_l1_policy(chunk_len=8),
}


class TestTinyBackbonePolicies(PolicyContract):
    """RSDPolicy (greedy and speculative decoding) and L1Policy on TinyBackbone."""

    spec = ObservationSpec(image_size=IMAGE)

    @pytest.fixture(scope="class", params=list(TINY_POLICIES))
    @classmethod
    def policy(cls, request: pytest.FixtureRequest) -> Any:
        return TINY_POLICIES[request.param]()


class TestOFTL1Policy(PolicyContract):
    spec = observation_spec(OpenVLAShape.tiny())

    @pytest.fixture(scope="class")
    @classmethod
    def policy(cls, tmp_path_factory: pytest.TempPathFactory) -> Any:
        from rsd.backbones.openvla import OpenVLAOFTBackbone
        from rsd.policy import OFTL1Policy

        checkpoint = build_tiny_oft_checkpoint(tmp_path_factory.mktemp("oft") / "openvla-7b-oft-finetuned-libero-spatial")
        return OFTL1Policy(OpenVLAOFTBackbone.from_pretrained(checkpoint, "libero_spatial", device="cpu"))


@pytest.fixture(scope="module")
def libero_start() -> tuple[dict[str, Any], str]:
    """The first observation of libero_spatial task 0, init state 0 (unrendered), and the task's instruction."""
    from rsd.sim import libero

    with libero.make_env("libero_spatial", 0, render=False) as env:
        return env.reset(0), env.task.instruction


class ScriptedOnLibero(PolicyContract):
    """Policies that read LIBERO's privileged state (``raw``) only."""

    spec = ObservationSpec(images=(), raw=True)

    def required_keys(self) -> tuple[str, ...]:
        return (RAW,)

    @pytest.fixture
    def observation(self, libero_start: tuple[dict[str, Any], str]) -> dict[str, Any]:
        return libero_start[0]

    @pytest.fixture
    def instruction(self, libero_start: tuple[dict[str, Any], str]) -> str:
        return libero_start[1]


@pytest.mark.sim
class TestScriptedExpert(ScriptedOnLibero):
    @pytest.fixture(scope="class")
    @classmethod
    def policy(cls) -> Any:
        from rsd.policy import make_policy

        return make_policy("expert")


@pytest.mark.sim
class TestRFSQRoundTripPolicy(ScriptedOnLibero):
    @pytest.fixture(scope="class")
    @classmethod
    def policy(cls) -> Any:
        from rsd.policy import RFSQRoundTripPolicy, make_policy

        policy = make_policy("expert-rfsq")
        assert isinstance(policy, RFSQRoundTripPolicy)
        return policy
