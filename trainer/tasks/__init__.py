"""The task registry: a task's config `name` picks its module."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from trainer.tasks.base import Prompt, Task, TaskConfig
from trainer.tasks.constrained import ConstrainedConfig, ConstrainedTask
from trainer.tasks.continuation import ContinuationConfig, ContinuationTask
from trainer.tasks.infill import InfillConfig, InfillTask
from trainer.tasks.reasoning import ReasoningConfig, ReasoningTask
from trainer.tasks.rng import RngConfig, RngTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (RngTask, InfillTask, ConstrainedTask, ReasoningTask, ContinuationTask)
}
AnyTaskConfig = Annotated[RngConfig | InfillConfig | ConstrainedConfig | ReasoningConfig
                         | ContinuationConfig, Field(discriminator="name")]


def make_task(config: TaskConfig, tokenizer) -> Task:
    return TASKS[config.name](config, tokenizer)


__all__ = ["TASKS", "AnyTaskConfig", "Prompt", "Task", "TaskConfig", "make_task"]
