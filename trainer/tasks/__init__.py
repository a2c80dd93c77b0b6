"""The task registry: a task's config `name` picks its module."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from trainer.tasks.base import Prompt, Task, TaskConfig
from trainer.tasks.rng import RngConfig, RngTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (RngTask,)}
AnyTaskConfig = Annotated[RngConfig, Field(discriminator="name")]


def make_task(config: TaskConfig, tokenizer) -> Task:
    return TASKS[config.name](config, tokenizer)


__all__ = ["TASKS", "AnyTaskConfig", "Prompt", "Task", "TaskConfig", "make_task"]
