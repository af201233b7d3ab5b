"""The X Education leads file's pre-contact columns, shared by tests/test_scoring.py and
bench/model_quality.py, model_honesty.py so that the floor test and the benchmarks measure the
same feature set (the tests own it: they must not import bench/).

The tiers come from shared/data/README.md: these columns are known before any sales contact;
the rest (the activity snapshots and the sales-filled columns) leak the outcome. The example
config's `leaky_fields` is a different, looser list (it keeps the activity snapshots).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

LABEL = "Converted"
PRE_CONTACT = [
    "Lead Origin", "Lead Source", "Do Not Email", "Do Not Call", "TotalVisits",
    "Total Time Spent on Website", "Page Views Per Visit", "Country", "Specialization",
    "How did you hear about X Education", "What is your current occupation",
    "What matters most to you in choosing a course", "City", "Search", "Magazine",
    "Newspaper Article", "X Education Forums", "Newspaper", "Digital Advertisement",
    "Through Recommendations", "Receive More Updates About Our Courses",
    "Update me on Supply Chain Content", "Get updates on DM Content",
    "I agree to pay the amount through cheque", "A free copy of Mastering The Interview",
]


def not_pre_contact(path: Path) -> list[str]:
    """The columns of the Leads.csv at `path` to exclude: all but the pre-contact ones and the label."""
    columns = pd.read_csv(path, nrows=0).columns
    return [c for c in columns if c not in PRE_CONTACT and c != LABEL]
