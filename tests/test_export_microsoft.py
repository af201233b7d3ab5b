"""Every Microsoft error name the exporter matches, and every one the fake answers with, is one of
Microsoft's published operation error codes (with its published number)."""

from __future__ import annotations

from leadloop.export import microsoft
from leadloop.sandbox.fake_platforms import MS_ERRORS
from tests.fakes.microsoft_codes import DAILY_SUMMARY_STATUSES, PUBLISHED


def test_the_exporter_matches_only_published_codes() -> None:
    matched = set(microsoft.SETUP) | set(microsoft.RETRY_AFTER)
    documented = set(PUBLISHED) | DAILY_SUMMARY_STATUSES
    assert matched <= documented, matched - documented
    # the 2-hour wait after a goal is created is 5615 in the API (the daily summary report calls
    # the same condition OfflineConversionGoalTooRecent)
    assert microsoft.RETRY_AFTER["OfflineConversionNotAcceptedForGoal"] == 2 * 3600


def test_the_fake_answers_only_with_published_codes_and_numbers() -> None:
    assert {name: PUBLISHED.get(name) for name in MS_ERRORS} == MS_ERRORS


def test_a_goal_too_recent_is_retried_and_an_unknown_goal_pauses() -> None:
    assert microsoft.classify("o1", "OfflineConversionNotAcceptedForGoal", "").outcome == "retry"
    assert microsoft.classify("o1", "OfflineConversionGoalTooRecent", "").outcome == "retry"
    assert microsoft.classify("o1", "OfflineConversionNameInvalid", "").outcome == "paused"
    assert microsoft.classify("o1", "OfflineConversionMicrosoftClickIdInvalid", "").outcome == "rejected"
