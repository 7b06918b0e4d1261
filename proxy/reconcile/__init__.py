"""`spendgate reconcile`: the ledger held against Anthropic's own usage and cost reports."""
