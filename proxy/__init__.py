"""spendgate: a metering proxy for Anthropic's Messages API."""
