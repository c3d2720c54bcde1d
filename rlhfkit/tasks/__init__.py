"""What belongs to one data set rather than to the method, one module per task:
`qa_feedback` (QA-Feedback's reward-model presets and recipe data steps),
`synthetic` (the programmatic fact task with its annotator and judge), `detox` (toxicity
rewards and the detoxification table).

The stages stay generic: a task's reward-model presets are found by the task's name here;
`train-rm --aspect NAME` uses the default task's.
"""

from __future__ import annotations

from rlhfkit.rewards.presets import AspectPreset
from rlhfkit.tasks import qa_feedback

DEFAULT_TASK = "qa_feedback"
# Each task's reward-model presets by aspect name. The synthetic task's aspects are
# QA-Feedback's (its RMs train with these presets); detox trains no RM.
TASK_PRESETS: dict[str, dict[str, AspectPreset]] = {"qa_feedback": qa_feedback.PRESETS}

