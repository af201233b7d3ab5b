"""The built-in sandbox: a simulated B2B lead funnel with known ground truth, and local fake
CRM and ad-platform servers (127.0.0.1 only) that answer like the real services."""
