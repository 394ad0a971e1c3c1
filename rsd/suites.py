"""The LIBERO task suites rsd knows (one list, used by the simulator and by the checkpoint guard rails)."""

LIBERO_SUITES: tuple[str, ...] = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
