"""OpenVLA's prompt: the one template every OpenVLA-class backbone and the LIBERO protocol use.

``openvla_prompt("Put the bowl on the plate")`` ->
``"In: What action should the robot take to put the bowl on the plate?\\nOut:"`` (the task lower-cased, as
OpenVLA-OFT's LIBERO evaluation does).
"""

from __future__ import annotations

from rsd.errors import ConfigError

__all__ = ["PROMPT_TEMPLATE", "openvla_prompt"]

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"


def openvla_prompt(instruction: str) -> str:
    """The prompt for a task instruction (LIBERO's ``task.language``), lower-cased. ConfigError if empty."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ConfigError(f"instruction must be a non-empty string, got {instruction!r}")
    return PROMPT_TEMPLATE.format(instruction=instruction.lower())
