"""leadloop: feed lead quality from the CRM back to ad platforms as offline conversions."""

__version__ = "0.1.0"
