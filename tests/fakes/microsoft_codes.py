"""Microsoft Advertising's published operation error codes (name -> numeric code), the subset that
matters to offline conversions and account access, as listed at
https://learn.microsoft.com/advertising/guides/operation-error-codes (MicrosoftDocs/Advertising-docs,
Advertising/bingads-13/guides/operation-error-codes.md). The exporter and the fake may only use
these names; `tests/test_export_microsoft.py` checks it."""

PUBLISHED: dict[str, int] = {
    "InternalError": 0,
    "NullRequest": 100,
    "InvalidCredentials": 105,
    "UserIsNotAuthorized": 106,
    "AuthenticationTokenExpired": 109,
    "CallRateExceeded": 117,
    "InvalidAccount": 208,
    "CampaignServiceInvalidAccountStatus": 1008,
    "CampaignServiceAccountIdMissingInRequestHeader": 1009,
    "CampaignServiceCustomerIdHasToBeSpecified": 1029,
    "CampaignServiceAccountIdHasToBeSpecified": 1030,
    "CampaignServiceInvalidAccountId": 1102,
    "CampaignServiceInvalidCustomerId": 1490,
    "OfflineConversionsNullOrEmpty": 5600,
    "OfflineConversionsLimitExceeded": 5601,
    "OfflineConversionMicrosoftClickIdNullOrEmpty": 5603,
    "OfflineConversionMicrosoftClickIdInvalid": 5604,
    "OfflineConversionNameNullOrEmpty": 5605,
    "OfflineConversionNameInvalid": 5606,
    "OfflineConversionTimeInvalid": 5607,
    "OfflineConversionTimeNullOrEmpty": 5608,
    "OfflineConversionTimeOutOfWindow": 5609,
    "OfflineConversionValueInvalid": 5610,
    "OfflineConversionCurrencyCodeInvalid": 5611,
    "OfflineConversionsApplyFailed": 5612,
    "OfflineConversionPilotNotEnabledForCustomer": 5613,
    "FutureConversionTimeCannotBeSet": 5614,
    "OfflineConversionNotAcceptedForGoal": 5615,
    "ConversionTimeEarlierThanClickTime": 5616,
    "ClickIdDateTimeOutsideGoalConversionWindow": 5617,
    "OfflineConversionInvalidAdjustmentType": 5618,
    "OfflineConversionAdjustmentTimeNullOrEmpty": 5619,
    "OfflineConversionAdjustmentTimeEarlierThanConversionTime": 5620,
    "OfflineConversionAdjustmentTimeInvalid": 5621,
    "OfflineConversionFutureAdjustmentTimeCannotBeSet": 5622,
    "OfflineConversionAdjustmentTimeOutOfWindow": 5623,
    "OfflineConversionAdjustmentValueNotExpected": 5624,
    "OfflineConversionAdjustmentValueRequired": 5625,
    "OfflineConversionCurrencyValueRequired": 5626,
    "OfflineConversionRestateRetractNotSupported": 5627,
    "EmailMustBeHashed": 8004,
}

# Statuses of OfflineConversionDailySummary (campaign-management-service/offlineconversiondailysummary.md)
# that name a condition also seen as an operation error.
DAILY_SUMMARY_STATUSES = frozenset({"OfflineConversionGoalTooRecent"})
