"""What people and programs use to run spendgate and look at its ledger: the command line, the admin API,
metrics and the dashboard. Thin adapters over the ledger and the request path, which never import them."""
