"""The observation contract as data: ObservationSpec.validate and the one fake-observation generator."""

from __future__ import annotations

import numpy as np
import pytest

from rsd.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from rsd.observation import (FULL_IMAGE, IMAGE_KEYS, OBJECT_NAMES, OBJECT_POSES, POSE_DIM, RAW, STATE, WRIST_IMAGE,
                             ObservationSpec)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("spec", [ObservationSpec(), ObservationSpec(images=(), raw=True),
                                  ObservationSpec(images=(FULL_IMAGE,), image_size=28)])
@pytest.mark.parametrize("batch", [None, 3])
def test_fake_observations_are_valid(spec: ObservationSpec, batch: int | None) -> None:
    obs = spec.fake(seed=1, batch=batch)
    assert spec.validate(obs) is obs
    for key in spec.images:
        assert obs[key].shape == ((batch,) if batch else ()) + (spec.image_size, spec.image_size, 3)
    assert obs[STATE].dtype == np.float32 and (RAW in obs) == spec.raw
    np.testing.assert_array_equal(spec.fake(seed=1, batch=batch)[STATE], obs[STATE])  # seeded


@pytest.mark.parametrize("edit, err, match", [
    (lambda o: o.pop(WRIST_IMAGE), ShapeError, "render"),
    (lambda o: o.update(full_image=o[FULL_IMAGE].astype(np.float32)), DTypeError, "uint8"),
    (lambda o: o.update(full_image=o[FULL_IMAGE][:200]), ShapeError, "224, 224, 3"),
    (lambda o: o.update(state=o[STATE][:7]), ShapeError, r"\[8\]"),
    (lambda o: o.update(state=np.full(8, np.nan, np.float32)), NonFiniteError, "NaN"),
    (lambda o: o.update(state=np.zeros(8, np.int64)), DTypeError, "float32"),
    (lambda o: o.update(state=np.zeros((2, 8), np.float32)), ShapeError, "batch"),
])
def test_validate_names_the_key_and_the_fix(edit, err, match) -> None:
    spec = ObservationSpec()
    obs = spec.fake()
    edit(obs)
    with pytest.raises(err, match=match):
        spec.validate(obs)


def test_spec_checks_itself_and_raw() -> None:
    with pytest.raises(ConfigError):
        ObservationSpec(images=("left_image",))
    with pytest.raises(ConfigError):
        ObservationSpec(image_size=0)
    with pytest.raises(ShapeError, match="raw"):
        ObservationSpec(raw=True).validate(ObservationSpec().fake())
    with pytest.raises(DTypeError):
        ObservationSpec().validate([1, 2])
    assert IMAGE_KEYS == (FULL_IMAGE, WRIST_IMAGE)


def test_torch_tensors_are_arrays_too_and_other_values_are_refused() -> None:
    torch = pytest.importorskip("torch")
    spec = ObservationSpec(image_size=32)
    obs = spec.fake(seed=2, batch=2)
    as_tensors = {key: torch.from_numpy(value) for key, value in obs.items()}
    assert spec.validate(as_tensors) is as_tensors
    with pytest.raises(NonFiniteError, match="state"):
        spec.validate({**as_tensors, STATE: torch.full((2, 8), float("nan"))})
    with pytest.raises(DTypeError, match=r"observation\['state'\] must be a numpy array or torch.Tensor, got list"):
        spec.validate({**obs, STATE: [0.0] * 8})
    with pytest.raises(ShapeError, match=r"lacks \['wrist_image'\].*render the episode.*; or drop the wrist camera"):
        spec.validate({k: v for k, v in obs.items() if k != WRIST_IMAGE}, hint="or drop the wrist camera")


OBJECTS = ObservationSpec(images=(), objects=True)


@pytest.mark.parametrize("batch", [None, 2])
def test_fake_object_poses_are_valid(batch: int | None) -> None:
    obs = OBJECTS.fake(seed=3, batch=batch)
    assert OBJECTS.validate(obs) is obs
    assert obs[OBJECT_POSES].shape == ((batch,) if batch else ()) + (len(obs[OBJECT_NAMES]), POSE_DIM)


@pytest.mark.parametrize("edit, err, match", [
    (lambda o: o.pop(OBJECT_POSES), ShapeError, "object_poses"),
    (lambda o: o.update(object_names=o[OBJECT_NAMES][:2]), ShapeError, "K = 2"),
    (lambda o: o.update(object_names=["bowl", 3, "x"]), DTypeError, "names"),
    (lambda o: o.update(object_poses=np.full((3, 7), np.inf, np.float32)), NonFiniteError, "NaN/inf"),
    (lambda o: o.update(object_poses=np.zeros((3, 7), np.int32)), DTypeError, "float32"),
    (lambda o: o.update(object_poses=np.zeros((2, 3, 7), np.float32)), ShapeError, "batch"),
])
def test_object_poses_are_checked(edit, err, match) -> None:
    obs = OBJECTS.fake()
    edit(obs)
    with pytest.raises(err, match=match):
        OBJECTS.validate(obs)
