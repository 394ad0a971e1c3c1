"""A LIBERO stand-in for tests of the episode loop (no LIBERO), held to the env contract: tests/contracts/env_contract.py
runs on it (tests/contracts/test_env_contracts.py), so the loop's tests run against an env that behaves like LiberoEnv.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsd.errors import ConfigError, SimSetupError
from rsd.observation import FULL_IMAGE, IMAGE_KEYS, RAW, ObservationSpec
from rsd.sim import protocol


class FakeEnv:
    """Succeeds when the summed dx of the actions after the protocol's settle steps reaches ``target``.

    As ``rsd.sim.libero.LiberoEnv``: ``reset(i)`` (``0 <= i < num_init_states``) and ``step(action)`` return
    observations of the contract (``rsd.observation``; seeded ``ObservationSpec.fake`` data, the cameras only when
    ``render``), whose ``raw`` is ``{"t": steps since the reset}``; ``step`` checks its action with
    ``protocol.validate_action`` and returns ``(obs, done)`` (without the cameras for ``images=False``, as
    ``LiberoEnv``); ``frame()`` needs ``render``. ``actions`` holds
    every action executed since the last reset.
    """

    num_init_states = 50

    def __init__(self, target: float = 1e9, *, render: bool = False, image_size: int = 32) -> None:
        self.target = target
        self.render = render
        self.spec = ObservationSpec(images=IMAGE_KEYS if render else (), image_size=image_size)
        self.actions: list[np.ndarray] = []
        self.total = 0.0
        self._init_state: int | None = None
        self._obs: dict[str, Any] = {}
        self.unobserved_steps = 0

    def reset(self, init_state_index: int) -> dict[str, Any]:
        if not isinstance(init_state_index, (int, np.integer)) or not 0 <= init_state_index < self.num_init_states:
            raise ConfigError(f"init_state_index must be an int in [0, {self.num_init_states}), "
                              f"got {init_state_index!r}")
        self._init_state = int(init_state_index)
        self.actions, self.total = [], 0.0
        self.unobserved_steps = 0  # steps run with images=False (run_episode: no policy reads their observation)
        return self._observe()

    def step(self, action: Any, *, images: bool = True) -> tuple[dict[str, Any], bool]:
        if self._init_state is None:
            raise SimSetupError("call reset(init_state_index) before step()")
        a = protocol.validate_action(action)
        self.actions.append(a)
        waiting = len(self.actions) <= protocol.NUM_STEPS_WAIT
        if not waiting:
            self.total += float(a[0])
        self.unobserved_steps += not images
        obs = self._observe()
        if not images:  # as LiberoEnv: the policy images left out (frame() keeps the camera)
            obs = {k: v for k, v in obs.items() if k not in IMAGE_KEYS}
        return obs, (self.total >= self.target) or waiting  # done during the wait: ignored

    def frame(self) -> np.ndarray:
        if not self.render:
            raise ConfigError("this FakeEnv was made with render=False: frames need FakeEnv(render=True)")
        if self._init_state is None:
            raise SimSetupError("call reset(init_state_index) before frame()")
        return self._obs[FULL_IMAGE].copy()

    def _observe(self) -> dict[str, Any]:
        t = len(self.actions)
        self._obs = self.spec.fake(seed=1000 * self._init_state + t)
        self._obs[RAW] = {"t": t}
        return self._obs
