"""What people and programs see of a running spendgate besides the proxy itself: the admin API, `/metrics` and the
dashboard, served by `app.py`. Thin adapters over the ledger and the request path, which never import them."""
