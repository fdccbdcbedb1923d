"""When consolidation runs by itself: the beat entry from Settings and the budget policy.

`consolidation_schedule` is "" (off), "every <seconds>", or a 5-field cron line
("minute hour day-of-month month day-of-week", UTC). At each tick the policy looks at every
tenant's tasks grouped by base: when their total stored nonzeros (active versions; a shared
consolidation diff counted once) exceed `consolidation_budget_nnz`, it creates a consolidation
run of those tasks with that budget (trigger 'schedule') and enqueues it, unless a run for
the same tenant and base is still queued or running.

Imports no torch: the beat process loads this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from celery.schedules import crontab

from registry.settings import Settings

POLICY_TASK = "diffbank.consolidation_policy"
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
            "options": {"queue": "maintenance"},
        }
    }


@dataclass(frozen=True)
class PolicyCandidate:
    """A tenant's task set on one base whose stored total exceeds the threshold."""

    tenant_id: int
    base_model: str
    task_names: tuple[str, ...]
    total_nnz: int


def over_budget_groups(
    stored: list[tuple[int, str, str, int, int | None, int]], threshold: int
) -> list[PolicyCandidate]:
    """Groups whose stored total exceeds `threshold`.

    `stored` rows: (tenant_id, base_model, task_name, own_entries, shared_artifact_id,
    shared_entries) per active version; a shared artifact counts once per group.
    """
    if threshold <= 0:
        return []
    groups: dict[tuple[int, str], dict] = {}
    for tenant_id, base_model, task_name, own, shared_id, shared_entries in stored:
        group = groups.setdefault((tenant_id, base_model), {"tasks": [], "own": 0, "shared": {}})
        group["tasks"].append(task_name)
        group["own"] += int(own)
        if shared_id is not None:
            group["shared"][shared_id] = int(shared_entries)
    candidates = []
    for (tenant_id, base_model), group in sorted(groups.items()):
        total = group["own"] + sum(group["shared"].values())
        if total > threshold:
            candidates.append(
                PolicyCandidate(tenant_id, base_model, tuple(sorted(group["tasks"])), total)
            )
    return candidates
