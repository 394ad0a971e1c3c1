"""The scripted expert decides a fresh action at every control step (no LIBERO).

Demonstrations come from ``predict_step`` (closed loop, one action per step): chunks cut from them must carry
within-chunk motion, never one action tiled 8 times. ``predict_chunk`` (open loop) returns 8 distinct actions
rolled forward on the predicted site pose; in a world that responds exactly as predicted it equals the closed loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from rsd.errors import ConfigError
from rsd.sim import expert_control as control
from rsd.sim.demos import Demo, action_chunks
from rsd.sim.experts import CHUNK_LEN, ScriptedExpert, StepwiseExpert
from tests._expert_world import SOUP, KinematicWorld, tiled

pytestmark = pytest.mark.unit

MOVING = ("approach", "descend", "lift", "carry", "lower", "retreat")  # phases with a target away from the site


def _demonstration(world: KinematicWorld, steps: int = 280) -> tuple[np.ndarray, list[str]]:
    """One per-step episode of the expert in ``world``: actions [T, 7] and each step's phase."""
    expert = StepwiseExpert()
    actions, phases = [], []
    for _ in range(steps):
        chunk = expert.predict_chunk({"raw": world.raw()}, SOUP)
        assert chunk.actions.shape == (1, 7)
        actions.append(chunk.actions[0])
        phases.append(chunk.info["phase"])
        world.step(chunk.actions[0])
        if world.placed():
            break
    assert world.placed()
    return np.stack(actions), phases


def test_tiled_detects_one_action_repeated() -> None:
    row = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)
    assert tiled(np.repeat(row[None, :], CHUNK_LEN, axis=0))  # what the expert once returned
    moving = np.repeat(row[None, :], CHUNK_LEN, axis=0)
    moving[5, 0] = 0.29
    assert not tiled(moving)


def _at_speed_limit(chunk: np.ndarray) -> bool:
    """Every row of ``chunk`` [n, 7] commands the top speed (``max |a[:3]| == 1``), the floor speed
    (``ScriptedExpert.min_action``) or rest (0: holding while the gripper moves): in a world without dynamics,
    along a straight line, these are the places where consecutive actions may repeat (in LIBERO the arm's own
    dynamics bend every path: no recorded window is tiled there)."""
    speed = np.abs(chunk[:, :3]).max(axis=1)  # [n]
    return bool(np.all(np.isclose(speed, 1.0) | np.isclose(speed, ScriptedExpert.min_action) | (speed == 0.0)))


def test_demonstration_chunks_are_not_tiled() -> None:
    """No 8-step window of a per-step demonstration repeats one action, except at a speed limit; wherever the arm
    speeds up, slows down or corrects, the actions change within the window (the control law sees each step's
    site position). In LIBERO no recorded window is tiled at all (tests/sim/test_collect_train.py)."""
    actions, phases = _demonstration(KinematicWorld())
    chunks = action_chunks([Demo("d", actions.astype(np.float64), SOUP)], chunk_len=CHUNK_LEN)  # [N, 8, 7]
    assert chunks.shape[0] == actions.shape[0] - CHUNK_LEN + 1
    assert [i for i, c in enumerate(chunks) if tiled(c) and not _at_speed_limit(c)] == []
    spread = np.abs(chunks[:, :, :3] - chunks[:, :1, :3]).max(axis=(1, 2))  # [N] largest change from row 0
    moving = np.array([all(p in MOVING for p in phases[i:i + CHUNK_LEN]) for i in range(len(chunks))])
    assert moving.sum() > 50
    assert np.median(spread[moving]) > 0.02, np.round(spread[moving], 3)
    # the defect this guards against: one decision per chunk, repeated; every window of the aligned chunks is tiled
    repeated = np.repeat(actions[::CHUNK_LEN], CHUNK_LEN, axis=0)  # [T', 7]
    assert all(tiled(c) for c in action_chunks([Demo("r", repeated.astype(np.float64), SOUP)], CHUNK_LEN)[::8])


def test_open_loop_chunk_is_eight_distinct_actions() -> None:
    world, expert = KinematicWorld(), ScriptedExpert()
    distinct = 0
    for _ in range(280 // CHUNK_LEN):
        chunk = expert.predict_chunk({"raw": world.raw()}, SOUP)
        assert chunk.actions.shape == (CHUNK_LEN, 7) and chunk.actions.dtype == np.float32
        rows, counts = np.unique(chunk.actions, axis=0, return_counts=True)  # [U, 7], [U]
        if len(rows) == CHUNK_LEN:
            distinct += 1
        else:  # repeated rows only at a speed limit
            assert _at_speed_limit(rows[counts > 1]), (chunk.info["phase"], chunk.actions)
        for action in chunk.actions:
            world.step(action)
        if world.placed():
            break
    assert world.placed() and distinct >= 6  # 8 of the 18 chunks of this episode

def test_open_loop_chunk_is_the_closed_loop_where_the_world_responds_as_predicted() -> None:
    """Where the site moves exactly ``RESPONSE`` of the command per step, the chunk equals the 8 per-step actions."""
    chunked, stepped = KinematicWorld(response=control.RESPONSE), KinematicWorld(response=control.RESPONSE)
    a, b = ScriptedExpert(), ScriptedExpert()
    b.damping = 0.0  # the closed loop's damping acts on the observed velocity, which the open loop has not
    for _ in range(6):
        chunk = a.predict_chunk({"raw": chunked.raw()}, SOUP).actions  # [8, 7]
        steps = []
        for _step in range(CHUNK_LEN):
            steps.append(b.predict_step({"raw": stepped.raw()}, SOUP).actions[0])
            stepped.step(steps[-1])
        for action in chunk:
            chunked.step(action)
        np.testing.assert_allclose(chunk, np.stack(steps), atol=1e-6)
    assert not np.allclose(chunk, chunk[:1])


def test_the_open_loop_rollout_decelerates_towards_the_target() -> None:
    command = control.Command(target=np.array([0.05, 0.0, 0.0]), gripper=-1.0, gain=8.0, integral=np.zeros(3))
    gains = control.Gains(min_action=0.12, floor_tol=0.004, rot_gain=0.3, step_gain=1.5)
    actions = control.rollout(command, np.zeros(3), np.array([0.0, 0.0, 0.1]), gains)  # [8, 7]
    assert actions.shape == (CHUNK_LEN, 7)
    assert np.all(np.diff(actions[:, 0]) < 0) and np.all(actions[:, 0] > 0)  # less and less, never past it
    assert np.all(np.diff(actions[:, 5]) < 0) and np.all(actions[:, 5] > 0)  # the rotation too
    assert np.all(actions[:, 6] == -1.0) and np.all(actions[:, [1, 2, 3, 4]] == 0.0)


def test_one_entry_point_per_episode() -> None:
    world = KinematicWorld()
    expert = ScriptedExpert()
    expert.predict_step({"raw": world.raw()}, SOUP)
    with pytest.raises(ConfigError, match="reset"):
        expert.predict_chunk({"raw": world.raw()}, SOUP)
    expert.reset()
    assert expert.predict_chunk({"raw": world.raw()}, SOUP).actions.shape == (CHUNK_LEN, 7)


def test_per_step_phases_change_only_on_chunk_boundaries() -> None:
    _actions, phases = _demonstration(KinematicWorld(slip_once=True))
    changes = [t for t in range(1, len(phases)) if phases[t] != phases[t - 1]]
    assert changes and all(t % CHUNK_LEN == 0 for t in changes), changes


def test_damping_takes_the_error_where_the_observed_motion_will_carry_the_site() -> None:
    command = control.Command(target=np.array([0.02, 0.0, 0.0]), gripper=1.0, gain=8.0, integral=np.zeros(3))
    gains = control.Gains(min_action=0.0, floor_tol=0.004, rot_gain=0.3, step_gain=1.5, damping=2.0)
    moving = np.array([0.004, 0.0, 0.0])  # towards the target, m per step
    np.testing.assert_allclose(control.action(command, np.zeros(3), np.zeros(3), gains, moving)[0], 12.0 * 0.012)
    np.testing.assert_allclose(control.action(command, np.zeros(3), np.zeros(3), gains)[0], 12.0 * 0.02)  # open loop
