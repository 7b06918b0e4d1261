"""The web dashboard at `/dashboard`: spend, budgets and forecasts per team, and the ledger's health."""
