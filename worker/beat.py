"""The beat schedule from Settings: the lost-job sweep, and the consolidation policy when on.

`consolidation_schedule` is "" (off), "every <seconds>", or a 5-field cron line
("minute hour day-of-month month day-of-week", UTC); the policy itself is
`worker.consolidation.policy`.
Imports no torch: the beat process loads this module.
"""

from __future__ import annotations

import re

from celery.schedules import crontab

from settings import Settings
from worker.queueing import MAINTENANCE_QUEUE, POLICY_TASK, SWEEP_TASK

SWEEP_ENTRY = "sweep-lost-jobs"
POLICY_ENTRY = "consolidation-policy"
_EVERY = re.compile(r"^every\s+(\d+(?:\.\d+)?)\s*s?$")


class ScheduleError(ValueError):
    """A `consolidation_schedule` value that is neither "every <seconds>" nor a 5-field cron line."""


def parse_schedule(text: str) -> float | crontab | None:
    """Seconds between runs, a crontab, or None when the schedule is off."""
    text = text.strip()
    if not text:
        return None
    every = _EVERY.match(text)
    if every:
        seconds = float(every.group(1))
        if seconds <= 0:
            raise ScheduleError(
                "consolidation_schedule: 'every' needs a positive number of seconds"
            )
        return seconds
    fields = text.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"consolidation_schedule {text!r}: expected 'every <seconds>' or a 5-field cron line"
        )
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    try:
        return crontab(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
        )
    except (ValueError, TypeError) as exc:
        raise ScheduleError(f"consolidation_schedule {text!r}: {exc}") from exc


def consolidation_beat_schedule(settings: Settings) -> dict:
    """The beat entry running the consolidation policy, or {} when scheduling is off."""
    schedule = parse_schedule(settings.consolidation_schedule)
    if schedule is None or settings.consolidation_budget_nnz <= 0:
        return {}
    return {
        POLICY_ENTRY: {
            "task": POLICY_TASK,
            "schedule": schedule,
            "options": {"queue": MAINTENANCE_QUEUE},
        }
    }


def beat_schedule(settings: Settings) -> dict:
    """Periodic tasks: the lost-job sweep, plus the consolidation policy when configured."""
    schedule: dict = {
        SWEEP_ENTRY: {
            "task": SWEEP_TASK,
            "schedule": float(settings.sweep_interval_s),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": float(settings.sweep_interval_s)},
        }
    }
    schedule.update(consolidation_beat_schedule(settings))
    return schedule
