"""A simulated B2B lead funnel with known ground truth.

`simulate(n)` draws `n` leads from a fixed generative model (numpy, vectorised, deterministic for
a seed) and returns a `Funnel`: the leads with their attribution, firmographics, consent, micro-
conversions, lifecycle history and deals, plus the `GroundTruth` that generated them, so tests can
check that the scorer and the validator find what was planted.

The model, in one paragraph: each lead comes from a source/campaign segment (some segments bring
many cheap low-quality leads, others few valuable ones) and has firmographics. Its macro conversion
(reaching lifecycle stage `salesqualifiedlead`) is a Bernoulli draw whose log-odds are the sum of an
intercept, the log odds ratios of its segment, firmographics and micro-conversions, and Gaussian
noise (unobserved quality). Micro-conversions occur independently of everything else with fixed
rates, so their planted odds ratios are conditional ones in that logistic model (a marginal
estimate comes out slightly closer to 1). Micro events happen between creation and the macro stage
(or within 30 days), except `SPREAD_MICRO_DAYS`'s: a null micro-conversion spread over the first
month whatever the lead does, so a validator that gives converters a shorter window than
non-converters shows a false negative effect on it.
Stage delays are lognormal; a share of SQLs become opportunities with one deal that is won, lost or
still open; deal amounts are lognormal by company size. Anything that would happen after `end` is
censored, as in a real CRM export taken at `end`.

Memory stays modest at millions of leads: the funnel keeps numpy columns (times as int32 seconds
from the window start) and builds `SimLead` objects only when `funnel.leads` is read.

Contact and identity data are fake: e-mails at example.com/.org/.net, phones in the fictional
555-01xx range, click ids derived from a hash of the seed and the lead's index.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal, overload

import numpy as np

from leadloop.crm.base import Cursor, EventIn, LeadIn, Page, StageIn

DEFAULT_END = datetime(2026, 10, 1, tzinfo=UTC)
NONE = -1  # "did not happen (yet)" in the int32 time columns

LIFECYCLE = ("lead", "marketingqualifiedlead", "salesqualifiedlead", "opportunity", "customer")
MACRO_STAGE = "salesqualifiedlead"

# name -> (share of leads with it, planted odds ratio on the macro conversion)
MICRO_CONVERSIONS: dict[str, tuple[float, float]] = {
    "guide_download": (0.22, 2.0),
    "pricing_view": (0.14, 4.0),
    "webinar_signup": (0.08, 2.5),
    "newsletter_signup": (0.20, 1.0),  # pure noise
    "careers_page_view": (0.07, 0.35),  # job seekers, not buyers
    "help_center_visit": (0.18, 1.0),  # pure noise, any time in the first month (below)
}
# Micro-conversions whose time is independent of the conversion: uniform over the first N days
# after creation, before or after the macro stage. Their presence and times come from a stream
# of their own, so adding one leaves every other draw of a seed as it was.
SPREAD_MICRO_DAYS: dict[str, float] = {"help_center_visit": 30.0}

# (utm_source, utm_medium, hs_analytics_source channel, share of leads,
#  [(utm_campaign, share within source, odds ratio)])
SOURCES: tuple[tuple[str | None, str | None, str, float, list[tuple[str | None, float, float]]], ...] = (
    ("google", "cpc", "PAID_SEARCH", 0.30,
     [("brand-search", 0.25, 2.2), ("generic-search", 0.55, 1.0), ("competitor-search", 0.20, 0.8)]),
    # Meta lead ads: many cheap leads of low quality; retargeting is better.
    ("facebook", "paid_social", "PAID_SOCIAL", 0.26,
     [("leadgen-ebook-leadads", 0.65, 0.35), ("retargeting-demo", 0.35, 1.2)]),
    # LinkedIn: few, valuable leads.
    ("linkedin", "paid_social", "PAID_SOCIAL", 0.07,
     [("abm-enterprise", 0.40, 3.0), ("sponsored-content", 0.60, 1.6)]),
    ("bing", "cpc", "PAID_SEARCH", 0.05, [("generic-search-bing", 1.0, 1.1)]),
    (None, None, "ORGANIC_SEARCH", 0.15, [(None, 1.0, 1.3)]),
    (None, None, "DIRECT_TRAFFIC", 0.08, [(None, 1.0, 1.5)]),
    ("partner-site", "referral", "REFERRALS", 0.05, [("partner-directory", 1.0, 2.0)]),
    ("newsletter", "email", "EMAIL_MARKETING", 0.04, [("monthly-newsletter", 1.0, 1.0)]),
)
META_LEAD_AD_CAMPAIGN = "leadgen-ebook-leadads"

# value -> (share, odds ratio); company size also sets the deal amount median
COMPANY_SIZES = {"1-10": (0.30, 0.6), "11-50": (0.28, 0.9), "51-200": (0.20, 1.0),
                 "201-1000": (0.14, 1.4), "1001+": (0.08, 1.8)}
DEAL_MEDIAN_BY_SIZE = {"1-10": 3_000.0, "11-50": 8_000.0, "51-200": 18_000.0,
                       "201-1000": 40_000.0, "1001+": 90_000.0}
JOB_LEVELS = {"student": (0.08, 0.2), "individual_contributor": (0.37, 0.8), "manager": (0.25, 1.0),
              "director": (0.15, 1.6), "vp": (0.08, 1.8), "c_level": (0.07, 1.5)}
INDUSTRIES = {"software": (0.25, 1.3), "financial_services": (0.12, 1.2), "healthcare": (0.10, 1.0),
              "retail": (0.12, 0.9), "manufacturing": (0.14, 1.0), "education": (0.09, 0.7),
              "other": (0.18, 0.8)}
COUNTRIES = {"US": (0.40, 1.0), "GB": (0.12, 1.0), "DE": (0.10, 1.0), "FR": (0.07, 0.9),
             "NL": (0.05, 1.0), "CA": (0.07, 1.0), "AU": (0.05, 0.95), "IN": (0.09, 0.5),
             "BR": (0.05, 0.6)}

INTERCEPT = -2.05  # calibrated so that ~17 % of leads eventually reach the macro stage
NOISE_SD = 0.5  # unobserved lead quality (log-odds)

# transition -> (median days, lognormal sigma)
STAGE_DELAYS: dict[str, tuple[float, float]] = {
    "lead->marketingqualifiedlead": (1.5, 1.0),
    "marketingqualifiedlead->salesqualifiedlead": (6.0, 0.8),
    "salesqualifiedlead->opportunity": (4.0, 0.7),
    "deal_stage_step": (5.0, 0.7),
}
MQL_SHARE_OF_NON_MACRO = 0.30
OPPORTUNITY_SHARE_OF_MACRO = 0.65
WIN_INTERCEPT = -0.45  # log-odds of winning an opportunity (plus half the lead's quality)
LOST_SHARE_OF_NOT_WON = 0.75  # the rest stall and stay open
DEAL_AMOUNT_SIGMA = 0.8
CURRENCY = "EUR"
TOUCH_SHARE = 0.3  # leads edited later (a note, a property change) without a stage change

FIRST_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Emma", "Felix", "Grace", "Hugo", "Ines", "Jon",
               "Kira", "Liam", "Maya", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tara",
               "Uma", "Vik", "Wen", "Xavi", "Yara", "Zoe")
LAST_NAMES = ("Adams", "Berg", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Huang", "Ito",
              "Jansen", "Kowalski", "Lopez", "Martin", "Nguyen", "Olsen", "Patel", "Quist", "Rossi",
              "Schmidt", "Tanaka", "Usman", "Varga", "Weber", "Xu", "Young", "Zimmer")
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
AREA_CODES = ("202", "303", "312", "415", "512", "617", "646", "702", "808", "919")
BAD_EMAIL_SHARE = 0.003
PHONE_SHARE = 0.6
IOS_SHARE_OF_GOOGLE = 0.18
CLICK_ID_KEPT = 0.9  # share of paid leads whose click id survived (blockers, consent banners)
DENY_USER_DATA = 0.03
DENY_PERSONALIZATION_EXTRA = 0.04

# click id kinds (column `click`)
_NO_CLICK, _GCLID, _GBRAID, _WBRAID, _FBCLID, _META_LEAD, _MSCLKID, _LI_FAT_ID = range(8)


@dataclass(frozen=True, slots=True)
class PipelineStage:
    id: str
    label: str
    display_order: int
    probability: float
    is_closed: bool

    @property
    def is_won(self) -> bool:
        return self.is_closed and self.probability >= 1.0

    @property
    def is_lost(self) -> bool:
        return self.is_closed and self.probability <= 0.0


@dataclass(frozen=True, slots=True)
class Pipeline:
    id: str
    label: str
    stages: tuple[PipelineStage, ...]

    def stage(self, stage_id: str) -> PipelineStage:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)


DEFAULT_PIPELINE = Pipeline("default", "Sales Pipeline", (
    PipelineStage("appointmentscheduled", "Appointment Scheduled", 0, 0.2, False),
    PipelineStage("qualifiedtobuy", "Qualified To Buy", 1, 0.4, False),
    PipelineStage("presentationscheduled", "Presentation Scheduled", 2, 0.6, False),
    PipelineStage("decisionmakerboughtin", "Decision Maker Bought-In", 3, 0.8, False),
    PipelineStage("contractsent", "Contract Sent", 4, 0.9, False),
    PipelineStage("closedwon", "Closed Won", 5, 1.0, True),
    PipelineStage("closedlost", "Closed Lost", 6, 0.0, True),
))
_OPEN_STAGES = tuple(s.id for s in DEFAULT_PIPELINE.stages if not s.is_closed)


@dataclass(frozen=True, slots=True)
class SimDeal:
    deal_id: str
    stages: list[tuple[str, datetime]]  # (stage id, entered at), oldest first
    amount: float
    currency: str
    outcome: Literal["won", "lost", "open"]

    @property
    def created_at(self) -> datetime:
        return self.stages[0][1]

    @property
    def stage(self) -> str:
        return self.stages[-1][0]


@dataclass(slots=True)
class SimLead:
    crm_id: str
    created_at: datetime
    updated_at: datetime
    email: str
    phone: str | None
    firstname: str
    lastname: str
    utm_source: str | None
    utm_medium: str | None
    utm_campaign: str | None
    landing_page: str
    channel: str  # hs_analytics_source
    gclid: str | None
    gbraid: str | None
    wbraid: str | None
    fbclid: str | None
    meta_lead_id: str | None
    msclkid: str | None
    li_fat_id: str | None
    consent_ad_user_data: bool
    consent_ad_personalization: bool
    country: str
    company_size: str
    industry: str
    job_level: str
    lifecycle: list[tuple[str, datetime]]  # (value, entered at), oldest first
    micro_events: list[tuple[str, datetime]]
    deals: list[SimDeal]
    p_macro: float  # the true probability of the macro conversion (ground truth)

    @property
    def lifecyclestage(self) -> str:
        return self.lifecycle[-1][0]

    def entered(self, stage: str) -> datetime | None:
        return next((t for v, t in self.lifecycle if v == stage), None)


@dataclass(frozen=True)
class GroundTruth:
    """What generated the funnel. Odds ratios are conditional ones in the logistic model."""

    macro_stage: str
    micro_effects: dict[str, float]  # micro-conversion -> planted odds ratio (1.0 = noise)
    micro_rates: dict[str, float]  # micro-conversion -> share of leads with it
    source_shares: dict[str, float]  # utm_source or channel -> share of leads
    campaign_effects: dict[str, float]  # utm_campaign (or channel when none) -> odds ratio
    firmographic_effects: dict[str, dict[str, float]]  # attribute -> value -> odds ratio
    intercept: float
    noise_sd: float
    stage_delays: dict[str, tuple[float, float]]  # transition -> (median days, sigma)
    opportunity_share: float
    win_intercept: float
    lost_share_of_not_won: float
    deal_amount_median: dict[str, float]  # company size -> median amount
    deal_amount_sigma: float
    currency: str
    macro_probability: np.ndarray = field(repr=False)  # per lead, in `Funnel.leads` order
    converts: np.ndarray = field(repr=False)  # per lead: reaches the macro stage eventually
    # lifecycle stage -> per lead: reaches it eventually (not censored at `end`)
    reaches: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    won_amount: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # won amount, else 0
    micro_spread_days: dict[str, float] = field(default_factory=dict)

    def stage_value(self, lifecycle_stage: str) -> float:
        """The true value of reaching `lifecycle_stage`: P(won | reached) × mean won amount,
        i.e. the mean won amount over every lead that eventually reaches it."""
        reached = self.reaches[lifecycle_stage]
        return float(self.won_amount[reached].mean()) if reached.any() else 0.0

    @property
    def macro_rate(self) -> float:
        return float(self.converts.mean()) if len(self.converts) else 0.0


class _LeadView(Sequence[SimLead]):
    """A read-only list of `SimLead`s built on access from the funnel's columns."""

    def __init__(self, funnel: Funnel) -> None:
        self._funnel = funnel

    def __len__(self) -> int:
        return self._funnel.n

    @overload
    def __getitem__(self, i: int) -> SimLead: ...
    @overload
    def __getitem__(self, i: slice) -> list[SimLead]: ...
    def __getitem__(self, i: int | slice) -> SimLead | list[SimLead]:
        if isinstance(i, slice):
            return [self._funnel.lead(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._funnel.lead(i)

    def __iter__(self) -> Iterator[SimLead]:
        for i in range(len(self)):
            yield self._funnel.lead(i)


@dataclass
class Funnel:
    """Leads ordered by creation (crm_id ascending), their ground truth, and the deal pipeline."""

    seed: int
    start: datetime
    end: datetime
    cols: dict[str, np.ndarray] = field(repr=False)
    truth: GroundTruth = field(repr=False)
    pipeline: Pipeline = DEFAULT_PIPELINE

    @property
    def n(self) -> int:
        return len(self.cols["created"])

    @property
    def leads(self) -> Sequence[SimLead]:
        return _LeadView(self)

    def time(self, offset: int) -> datetime:
        return self.start + timedelta(seconds=int(offset))

    def index_of(self, crm_id: str) -> int:
        return int(crm_id) - FIRST_CONTACT_ID

    def lead(self, i: int) -> SimLead:
        return _build_lead(self, i)


FIRST_CONTACT_ID = 100_001
FIRST_DEAL_ID = 9_000_000_001


def _choice(rng: np.random.Generator, table: dict[str, tuple[float, float]], n: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Draw codes from `table` and return (codes, log odds ratios)."""
    shares = np.array([s for s, _ in table.values()])
    codes = rng.choice(len(table), size=n, p=shares / shares.sum()).astype(np.int8)
    log_or = np.log(np.array([o for _, o in table.values()]))
    return codes, log_or[codes]


def _delay_seconds(rng: np.random.Generator, key: str, n: int) -> np.ndarray:
    median, sigma = STAGE_DELAYS[key]
    return rng.lognormal(np.log(median * 86_400.0), sigma, n)


def _segments() -> list[tuple[int, int, float, float]]:
    """(source index, campaign index, share of leads, odds ratio) for every campaign."""
    return [(si, ci, share * cshare, ratio)
            for si, (_, _, _, share, camps) in enumerate(SOURCES)
            for ci, (_, cshare, ratio) in enumerate(camps)]


def simulate(n_leads: int, *, seed: int = 7, end: datetime | None = None, days: int = 365) -> Funnel:
    """Simulate `n_leads` leads created over the `days` before `end` (see the module doc)."""
    if n_leads < 0 or days <= 0:
        raise ValueError("n_leads must be >= 0 and days > 0")
    end = (end or DEFAULT_END).astimezone(UTC)
    start = end - timedelta(days=days)
    horizon = days * 86_400
    rng = np.random.default_rng(seed)
    n = n_leads

    # Creation times: sorted, so crm ids grow with creation as in HubSpot.
    created = np.sort(rng.uniform(0, horizon, n))

    segs = _segments()
    seg_share = np.array([s[2] for s in segs])
    seg = rng.choice(len(segs), size=n, p=seg_share / seg_share.sum()).astype(np.int16)
    seg_log_or = np.log(np.array([s[3] for s in segs]))[seg]

    size, size_lo = _choice(rng, COMPANY_SIZES, n)
    level, level_lo = _choice(rng, JOB_LEVELS, n)
    industry, industry_lo = _choice(rng, INDUSTRIES, n)
    country, country_lo = _choice(rng, COUNTRIES, n)
    firmo = size_lo + level_lo + industry_lo + country_lo

    timed = [m for m in MICRO_CONVERSIONS if m not in SPREAD_MICRO_DAYS]
    micro_has = {m: rng.random(n) < MICRO_CONVERSIONS[m][0] for m in timed}
    spread_rng = np.random.default_rng([seed, 1])
    micro_has.update({m: spread_rng.random(n) < MICRO_CONVERSIONS[m][0] for m in SPREAD_MICRO_DAYS})
    micro_lo = sum((np.log(ratio) * micro_has[m] for m, (_, ratio) in MICRO_CONVERSIONS.items()),
                   start=np.zeros(n))
    logit = INTERCEPT + seg_log_or + firmo + micro_lo + rng.normal(0, NOISE_SD, n)
    p_macro = 1.0 / (1.0 + np.exp(-logit))
    converts = rng.random(n) < p_macro

    # Lifecycle (seconds from start; censored at the horizon below).
    mql = np.where(converts | (rng.random(n) < MQL_SHARE_OF_NON_MACRO),
                   created + _delay_seconds(rng, "lead->marketingqualifiedlead", n), np.inf)
    sql = np.where(converts, mql + _delay_seconds(rng, "marketingqualifiedlead->salesqualifiedlead", n),
                   np.inf)
    has_opp = converts & (rng.random(n) < OPPORTUNITY_SHARE_OF_MACRO)
    opp = np.where(has_opp, sql + _delay_seconds(rng, "salesqualifiedlead->opportunity", n), np.inf)

    # Deals: one per opportunity, created when the opportunity stage is entered.
    quality = seg_log_or + firmo
    p_win = 1.0 / (1.0 + np.exp(-(WIN_INTERCEPT + 0.5 * (quality - quality.mean()))))
    u = rng.random(n)
    won = has_opp & (u < p_win)
    lost = has_opp & ~won & (rng.random(n) < LOST_SHARE_OF_NOT_WON)
    n_open = len(_OPEN_STAGES)
    steps_taken = np.where(won, n_open, rng.integers(1, n_open + 1, n))  # open stages passed
    deal_times = np.full((n, n_open + 1), np.inf)  # the open stages, then the closing stage
    t = opp.copy()
    for k in range(n_open):
        if k:
            t = t + _delay_seconds(rng, "deal_stage_step", n)
        deal_times[:, k] = np.where(has_opp & (k < steps_taken), t, np.inf)
    # A closed deal closes one step after the last open stage it reached (won: contractsent).
    last_open = deal_times[np.arange(n), (steps_taken - 1).clip(0)]
    deal_times[:, n_open] = np.where(won | lost, last_open + _delay_seconds(rng, "deal_stage_step", n),
                                     np.inf)
    customer = np.where(won, deal_times[:, n_open], np.inf)
    amount_median = np.array(list(DEAL_MEDIAN_BY_SIZE.values()))[size]
    amount = np.round(rng.lognormal(np.log(amount_median), DEAL_AMOUNT_SIGMA), -1)

    # Micro events: strictly between creation and the macro stage (or within 30 days).
    window = np.where(converts, sql - created, 30 * 86_400.0)
    micro_t = {m: np.where(micro_has[m], created + rng.uniform(0.05, 0.95, n) * window, np.inf)
               for m in timed}
    micro_t.update({m: np.where(micro_has[m], created + spread_rng.uniform(0, days * 86_400.0, n), np.inf)
                    for m, days in SPREAD_MICRO_DAYS.items()})

    # Attribution details.
    camp_names = [SOURCES[s[0]][4][s[1]][0] for s in segs]
    kept = rng.random(n) < CLICK_ID_KEPT
    ios = rng.random(n) < IOS_SHARE_OF_GOOGLE
    half = rng.random(n) < 0.5
    source_name = np.array([SOURCES[s[0]][0] or "" for s in segs])[seg]
    is_lead_ad = np.array([c == META_LEAD_AD_CAMPAIGN for c in camp_names])[seg]
    click = np.full(n, _NO_CLICK, dtype=np.int8)
    click[(source_name == "google") & kept] = _GCLID
    click[(source_name == "google") & kept & ios] = np.where(
        half[(source_name == "google") & kept & ios], _GBRAID, _WBRAID)
    click[(source_name == "facebook") & kept] = _FBCLID
    click[is_lead_ad] = _META_LEAD  # lead-ad forms are filled on Meta: the lead id always exists
    click[(source_name == "bing") & kept] = _MSCLKID
    click[(source_name == "linkedin") & kept] = _LI_FAT_ID
    deny_data = rng.random(n) < DENY_USER_DATA
    deny_pers = deny_data | (rng.random(n) < DENY_PERSONALIZATION_EXTRA)

    # Censor at the horizon and compute the last modification.
    times = {"mql": mql, "sql": sql, "opp": opp, "customer": customer}
    observed_last = created.copy()
    for arr in (*times.values(), *micro_t.values(), *deal_times.T):
        observed_last = np.maximum(observed_last, np.where(arr <= horizon, arr, -np.inf))
    touched = rng.random(n) < TOUCH_SHARE
    touch = observed_last + rng.uniform(0, 1, n) * (horizon - observed_last)
    updated = np.minimum(np.where(touched, touch, observed_last + rng.uniform(60, 7_200, n)), horizon - 1)

    def secs(a: np.ndarray) -> np.ndarray:
        return np.where(a <= horizon, np.floor(a), NONE).astype(np.int32)

    cols: dict[str, np.ndarray] = {
        "created": secs(created), "updated": np.maximum(secs(updated), secs(created)),
        "seg": seg, "size": size, "level": level, "industry": industry, "country": country,
        "click": click, "deny_data": deny_data, "deny_pers": deny_pers,
        "mql": secs(mql), "sql": secs(sql), "opp": secs(opp), "customer": secs(customer),
        "won": won, "lost": lost, "amount": amount.astype(np.float32),
        "deal_steps": steps_taken.astype(np.int8),
        "first": rng.integers(0, len(FIRST_NAMES), n).astype(np.int8),
        "last": rng.integers(0, len(LAST_NAMES), n).astype(np.int8),
        "domain": rng.integers(0, len(EMAIL_DOMAINS), n).astype(np.int8),
        "bad_email": rng.random(n) < BAD_EMAIL_SHARE,
        "phone": np.where(rng.random(n) < PHONE_SHARE,
                          rng.integers(0, len(AREA_CODES) * 100, n), -1).astype(np.int16),
    }
    for m, arr in micro_t.items():
        cols[f"micro:{m}"] = secs(arr)
    for k in range(n_open + 1):
        cols[f"deal:{k}"] = secs(deal_times[:, k])
    # deal ids are numbered in order of the leads that have a (visible) deal
    cols["deal_no"] = np.cumsum(cols["deal:0"] != NONE, dtype=np.int64) - 1

    source_shares: dict[str, float] = {}
    for src, _, channel, share, _ in SOURCES:
        key = src or channel
        source_shares[key] = source_shares.get(key, 0.0) + share
    truth = GroundTruth(
        macro_stage=MACRO_STAGE,
        micro_effects={m: ratio for m, (_, ratio) in MICRO_CONVERSIONS.items()},
        micro_rates={m: rate for m, (rate, _) in MICRO_CONVERSIONS.items()},
        source_shares=source_shares,
        campaign_effects={(camp or SOURCES[si][2]): ratio for si, ci, _, ratio in segs
                          for camp in [SOURCES[si][4][ci][0]]},
        firmographic_effects={
            "company_size": {k: o for k, (_, o) in COMPANY_SIZES.items()},
            "job_level": {k: o for k, (_, o) in JOB_LEVELS.items()},
            "industry": {k: o for k, (_, o) in INDUSTRIES.items()},
            "country": {k: o for k, (_, o) in COUNTRIES.items()},
        },
        intercept=INTERCEPT,
        noise_sd=NOISE_SD,
        stage_delays=dict(STAGE_DELAYS),
        opportunity_share=OPPORTUNITY_SHARE_OF_MACRO,
        win_intercept=WIN_INTERCEPT,
        lost_share_of_not_won=LOST_SHARE_OF_NOT_WON,
        deal_amount_median=dict(DEAL_MEDIAN_BY_SIZE),
        deal_amount_sigma=DEAL_AMOUNT_SIGMA,
        currency=CURRENCY,
        macro_probability=p_macro.astype(np.float32),
        converts=converts,
        reaches={"lead": np.ones(n, dtype=bool), "marketingqualifiedlead": np.isfinite(mql),
                 "salesqualifiedlead": converts, "opportunity": has_opp, "customer": won},
        won_amount=np.where(won, amount, 0.0),
        micro_spread_days=dict(SPREAD_MICRO_DAYS),
    )
    return Funnel(seed=seed, start=start, end=end, cols=cols, truth=truth)


# -- building one lead on access ----------------------------------------------------------------


def _token(seed: int, i: int, kind: str, nbytes: int) -> str:
    digest = hashlib.blake2b(f"{seed}:{i}:{kind}".encode(), digest_size=nbytes).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _click_ids(seed: int, i: int, kind: int) -> dict[str, str | None]:
    ids: dict[str, str | None] = dict.fromkeys(
        ("gclid", "gbraid", "wbraid", "fbclid", "meta_lead_id", "msclkid", "li_fat_id"))
    if kind == _GCLID:
        ids["gclid"] = "Cj0KCQ" + _token(seed, i, "gclid", 48)
    elif kind == _GBRAID:
        ids["gbraid"] = "0AAAAA" + _token(seed, i, "gbraid", 36)
    elif kind == _WBRAID:
        ids["wbraid"] = "CjkKCQ" + _token(seed, i, "wbraid", 36)
    elif kind == _FBCLID:
        ids["fbclid"] = "IwAR" + _token(seed, i, "fbclid", 45)
    elif kind == _META_LEAD:
        digest = hashlib.blake2b(f"{seed}:{i}:lead".encode(), digest_size=8).digest()
        ids["meta_lead_id"] = str(10**14 + int.from_bytes(digest) % (9 * 10**15))  # 15-16 digits
    elif kind == _MSCLKID:
        ids["msclkid"] = hashlib.blake2b(f"{seed}:{i}:ms".encode(), digest_size=16).hexdigest()
    elif kind == _LI_FAT_ID:
        h = hashlib.blake2b(f"{seed}:{i}:li".encode(), digest_size=16).hexdigest()
        ids["li_fat_id"] = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return ids


_SEGMENTS = _segments()


def _build_lead(f: Funnel, i: int) -> SimLead:
    c = f.cols
    crm_id = str(FIRST_CONTACT_ID + i)
    si, ci = _SEGMENTS[c["seg"][i]][:2]
    utm_source, utm_medium, channel, _, camps = SOURCES[si]
    campaign = camps[ci][0]
    first, last = FIRST_NAMES[c["first"][i]], LAST_NAMES[c["last"][i]]
    local = f"{first}.{last}.{crm_id}".lower()
    email = local if c["bad_email"][i] else f"{local}@{EMAIL_DOMAINS[c['domain'][i]]}"
    ph = int(c["phone"][i])
    phone = None if ph < 0 else f"+1 {AREA_CODES[ph // 100]}-555-01{ph % 100:02d}"
    if campaign:
        landing = f"https://www.example.com/lp/{campaign}?utm_source={utm_source}&utm_campaign={campaign}"
    else:
        landing = ("https://www.example.com/blog/lead-scoring-guide" if channel == "ORGANIC_SEARCH"
                   else "https://www.example.com/")

    lifecycle = [("lead", f.time(c["created"][i]))]
    for key, value in (("mql", "marketingqualifiedlead"), ("sql", "salesqualifiedlead"),
                       ("opp", "opportunity"), ("customer", "customer")):
        if c[key][i] != NONE:
            lifecycle.append((value, f.time(c[key][i])))
    micro = sorted(((m, f.time(c[f"micro:{m}"][i])) for m in MICRO_CONVERSIONS
                    if c[f"micro:{m}"][i] != NONE), key=lambda e: e[1])

    deals: list[SimDeal] = []
    if c["deal:0"][i] != NONE:
        n_open = len(_OPEN_STAGES)
        stages = [(sid, f.time(c[f"deal:{k}"][i])) for k, sid in enumerate(_OPEN_STAGES)
                  if c[f"deal:{k}"][i] != NONE]
        closed_at = c[f"deal:{n_open}"][i]
        outcome: Literal["won", "lost", "open"] = "open"
        if closed_at != NONE and (c["won"][i] or c["lost"][i]):
            outcome = "won" if c["won"][i] else "lost"
            stages.append(("closedwon" if outcome == "won" else "closedlost", f.time(closed_at)))
        deals.append(SimDeal(str(FIRST_DEAL_ID + int(c["deal_no"][i])), stages,
                             float(c["amount"][i]), CURRENCY, outcome))

    return SimLead(
        crm_id=crm_id,
        created_at=f.time(c["created"][i]),
        updated_at=f.time(c["updated"][i]),
        email=email,
        phone=phone,
        firstname=first,
        lastname=last,
        utm_source=utm_source,
        utm_medium=utm_medium,
        utm_campaign=campaign,
        landing_page=landing,
        channel=channel,
        **_click_ids(f.seed, i, int(c["click"][i])),
        consent_ad_user_data=not bool(c["deny_data"][i]),
        consent_ad_personalization=not bool(c["deny_pers"][i]),
        country=list(COUNTRIES)[c["country"][i]],
        company_size=list(COMPANY_SIZES)[c["size"][i]],
        industry=list(INDUSTRIES)[c["industry"][i]],
        job_level=list(JOB_LEVELS)[c["level"][i]],
        lifecycle=lifecycle,
        micro_events=micro,
        deals=deals,
        p_macro=float(f.truth.macro_probability[i]),
    )


# -- store pages ----------------------------------------------------------------------------------


def lead_in(lead: SimLead) -> LeadIn:
    """The connector view of one simulated lead (what a HubSpot sync would produce)."""
    return LeadIn(
        crm_id=lead.crm_id,
        created_at=lead.created_at,
        updated_at=lead.updated_at,
        email=lead.email,
        phone=lead.phone,
        gclid=lead.gclid,
        gbraid=lead.gbraid,
        wbraid=lead.wbraid,
        fbclid=lead.fbclid,
        msclkid=lead.msclkid,
        li_fat_id=lead.li_fat_id,
        meta_lead_id=lead.meta_lead_id,
        utm_source=lead.utm_source,
        utm_medium=lead.utm_medium,
        utm_campaign=lead.utm_campaign,
        landing_page=lead.landing_page,
        country=lead.country,
        consent_ad_user_data=lead.consent_ad_user_data,
        consent_ad_personalization=lead.consent_ad_personalization,
        current_stage=lead.lifecyclestage,
        attributes={"company_size": lead.company_size, "industry": lead.industry,
                    "job_level": lead.job_level, "channel": lead.channel},
    )


def funnel_pages(funnel: Funnel, *, source: str = "hubspot", page_size: int = 5000) -> Iterator[Page]:
    """The funnel as connector `Page`s (leads with their lifecycle and deal stages and micro
    events), to load a store with `apply_page` without HTTP. `source` is accepted for symmetry
    with the connectors; the caller passes the same name to `apply_page`."""
    del source  # pages carry no source; apply_page takes it
    if page_size < 1:
        raise ValueError("page_size must be >= 1")
    for lo in range(0, funnel.n, page_size):
        page = Page(total=funnel.n)
        for lead in funnel.leads[lo:lo + page_size]:
            page.leads.append(lead_in(lead))
            for value, at in lead.lifecycle:
                page.stages.append(StageIn(lead.crm_id, "lifecyclestage", value, at))
            for deal in lead.deals:
                amount = Decimal(str(deal.amount))
                for stage_id, at in deal.stages:
                    page.stages.append(StageIn(lead.crm_id, "dealstage", stage_id, at, deal.deal_id,
                                               amount, deal.currency, stage_id == "closedlost"))
            for name, at in lead.micro_events:
                page.events.append(EventIn(lead.crm_id, name, at))
        last = page.leads[-1]
        page.cursor = Cursor(max(lead.updated_at or lead.created_at for lead in page.leads),
                             last.crm_id)
        yield page
